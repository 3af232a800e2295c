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

# Everything is imported on first use: ``import faceps.learn`` (e.g. by the command-line
# parser) must not pull in torch, and ``python -m faceps.learn.train`` (torchrun) must not
# import its own module twice. The functions ``train``, ``evaluate`` and ``infer`` live in
# the modules ``faceps.learn.train``, ``faceps.learn.evaluate`` and ``faceps.learn.infer``
# (those names are the modules).
_LAZY = {
    "THRESHOLDS_DEG": "faceps.learn.losses",
    "AngularStats": "faceps.learn.losses",
    "ProxyLoss": "faceps.learn.losses",
    "ProxyLossConfig": "faceps.learn.losses",
    "angular_error_deg": "faceps.learn.losses",
    "angular_stats": "faceps.learn.losses",
    "cascade_normal_loss": "faceps.learn.losses",
    "coefficient_regularization": "faceps.learn.losses",
    "geometry_loss": "faceps.learn.losses",
    "landmark_loss": "faceps.learn.losses",
    "normal_loss": "faceps.learn.losses",
    "normal_metrics": "faceps.learn.losses",
    "per_sample_mean_error": "faceps.learn.losses",
    "proxy_loss": "faceps.learn.losses",
    "NormalNet": "faceps.learn.normalnet",
    "NormalNetConfig": "faceps.learn.normalnet",
    "NormalNetOutput": "faceps.learn.normalnet",
    "ProxyNet": "faceps.learn.proxynet",
    "ProxyNetConfig": "faceps.learn.proxynet",
    "ProxyOutput": "faceps.learn.proxynet",
    "camera_vertices": "faceps.learn.proxynet",
    "landmark_points": "faceps.learn.proxynet",
    "project_landmarks": "faceps.learn.proxynet",
    "translation_from_raw": "faceps.learn.proxynet",
    "translation_to_raw": "faceps.learn.proxynet",
    "vertices_from_params": "faceps.learn.proxynet",
    "BasicBlock": "faceps.learn.resnet",
    "ResNet": "faceps.learn.resnet",
    "ResNetConfig": "faceps.learn.resnet",
    "count_parameters": "faceps.learn.resnet",
    "resnet18": "faceps.learn.resnet",
    "CheckpointError": "faceps.learn.checkpoint",
    "LoadedNetwork": "faceps.learn.checkpoint",
    "load_network": "faceps.learn.checkpoint",
    "ProxyNoise": "faceps.learn.render_layer",
    "ProxyRender": "faceps.learn.render_layer",
    "ProxySource": "faceps.learn.render_layer",
    "perturbed_proxy": "faceps.learn.render_layer",
    "render_params": "faceps.learn.render_layer",
    "render_proxy": "faceps.learn.render_layer",
    "TrainConfig": "faceps.learn.train",
    "TrainResult": "faceps.learn.train",
    "TrainingError": "faceps.learn.train",
    "EvalResult": "faceps.learn.evaluate",
    # inference: the function is faceps.learn.infer.infer (that name is the module)
    "InferConfig": "faceps.learn.infer",
    "Inference": "faceps.learn.infer",
    "InferenceNetworks": "faceps.learn.infer",
    "CropSpec": "faceps.learn.infer",
    "load_networks": "faceps.learn.infer",
    "write_inference": "faceps.learn.infer",
    "default_weights_dir": "faceps.learn.infer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    """The package's names, imported from their modules on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'faceps.learn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
