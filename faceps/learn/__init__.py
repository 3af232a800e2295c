"""Learning: the networks of the paper (section 4), their losses and metrics.

- :mod:`faceps.learn.resnet`: ResNet-18 (no torchvision needed).
- :mod:`faceps.learn.proxynet`: ProxyNet, 3DMM coefficients and pose from the crop(s),
  and the differentiable geometry that turns its output into camera-frame vertices.
- :mod:`faceps.learn.normalnet`: NormalNet, normals from 1..N images and the proxy normal
  map (PS-FCN-like max-pooling, optional Cas-FNE cascaded refinement).
- :mod:`faceps.learn.losses`: eq. 8-11, angular errors and accuracy metrics.

The data side (torch ``Dataset``, splits, augmentations, batching) lives in
:mod:`faceps.datasets.torch_data`.
"""

from faceps.learn.losses import (
    THRESHOLDS_DEG,
    AngularStats,
    ProxyLoss,
    ProxyLossConfig,
    angular_error_deg,
    angular_stats,
    cascade_normal_loss,
    coefficient_regularization,
    geometry_loss,
    landmark_loss,
    normal_loss,
    normal_metrics,
    per_sample_mean_error,
    proxy_loss,
)
from faceps.learn.normalnet import NormalNet, NormalNetConfig, NormalNetOutput
from faceps.learn.proxynet import (
    ProxyNet,
    ProxyNetConfig,
    ProxyOutput,
    camera_vertices,
    landmark_points,
    project_landmarks,
    translation_from_raw,
    translation_to_raw,
    vertices_from_params,
)
from faceps.learn.resnet import BasicBlock, ResNet, ResNetConfig, count_parameters, resnet18

__all__ = [
    "THRESHOLDS_DEG",
    "AngularStats",
    "ProxyLoss",
    "ProxyLossConfig",
    "angular_error_deg",
    "angular_stats",
    "cascade_normal_loss",
    "coefficient_regularization",
    "geometry_loss",
    "landmark_loss",
    "normal_loss",
    "normal_metrics",
    "per_sample_mean_error",
    "proxy_loss",
    "NormalNet",
    "NormalNetConfig",
    "NormalNetOutput",
    "ProxyNet",
    "ProxyNetConfig",
    "ProxyOutput",
    "camera_vertices",
    "landmark_points",
    "project_landmarks",
    "translation_from_raw",
    "translation_to_raw",
    "vertices_from_params",
    "BasicBlock",
    "ResNet",
    "ResNetConfig",
    "count_parameters",
    "resnet18",
]

# ---------------------------------------------------------------- training and evaluation
# The render layer and checkpoints are imported here; the training and evaluation types
# (which pull in the HDF5 data stack) on first use, so ``python -m faceps.learn.train``
# (torchrun) does not import its own module twice. The functions are
# ``faceps.learn.train.train`` and ``faceps.learn.evaluate.evaluate``: the names
# ``faceps.learn.train`` and ``faceps.learn.evaluate`` are the modules.
from faceps.learn.checkpoint import (  # noqa: E402
    CheckpointError,
    LoadedNetwork,
    load_network,
)
from faceps.learn.render_layer import (  # noqa: E402
    ProxyNoise,
    ProxyRender,
    ProxySource,
    perturbed_proxy,
    render_params,
    render_proxy,
)

_LAZY = {
    "TrainConfig": "faceps.learn.train",
    "TrainResult": "faceps.learn.train",
    "TrainingError": "faceps.learn.train",
    "EvalResult": "faceps.learn.evaluate",
}

__all__ += [
    "CheckpointError",
    "LoadedNetwork",
    "load_network",
    "ProxyNoise",
    "ProxyRender",
    "ProxySource",
    "perturbed_proxy",
    "render_params",
    "render_proxy",
    *_LAZY,
]


def __getattr__(name: str):
    """Training and evaluation names, imported on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'faceps.learn' has no attribute {name!r}")
