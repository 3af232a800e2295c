"""Training losses of the paper (eq. 8-11) and normal-accuracy metrics.

Proxy network (section 4.1):

- eq. 8, :func:`geometry_loss`: mean squared distance (mm^2) between predicted and
  ground-truth vertices. The paper writes the squared norm of the stacked difference; we
  average over vertices (the sum divided by V) so the weight does not depend on the mesh
  resolution. Both meshes are taken in the camera frame, so the loss also supervises pose.
- eq. 9, :func:`landmark_loss`: mean squared reprojection error (pixels^2) of the landmark
  vertices under the perspective camera K against the image landmarks.
- a coefficient prior, :func:`coefficient_regularization` (not in the paper; coefficients
  are in std units, so this is the negative log of the N(0, I) prior up to scale).
- eq. 10, :func:`proxy_loss`: ``w_geo E_geo + w_lan E_lan + w_reg E_reg``.

Normal network (section 4.2):

- eq. 11, :func:`normal_loss`: ``1 - n . n_gt`` averaged over the mask pixels of the
  batch; :func:`cascade_normal_loss` sums it over the stages of a cascade (Cas-FNE eq. 5).

Metrics: :func:`angular_error_deg` (per pixel, numerically exact near 0 degrees via
``atan2(|n x m|, n . m)``), :func:`angular_stats` and :func:`normal_metrics` (mean, median,
RMS and the percentage of pixels below 11.25, 20, 25 and 30 degrees).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from faceps.core.camera import project_torch
from faceps.core.errors import ConfigError, ShapeError, check_shape
from faceps.learn.proxynet import landmark_points
from faceps.model.morphable import MorphableModel

__all__ = [
    "THRESHOLDS_DEG",
    "ProxyLossConfig",
    "ProxyLoss",
    "geometry_loss",
    "landmark_loss",
    "coefficient_regularization",
    "proxy_loss",
    "normal_loss",
    "cascade_normal_loss",
    "angular_error_deg",
    "AngularStats",
    "angular_stats",
    "normal_metrics",
    "per_sample_mean_error",
]

#: the usual accuracy thresholds of normal estimation, degrees
THRESHOLDS_DEG = (11.25, 20.0, 25.0, 30.0)
#: depth (mm) below which a point counts as behind the camera in the landmark projection
MIN_DEPTH_MM = 1.0


# ------------------------------------------------------------------ proxy losses
def geometry_loss(pred: torch.Tensor, gt: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 8: mean squared vertex distance (mm^2).

    Args:
        pred, gt: (B, V, 3) vertices in mm (same frame).
        weights: optional (V,) or (B, V) non-negative vertex weights (e.g. the face
            region); the mean is weighted.

    Returns:
        scalar tensor: the weighted mean over vertices of |pred - gt|^2, averaged over B.
    """
    check_shape(pred, "pred", (None, "V", 3))
    check_shape(gt, "gt", tuple(pred.shape))
    d2 = ((pred - gt) ** 2).sum(-1)
    if weights is None:
        return d2.mean()
    w = weights.to(d2.dtype).expand_as(d2)
    return ((d2 * w).sum(-1) / w.sum(-1).clamp_min(1e-12)).mean()


