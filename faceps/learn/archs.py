"""Normal-estimation architectures: one registry, one interface.

Every face-normal method of ``papers/`` is an architecture of the ``normal`` network kind,
chosen by the ``arch`` field of its configuration (``faceps train normal --arch NAME``),
trained by the same trainer (:mod:`faceps.learn.train`) and evaluated by the same
``faceps evaluate``:

========== ==================================================== ============ =========
arch        paper / module                                      images       proxy in
========== ==================================================== ============ =========
facepsnet   FacePSNet NormalNet (:mod:`faceps.learn.normalnet`) 1..N         yes
casfne      Cas-FNE cascaded refinement (:mod:`.casfne`)        1            no
exemplar    HFFNE exemplar modulation (:mod:`.exemplar`)        1            yes
crossmodal  cross-modal face normals (:mod:`.crossmodal`)       1            no
========== ==================================================== ============ =========

The interface every architecture module implements (``NormalArch`` below):

- a frozen dataclass configuration with a string field ``arch`` (its registry name),
  ``to_dict()``, and validation in ``__post_init__`` raising
  :class:`~faceps.core.errors.ConfigError`;
- an ``nn.Module`` built from it, with the class attributes ``single_image`` (True: one
  image per sample, the first valid one of ``image_mask``; the others are ignored) and
  ``uses_proxy`` (whether the proxy normals are read), the property ``loss_names`` (the
  names of the loss terms :meth:`loss` reports; fixed for a configuration, they become
  ``metrics.csv`` columns), and

  ``forward(images, proxy_normals, image_mask=None, proxy_mask=None, *, passes=1)``
  -> :class:`~faceps.learn.normalnet.NormalNetOutput` (``normals`` (B, 3, H, W) unit,
  camera frame, facing the camera; ``stages``, at least the final estimate; ``aux``,
  extra maps such as ``grad_magnitude`` (B, 1, H, W)). ``images`` is (B, k, 3, H, W)
  linear intensities (or (B, 3, H, W)), any H, W; ``passes`` > 1 may raise ConfigError
  where it means nothing;

  ``loss(out, gt, region, inputs)`` -> ``(total, terms)``: the training loss of a batch
  (a scalar tensor) and its named terms (scalar tensors, names ``loss_names``), from
  the forward output, the ground-truth normals ``gt`` (B, 3, H, W), the supervised
  region (B, H, W) float (1 inside) and :class:`LossInputs` (the network inputs and the
  optimiser step, for schedules such as alternating batch types).

The FacePSNet NormalNet keeps its own losses in the trainer (per-stage cosine loss with
``stage_weights``, ``self_feed``); the other architectures bring theirs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from faceps.core.errors import ConfigError

__all__ = ["ARCHS", "DEFAULT_ARCH", "LossInputs", "NormalArch", "arch_of", "config_class",
           "network_class", "normal_config", "build_normal_network", "is_single_image",
           "first_valid_image", "single_input_image"]

DEFAULT_ARCH = "facepsnet"

#: registry name -> (module, configuration class, network class); imported on first use
ARCHS: dict[str, tuple[str, str, str]] = {
    "facepsnet": ("faceps.learn.normalnet", "NormalNetConfig", "NormalNet"),
    "casfne": ("faceps.learn.casfne", "CasFNEConfig", "CasFNE"),
    "exemplar": ("faceps.learn.exemplar", "ExemplarConfig", "ExemplarNet"),
    "crossmodal": ("faceps.learn.crossmodal", "CrossModalConfig", "CrossModalNet"),
}


@dataclass
class LossInputs:
    """What :meth:`NormalArch.loss` may need besides the prediction and the ground truth.

    Attributes:
        images: (B, k, 3, H, W) the network's input images; image_mask: (B, k) bool.
        proxy_normals: (B, 3, H, W); proxy_mask: (B, H, W) float (1 where known).
        step: optimiser steps done before this one (0 at the start of a run).
        batch: the rest of the collated batch on the device (e.g. ``depth``, ``K``), for
            terms that need more ground truth.
    """

    images: torch.Tensor
    image_mask: torch.Tensor
    proxy_normals: torch.Tensor
    proxy_mask: torch.Tensor
    step: int = 0
    batch: dict[str, Any] | None = None


class NormalArch(Protocol):
    """The interface of a normal-estimation architecture (module docstring)."""

    config: Any
    single_image: bool
    uses_proxy: bool

    @property
    def loss_names(self) -> tuple[str, ...]: ...

    def forward(self, images: torch.Tensor, proxy_normals: torch.Tensor,
                image_mask: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, *, passes: int = 1) -> Any: ...

    def loss(self, out: Any, gt: torch.Tensor, region: torch.Tensor, inputs: LossInputs
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def _check_name(arch: object) -> str:
    name = DEFAULT_ARCH if arch is None else str(arch)
    if name not in ARCHS:
        raise ConfigError(f"unknown normal-network architecture {name!r}; known: "
                          f"{', '.join(ARCHS)}")
    return name


def _attr(arch: object, which: int) -> type:
    name = _check_name(arch)
    module = importlib.import_module(ARCHS[name][0])
    return getattr(module, ARCHS[name][which])


def config_class(arch: object = None) -> type:
    """The configuration dataclass of architecture ``arch`` (None: the default)."""
    return _attr(arch, 1)


def network_class(arch: object = None) -> type:
    """The ``nn.Module`` class of architecture ``arch`` (None: the default)."""
    return _attr(arch, 2)


def arch_of(values: dict[str, Any] | Any | None) -> str:
    """The architecture named by a configuration dict or object (``facepsnet`` when it
    names none: files written before there was a choice)."""
    if values is None:
        return DEFAULT_ARCH
    arch = values.get("arch") if isinstance(values, dict) else getattr(values, "arch", None)
    return _check_name(arch)


def normal_config(values: dict[str, Any] | None = None) -> Any:
    """The configuration object of a normal network from a dict of its fields (``arch``
    picks the class; lists are accepted for tuples; unknown fields raise ConfigError
    naming the known ones)."""
    values = dict(values or {})
    arch = arch_of(values)
    cls = config_class(arch)
    values["arch"] = arch
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {arch} option(s) {unknown}; known: {sorted(known)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid {arch} options {values}: {exc}") from None


def build_normal_network(config: Any) -> torch.nn.Module:
    """A freshly initialised network of the architecture ``config.arch``."""
    return network_class(arch_of(config))(config)


def is_single_image(network: torch.nn.Module) -> bool:
    """Whether a normal network reads one image per sample."""
    return bool(getattr(network, "single_image", False))


def first_valid_image(images: torch.Tensor, image_mask: torch.Tensor | None
                      ) -> torch.Tensor:
    """(B, 3, H, W): each sample's first valid image of (B, k, 3, H, W) images (or the
    image of (B, 3, H, W) input), for single-image architectures."""
    if images.ndim == 4:
        return images
    if image_mask is None:
        return images[:, 0]
    m = image_mask.to(torch.bool)
    if not bool(m.any(dim=1).all()):
        from faceps.core.errors import ShapeError

        raise ShapeError("every sample needs at least one valid image (image_mask)")
    first = m.to(torch.int8).argmax(dim=1)
    return images[torch.arange(images.shape[0], device=images.device), first]


def single_input_image(images: torch.Tensor, image_mask: torch.Tensor | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """(B, 3, H, W): each sample's first valid image (:func:`first_valid_image`) divided by
    its mean intensity (:func:`faceps.learn.normalnet.normalize_images`), the input of the
    single-image architectures; ``images`` (B, k, 3, H, W) or (B, 3, H, W)."""
    from faceps.core.errors import check_shape
    from faceps.learn.normalnet import normalize_images

    if images.ndim == 4:
        check_shape(images, "images", (None, 3, None, None))
    else:
        check_shape(images, "images", (None, None, 3, None, None))
    if image_mask is not None and images.ndim == 5:
        check_shape(image_mask, "image_mask", tuple(images.shape[:2]))
    x = first_valid_image(images, image_mask)
    ones = torch.ones((x.shape[0], 1), dtype=torch.bool, device=x.device)
    return normalize_images(x[:, None], ones, eps)[:, 0]