def landmark_loss(points: torch.Tensor, K: torch.Tensor, landmarks: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 9: mean squared reprojection error (pixels^2) of 3D landmarks.

    Args:
        points: (B, N, 3) camera-frame landmark points (mm), e.g. from
            :func:`faceps.learn.proxynet.landmark_points`.
        K: (B, 3, 3) intrinsics (pixels).
        landmarks: (B, N, 2) observed (u, v) pixels.
        mask: (B, N) or (N,), nonzero where a landmark is known and the model has its
            vertex; None: all.

    Returns:
        scalar tensor: mean over known landmarks of the batch of |q - Pi(X)|^2 (0 when
        none is known). Points closer than 1 mm to the camera plane are clamped there.
    """
    check_shape(points, "points", (None, "N", 3))
    B, N = points.shape[:2]
    check_shape(landmarks, "landmarks", (B, N, 2))
    check_shape(K, "K", (B, 3, 3))
    z = points[..., 2:3].clamp_min(MIN_DEPTH_MM)
    uv = project_torch(torch.cat([points[..., :2], z], -1), K)
    d2 = ((uv - landmarks) ** 2).sum(-1)
    if mask is None:
        return d2.mean()
    w = (mask > 0).to(d2.dtype).expand_as(d2)
    return (d2 * w).sum() / w.sum().clamp_min(1.0)


def coefficient_regularization(*coefficients: torch.Tensor) -> torch.Tensor:
    """Mean squared coefficient (std units) over all given (B, k) tensors together.

    Returns:
        scalar: ``sum_j |alpha_j|^2 / sum_j k_j``, averaged over B (0 without
        coefficients).
    """
    if not coefficients:
        raise ShapeError("coefficient_regularization needs at least one tensor")
    total = sum(c.pow(2).sum(-1) for c in coefficients)
    k = sum(c.shape[-1] for c in coefficients)
    return (total / max(k, 1)).mean()


@dataclass(frozen=True)
class ProxyLossConfig:
    """Weights of eq. 10 (plus the coefficient prior).

    Attributes:
        w_geo: weight of the geometry loss (mm^2).
        w_lan: weight of the landmark loss (pixels^2); the paper's w_lan.
        w_reg: weight of the coefficient prior.
        face_region_only: average the geometry loss over the model's face region only.
    """

    w_geo: float = 1.0
    w_lan: float = 1.0
    w_reg: float = 0.01
    face_region_only: bool = False

    def __post_init__(self) -> None:
        for name in ("w_geo", "w_lan", "w_reg"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProxyLoss:
    """Eq. 10 and its terms (scalar tensors; ``total`` is differentiable)."""

    total: torch.Tensor
    geometry: torch.Tensor
    landmarks: torch.Tensor
    regularization: torch.Tensor

    def items(self) -> dict[str, float]:
        """The terms as floats (for logging)."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def proxy_loss(model: MorphableModel, pred_vertices: torch.Tensor, gt_vertices: torch.Tensor,
               K: torch.Tensor, landmarks: torch.Tensor, landmark_mask: torch.Tensor | None,
               coefficients: Sequence[torch.Tensor] = (),
               config: ProxyLossConfig | None = None) -> ProxyLoss:
    """Eq. 10: ``w_geo E_geo + w_lan E_lan + w_reg E_reg``.

    Args:
        model: the morphable model (landmark vertex ids, face region).
        pred_vertices, gt_vertices: (B, V, 3) camera-frame vertices (mm); see
            :meth:`faceps.learn.proxynet.ProxyOutput.vertices` and
            :func:`faceps.learn.proxynet.vertices_from_params`.
        K: (B, 3, 3) crop intrinsics.
        landmarks: (B, 68, 2) image landmarks (pixels); landmark_mask: (B, 68) known ones.
        coefficients: predicted coefficient tensors (B, k) for the prior (e.g. alpha_id,
            alpha_exp); empty: no prior.
        config: weights.

    Returns:
        :class:`ProxyLoss`.
    """
    c = config or ProxyLossConfig()
    weights = None
    if c.face_region_only:
        weights = torch.as_tensor(model.region, dtype=pred_vertices.dtype,
                                  device=pred_vertices.device)
    geo = geometry_loss(pred_vertices, gt_vertices, weights)
    pts, valid = landmark_points(model, pred_vertices)
    mask = valid[None].to(pts.dtype).expand(pts.shape[0], -1)
    if landmark_mask is not None:
        mask = mask * (landmark_mask > 0).to(pts.dtype)
    lan = landmark_loss(pts, K, landmarks, mask)
    reg = (coefficient_regularization(*coefficients) if len(coefficients)
           else geo.new_zeros(()))
    total = c.w_geo * geo + c.w_lan * lan + c.w_reg * reg
    return ProxyLoss(total, geo, lan, reg)


# ------------------------------------------------------------------ normal losses
def _check_maps(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None) -> None:
    check_shape(pred, "pred", (None, 3, None, None))
    check_shape(gt, "gt", tuple(pred.shape))
    if mask is not None:
        check_shape(mask, "mask", (pred.shape[0],) + tuple(pred.shape[2:]))


def normal_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Eq. 11: mean of ``1 - n . n_gt`` over the mask pixels of the batch.

    Args:
        pred: (B, 3, H, W) unit normals (estimated).
        gt: (B, 3, H, W) unit ground-truth normals.
        mask: (B, H, W), nonzero on the pixels to count (the face region covered by the
            proxy); None: all pixels.

    Returns:
        scalar in [0, 2] (0 when the mask is empty).
    """
    _check_maps(pred, gt, mask)
    cos_term = 1.0 - (pred * gt).sum(1)
    if mask is None:
        return cos_term.mean()
    w = (mask > 0).to(cos_term.dtype)
    return (cos_term * w).sum() / w.sum().clamp_min(1.0)


def cascade_normal_loss(stages: Sequence[torch.Tensor], gt: torch.Tensor,
                        mask: torch.Tensor | None = None,
                        weights: Sequence[float] | None = None) -> torch.Tensor:
    """Sum of :func:`normal_loss` over cascade stages (Cas-FNE eq. 5).

    Args:
        stages: T + 1 tensors (B, 3, H, W), e.g. ``NormalNetOutput.stages``.
        gt, mask: as :func:`normal_loss`.
        weights: one weight per stage (default 1 each).

    Returns:
        scalar tensor.
    """
    if not stages:
        raise ShapeError("cascade_normal_loss needs at least one stage")
    w = [1.0] * len(stages) if weights is None else [float(x) for x in weights]
    if len(w) != len(stages):
        raise ConfigError(f"{len(w)} weights for {len(stages)} stages")
    return sum(wi * normal_loss(s, gt, mask) for wi, s in zip(w, stages))


# ------------------------------------------------------------------ depth gradients
def depth_gradient_magnitude(depth: torch.Tensor, K: torch.Tensor, mask: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient-magnitude map W of the WLS paper (``papers/monocular-head-normal-
    integration-wls.txt`` section 3.1: ``|grad f|`` of the depth "in units equivalent to the
    pixel size"), under a perspective camera: the depth is divided by the size of a pixel
    at that depth, ``z / f``, so ``W = f |grad_px z| / z`` (dimensionless; the surface
    slope ``tan`` of its angle to the image plane where the surface is smooth, large at
    depth discontinuities). Central differences where both neighbours are known,
    one-sided where one is.

    Args:
        depth: (B, H, W) mm; K: (B, 3, 3) intrinsics; mask: (B, H, W) nonzero where the
            depth is known.

    Returns:
        (W (B, H, W), known (B, H, W) bool: pixels with a known neighbour on each axis).
    """
    check_shape(depth, "depth", (None, "H", "W"))
    B = depth.shape[0]
    check_shape(mask, "mask", (B,) + tuple(depth.shape[1:]))
    check_shape(K, "K", (B, 3, 3))
    m = (mask > 0) & torch.isfinite(depth) & (depth > 0)
    z = torch.where(m, depth, torch.zeros_like(depth))
    mf = m.to(depth.dtype)

    def axis_diff(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        nxt = torch.roll(z, -1, dim)
        prv = torch.roll(z, 1, dim)
        mn = torch.roll(mf, -1, dim)
        mp = torch.roll(mf, 1, dim)
        idx = torch.arange(z.shape[dim], device=z.device)
        last = (idx == z.shape[dim] - 1)
        first = (idx == 0)
        shape = [1, 1, 1]
        shape[dim] = -1
        mn = mn * (~last).view(shape).to(mf.dtype)
        mp = mp * (~first).view(shape).to(mf.dtype)
        both = mn * mp
        d = torch.where(both > 0, (nxt - prv) / 2,
                        torch.where(mn > 0, nxt - z, torch.where(mp > 0, z - prv,
                                                                 torch.zeros_like(z))))
        return d, (mn + mp) > 0

    du, ku = axis_diff(2)
    dv, kv = axis_diff(1)
    f = torch.sqrt(K[:, 0, 0] * K[:, 1, 1]).view(B, 1, 1)
    w = f * torch.sqrt(du * du + dv * dv) / z.clamp_min(1e-6)
    known = m & ku & kv
    return torch.where(known, w, torch.zeros_like(w)), known


def gradient_magnitude_loss(pred: torch.Tensor, depth: torch.Tensor, K: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """Mean |log(1 + W_pred) - log(1 + W_gt)| over the pixels with a known W_gt
    (:func:`depth_gradient_magnitude`); the log compresses the range between smooth skin
    (W ~ 0-2) and depth discontinuities (W ~ 10-100).

    Args:
        pred: (B, 1, H, W) or (B, H, W) predicted W >= 0; depth, K, mask: as
            :func:`depth_gradient_magnitude`.
    """
    if pred.ndim == 4:
        check_shape(pred, "pred", (None, 1, None, None))
        pred = pred[:, 0]
    target, known = depth_gradient_magnitude(depth, K, mask)
    check_shape(pred, "pred", tuple(target.shape))
    err = (torch.log1p(pred.clamp_min(0)) - torch.log1p(target)).abs()
    w = known.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)


# ------------------------------------------------------------------ metrics
def angular_error_deg(pred: torch.Tensor, gt: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Angle between normals in degrees, ``atan2(|n x m|, n . m)`` (accurate near 0 and 180
    degrees; inputs need not be unit length).

    Args:
        pred, gt: tensors of the same shape with 3 components along ``dim`` (e.g.
            (B, 3, H, W) with dim=1, or (..., 3) with dim=-1).

    Returns:
        the shape without ``dim``: angles in [0, 180] degrees.
    """
    if pred.shape != gt.shape or pred.shape[dim] != 3:
        raise ShapeError(f"expected pred and gt of the same shape with 3 components on axis "
                         f"{dim}; got {tuple(pred.shape)} and {tuple(gt.shape)}")
    cross = torch.linalg.cross(pred, gt, dim=dim).norm(dim=dim)
    dot = (pred * gt).sum(dim)
    return torch.rad2deg(torch.atan2(cross, dot))


@dataclass
class AngularStats:
    """Summary of angular errors (degrees).

    Attributes:
        mean, median, rmse: of the errors (NaN when there are none).
        below: threshold (degrees) -> percentage of errors below it.
        n: number of errors summarised.
    """

    mean: float
    median: float
    rmse: float
    below: dict[float, float] = field(default_factory=dict)
    n: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict (threshold keys as text, e.g. ``"11.25"``)."""
        return {"mean_deg": self.mean, "median_deg": self.median, "rmse_deg": self.rmse,
                "below_pct": {f"{t:g}": v for t, v in self.below.items()}, "n": self.n}


def angular_stats(errors_deg: torch.Tensor | np.ndarray,
                  thresholds: Sequence[float] = THRESHOLDS_DEG) -> AngularStats:
    """Mean, median, RMS and percentages below ``thresholds`` of a set of errors.

    Args:
        errors_deg: errors in degrees, any shape (flattened; NaN entries ignored). To
            summarise a whole test set, concatenate the masked errors of all samples.
        thresholds: degrees.

    Returns:
        :class:`AngularStats`.
    """
    e = (errors_deg.detach().cpu().double().numpy() if isinstance(errors_deg, torch.Tensor)
         else np.asarray(errors_deg, np.float64)).reshape(-1)
    e = e[np.isfinite(e)]
    if e.size == 0:
        nan = float("nan")
        return AngularStats(nan, nan, nan, {float(t): nan for t in thresholds}, 0)
    return AngularStats(mean=float(e.mean()), median=float(np.median(e)),
                        rmse=float(np.sqrt(np.mean(e * e))),
                        below={float(t): float(100.0 * np.mean(e < t)) for t in thresholds},
                        n=int(e.size))


def normal_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None,
                   thresholds: Sequence[float] = THRESHOLDS_DEG) -> AngularStats:
    """:func:`angular_stats` of the per-pixel angular errors over the mask pixels of a
    batch (pooled over samples).

    Args:
        pred, gt: (B, 3, H, W) normals; mask: (B, H, W), nonzero where counted.
    """
    _check_maps(pred, gt, mask)
    err = angular_error_deg(pred.detach(), gt.detach(), dim=1)
    if mask is not None:
        err = err[mask > 0]
    return angular_stats(err, thresholds)


def per_sample_mean_error(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor
                          ) -> torch.Tensor:
    """(B,) mean angular error (degrees) of each sample over its mask (NaN if empty)."""
    _check_maps(pred, gt, mask)
    err = angular_error_deg(pred.detach(), gt.detach(), dim=1)
    w = (mask > 0).to(err.dtype)
    n = w.sum(dim=(1, 2))
    return torch.where(n > 0, (err * w).sum(dim=(1, 2)) / n.clamp_min(1.0),
                       torch.full_like(n, float("nan")))
