"""Normal integration baselines and fallbacks under the perspective camera.

Three ways to turn a normal map into depth, next to the method's own eq. 7 solver
(:mod:`faceps.optimize.heightfield`):

- :func:`integrate_wls`: weighted least squares on a staggered grid (the formulation of
  the WLS paper, ``papers/monocular-head-normal-integration-wls.txt`` eq. 5-8), applied to
  the *log-depth* gradients of a perspective camera.
- :func:`integrate_frankot_chellappa`: projection of the same log-depth gradient field onto
  integrable surfaces with the FFT (Frankot & Chellappa).
- :func:`integrate_adam_facepsnet`: the surface-from-normal scheme released with FacePSNet:
  per-pixel depth offsets from the proxy depth, optimised with Adam.

Perspective gradients: a pixel (u, v) at depth z lies at ``V = z r`` with
``r = K^-1 (u, v, 1)``. A tangent direction satisfies ``n . dV = 0``, so for
``h = log z``:

    dh/du = -(n . k_u) / (n . r),    dh/dv = -(n . k_v) / (n . r),

with ``k_u, k_v`` the first two columns of ``K^-1`` (``(1/fx, 0, 0)`` and
``(-s/(fx fy), 1/fy, 0)``). These are exact for any surface and depend on the normal only,
so the integrated log-depth is determined up to one additive constant per connected part of
the mask, i.e. the depth up to one scale factor per part. That factor comes from
``depth0`` (the median of ``depth0 / z`` over the part) or, without ``depth0``, from a
documented default distance (the part's median depth is set to ``distance`` mm).

Pixels whose normal is within ~0.6 degrees of perpendicular to the viewing ray
(``n . r / |r| > -0.01``, including back-facing normals) give no gradient.

All functions take and return maps in the DESIGN.md conventions: mm, OpenCV camera frame,
unit normals facing the camera (n_z < 0), float32 outputs with NaN outside the mask;
float64 inside the least-squares solvers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FitError, ShapeError, check_shape
from faceps.optimize.heightfield import _check_prior_depth, _pcg, _v_cycle

log = logging.getLogger(__name__)

__all__ = [
    "IntegrationResult",
    "log_depth_gradients",
    "integrate_wls",
    "integrate_frankot_chellappa",
    "integrate_adam_facepsnet",
]

#: minimum of -n . r / |r| for a usable gradient (cosine of ~89.4 degrees)
_MIN_FACING = 0.01
#: WLS weight of the zero-gradient edges between two pixels without a gradient
_HOLE_WEIGHT = 1e-3


@dataclass
class IntegrationResult:
    """Depth recovered by an integration method.

    Attributes:
        depth: (H, W) float32 z in mm; NaN outside the mask.
        method: ``wls``, ``frankot-chellappa`` or ``adam-facepsnet``.
        iterations: CG iterations (``wls``), 0 (``frankot-chellappa``) or Adam steps.
        time: wall-clock seconds of the call.
        history: per-method trace: the Adam loss every ``log_every`` steps; empty for the
            others.
    """

    depth: np.ndarray
    method: str
    iterations: int
    time: float
    history: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs
def _check_inputs(normals, mask, camera, depth0=None, weights=None, depth0_required=False):
    """Shared validation; returns (N (H, W, 3) float64 unit or 0, mask, Z0 or None,
    weights (H, W) float64 or None)."""
    if not isinstance(camera, Camera):
        raise ShapeError(f"expected camera to be a faceps.core.camera.Camera; "
                         f"got {type(camera).__name__}")
    H, W = camera.height, camera.width
    check_shape(normals, "normals", (H, W, 3))
    check_shape(mask, "mask", (H, W))
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ShapeError(f"expected mask to be a bool array; got dtype {mask.dtype}")
    if not mask.any():
        raise FitError("the mask is empty: no pixel to integrate")
    Z0 = None
    if depth0 is None:
        if depth0_required:
            raise ShapeError("depth0 is required")
    else:
        check_shape(depth0, "depth0", (H, W))
        Z0 = np.asarray(depth0, np.float64)
        _check_prior_depth(Z0[mask])
    C = None
    if weights is not None:
        check_shape(weights, "weights", (H, W))
        C = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(C[mask])) or np.any(C[mask] < 0):
            raise ShapeError("weights must be finite and >= 0 on the mask")
    N = np.asarray(normals, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        nrm = np.sqrt(np.einsum("hwc,hwc->hw", N, N))
    has = mask & np.isfinite(nrm) & (nrm > 1e-6)
    if not has.any():
        raise FitError("no pixel of the mask has a normal")
    N = np.where(has[..., None], N / np.where(has, nrm, 1.0)[..., None], 0.0)
    return N, mask, Z0, C


def log_depth_gradients(normals: np.ndarray, camera: Camera,
                        mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel gradients of log-depth implied by normals under the perspective camera.

    Args:
        normals: (H, W, 3) unit normals in the camera frame (facing the camera).
        camera: the camera, image_size (W, H).
        mask: optional (H, W) bool; default: finite normals.

    Returns:
        (p, q): two (H, W) float64 maps, d log z / du and d log z / dv (per pixel); NaN
        outside the mask and where the normal is (nearly) perpendicular to the ray or
        faces away.
    """
    H, W = camera.height, camera.width
    check_shape(normals, "normals", (H, W, 3))
    N = np.asarray(normals, np.float64)
    ok = np.all(np.isfinite(N), axis=-1)
    if mask is not None:
        check_shape(mask, "mask", (H, W))
        ok &= np.asarray(mask, bool)
    Kinv = np.linalg.inv(camera.K)
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    r = [Kinv[i, 0] * u + Kinv[i, 1] * v + Kinv[i, 2] for i in range(3)]
    Nz = np.where(ok[..., None], N, 0.0)
    nr = Nz[..., 0] * r[0] + Nz[..., 1] * r[1] + Nz[..., 2] * r[2]
    rn = np.sqrt(r[0] ** 2 + r[1] ** 2 + r[2] ** 2)
    ok &= nr < -_MIN_FACING * rn
    den = np.where(ok, nr, -1.0)
    p = -(Nz[..., 0] * Kinv[0, 0] + Nz[..., 1] * Kinv[1, 0] + Nz[..., 2] * Kinv[2, 0]) / den
    q = -(Nz[..., 0] * Kinv[0, 1] + Nz[..., 1] * Kinv[1, 1] + Nz[..., 2] * Kinv[2, 1]) / den
    return np.where(ok, p, np.nan), np.where(ok, q, np.nan)


def _fix_scale(h: np.ndarray, mask: np.ndarray, Z0: np.ndarray | None, distance: float,
               labels: np.ndarray | None = None) -> np.ndarray:
    """Shift log-depth h per connected part: by median(log z0 - h) with a prior depth,
    else so that the part's median depth is ``distance``.

    Args:
        h: (H, W) log-depth (any constant per part).
        mask: (H, W) bool.
        Z0: optional (H, W) prior depth in mm.
        distance: median depth of a part without a prior, mm.
        labels: optional (H, W) int part labels 1..count (0 outside); default: the
            4-connected parts of the mask.

    Returns:
        (H, W) float64 depth in mm, NaN outside the mask.
    """
    if labels is None:
        labels, count = ndimage.label(mask)
    else:
        count = int(labels.max())
    idx = np.arange(1, count + 1)
    target = np.log(Z0) if Z0 is not None else np.full(mask.shape, np.log(distance))
    diff = np.where(mask, target - h, 0.0) if Z0 is not None else np.where(mask, -h, 0.0)
    shift = np.atleast_1d(ndimage.median(diff, labels, idx))
    if Z0 is None:
        shift = shift + np.log(distance)
    per_pixel = np.concatenate([[0.0], shift])[labels]
    return np.where(mask, np.exp(h + per_pixel), np.nan)


# ------------------------------------------------------------------------------ WLS
def integrate_wls(normals: np.ndarray, mask: np.ndarray, camera: Camera,
                  weights: np.ndarray | None = None, depth0: np.ndarray | None = None, *,
                  gradient_magnitude: np.ndarray | None = None, lam: float = 0.1,
                  prior: float = 0.0, distance: float = 500.0, solver: str = "amg-cg",
                  rtol: float = 1e-6, maxiter: int = 1000) -> IntegrationResult:
    """Weighted least-squares integration of the log-depth gradient field.

    Minimises over the log-depth h of the mask pixels (WLS paper eq. 7-8, perspective)

        sum_(u+1/2,v) w (h_(u+1,v) - h_(u,v) - p_(u+1/2,v))^2
      + sum_(u,v+1/2) w (h_(u,v+1) - h_(u,v) - q_(u,v+1/2))^2
      + prior * sum (h - log z0)^2

    over the edges between 4-neighbours of the mask, with the staggered gradient the mean
    of the two pixels' (:func:`log_depth_gradients`) and the edge weight the mean of their
    weights. Per-pixel weights are ``weights`` (default 1) times
    ``1 / (1 + lam * gradient_magnitude)`` when a gradient-magnitude map is given (the
    paper's eq. 6; lam = 0.1 is its optimum). A pixel without a gradient (no normal, a
    grazing normal or weight 0) is left out of the means; an edge between two such pixels
    asks for a zero gradient with weight 1e-3, which fills holes smoothly.

    Args:
        normals: (H, W, 3) unit normals (camera frame, facing the camera); NaN where none.
        mask: (H, W) bool region to integrate.
        camera: the (undistorted) camera, image_size (W, H).
        weights: optional (H, W) per-pixel confidence >= 0.
        depth0: optional (H, W) depth in mm (finite, > 0 on the mask) fixing the scale:
            per connected part, the depth is scaled by the median of depth0 / z, or, with
            ``prior > 0``, held by the prior term.
        gradient_magnitude: optional (H, W) map W >= 0 (e.g. a predicted |grad depth|).
        lam: lambda of the paper's weight 1 / (1 + lam W).
        prior: weight per pixel of (log z - log z0)^2 (needs depth0), against the squared
            log-depth differences per edge (~1e-6 for a face at 0.2 mm per pixel, so
            1e-6 is already a firm prior); 0: no prior term, scale by the median only.
        distance: median depth in mm of each connected part when there is no depth0.
        solver: ``amg-cg`` (CG preconditioned by pyamg classical AMG) or ``direct``
            (scipy ``spsolve``).
        rtol, maxiter: CG stopping rule (relative residual, iterations).

    Returns:
        :class:`IntegrationResult` (method ``wls``).
    """
    t0 = time.perf_counter()
    N, mask, Z0, C = _check_inputs(normals, mask, camera, depth0, weights)
    if solver not in ("amg-cg", "direct"):
        raise ConfigError(f"solver must be 'amg-cg' or 'direct'; got {solver!r}")
    if not (lam >= 0) or not (prior >= 0) or not (distance > 0):
        raise ConfigError(f"need lam >= 0, prior >= 0 and distance > 0; got {lam}, {prior}, "
                          f"{distance}")
    if prior > 0 and Z0 is None:
        raise ConfigError("prior > 0 needs depth0")
    w = np.ones(mask.shape) if C is None else C.copy()
    if gradient_magnitude is not None:
        check_shape(gradient_magnitude, "gradient_magnitude", mask.shape)
        Wm = np.asarray(gradient_magnitude, np.float64)
        if not np.all(np.isfinite(Wm[mask])) or np.any(Wm[mask] < 0):
            raise ShapeError("gradient_magnitude must be finite and >= 0 on the mask")
        w = w / (1.0 + lam * np.where(mask, Wm, 0.0))
    p, q = log_depth_gradients(np.where(mask[..., None], N, np.nan), camera, mask)
    M = int(mask.sum())
    index = np.full(mask.shape, -1, np.int64)
    index[mask] = np.arange(M)
    rows, cols, vals, rhs, wts = [], [], [], [], []
    k = 0
    for g, axis in ((p, 1), (q, 0)):
        a = (slice(None), slice(0, -1)) if axis == 1 else (slice(0, -1), slice(None))
        b = (slice(None), slice(1, None)) if axis == 1 else (slice(1, None), slice(None))
        # an edge between two mask pixels uses the gradients (and weights) of the ends
        # that have one; without any, a weak zero-gradient term fills the hole
        fa = np.isfinite(g[a]) & (w[a] > 0)
        fb = np.isfinite(g[b]) & (w[b] > 0)
        cnt = fa.astype(np.float64) + fb
        ok = mask[a] & mask[b]
        safe = np.maximum(cnt, 1.0)
        t_e = (np.where(fa, g[a], 0.0) + np.where(fb, g[b], 0.0)) / safe
        w_e = np.where(cnt > 0, (np.where(fa, w[a], 0.0) + np.where(fb, w[b], 0.0)) / safe,
                       _HOLE_WEIGHT)
        ia, ib = index[a][ok], index[b][ok]
        n_e = ia.size
        e = np.arange(k, k + n_e)
        rows += [e, e]
        cols += [ia, ib]
        vals += [-np.ones(n_e), np.ones(n_e)]
        rhs.append(t_e[ok])
        wts.append(w_e[ok])
        k += n_e
    if k == 0:
        raise FitError("no two neighbouring mask pixels to integrate between")
    if not np.any(np.isfinite(p) | np.isfinite(q)):
        raise FitError("no mask pixel has a normal facing the camera")
    D = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(k, M))
    wt = np.concatenate(wts)
    t = np.concatenate(rhs)
    A = (D.T @ sp.diags(wt) @ D).tocsr()
    b = D.T @ (wt * t)
    diag_mean = float(A.diagonal().mean())
    if prior > 0:
        A = A + prior * sp.identity(M, format="csr")
        b = b + prior * np.log(Z0[mask])
    else:
        # the constant per part is free: a tiny anchor keeps the system definite
        A = A + 1e-10 * diag_mean * sp.identity(M, format="csr")
    A = A.tocsr()
    if solver == "direct":
        h, iterations = spla.spsolve(A.tocsc(), b), 0
    else:
        h, iterations = _amg_cg(A, b, rtol, maxiter)
    H = np.zeros(mask.shape)
    H[mask] = h
    if prior > 0:
        depth = np.where(mask, np.exp(H), np.nan)
    else:
        # parts connected by edges (pixels without any edge are their own part)
        _, part = connected_components(A, directed=False)
        labels = np.zeros(mask.shape, np.int64)
        labels[mask] = part + 1
        depth = _fix_scale(H, mask, Z0, distance, labels)
    return IntegrationResult(depth=depth.astype(np.float32), method="wls",
                             iterations=int(iterations), time=time.perf_counter() - t0)


def _amg_cg(A: sp.csr_matrix, b: np.ndarray, rtol: float, maxiter: int):
    """CG preconditioned by one V-cycle of pyamg classical (Ruge-Stueben) AMG, which suits
    the weighted graph Laplacian (an M-matrix): on a 330k-pixel face it sets up in ~0.3 s
    and converges to 1e-6 in ~6 iterations, where smoothed aggregation needs ~15x longer
    to set up. Returns (x, iterations)."""
    import pyamg

    ml = pyamg.ruge_stuben_solver(A, max_coarse=300, coarse_solver="splu")
    x, it = _pcg(A, b, None, _v_cycle(ml), rtol, maxiter)
    if it >= maxiter:
        log.warning("WLS integration: CG stopped after %d iterations above rtol %.1e",
                    it, rtol)
    return x, it


# --------------------------------------------------------------- Frankot-Chellappa
def integrate_frankot_chellappa(normals: np.ndarray, mask: np.ndarray, camera: Camera,
                                depth0: np.ndarray | None = None, *, distance: float = 500.0,
                                pad: float = 0.25) -> IntegrationResult:
    """Frankot-Chellappa integration of the perspective log-depth gradient field.

    The log-depth gradients (:func:`log_depth_gradients`) are set to zero outside the mask
    and where missing, the bounding box of the mask is padded by ``pad`` of its size on
    each side (zero gradients: the surface continues flat, which keeps the periodic FFT
    wrap-around away from the face), and the field is projected onto integrable surfaces:
    ``H = (-i wu P - i wv Q) / (wu^2 + wv^2)`` with ``w = 2 pi k / n`` (the mean of h is
    free). The scale per connected part comes from ``depth0`` (median of depth0 / z) or
    ``distance`` as in :func:`integrate_wls`.

    Args:
        normals: (H, W, 3) unit normals (camera frame, facing the camera); NaN where none.
        mask: (H, W) bool region.
        camera: the (undistorted) camera, image_size (W, H).
        depth0: optional (H, W) depth in mm fixing the scale.
        distance: median depth in mm of each part without depth0.
        pad: padding of the bounding box, as a fraction of its size per side.

    Returns:
        :class:`IntegrationResult` (method ``frankot-chellappa``).
    """
    t0 = time.perf_counter()
    N, mask, Z0, _ = _check_inputs(normals, mask, camera, depth0)
    if not (pad >= 0) or not (distance > 0):
        raise ConfigError(f"need pad >= 0 and distance > 0; got {pad}, {distance}")
    from scipy import fft

    p, q = log_depth_gradients(np.where(mask[..., None], N, np.nan), camera, mask)
    p = np.nan_to_num(p, nan=0.0)
    q = np.nan_to_num(q, nan=0.0)
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    ph, pw = int(np.ceil(pad * (r1 - r0))) + 1, int(np.ceil(pad * (c1 - c0))) + 1
    nh = fft.next_fast_len(r1 - r0 + 2 * ph, real=True)
    nw = fft.next_fast_len(c1 - c0 + 2 * pw, real=True)
    P = np.zeros((nh, nw))
    Q = np.zeros((nh, nw))
    P[ph:ph + r1 - r0, pw:pw + c1 - c0] = p[r0:r1, c0:c1]
    Q[ph:ph + r1 - r0, pw:pw + c1 - c0] = q[r0:r1, c0:c1]
    wu = 2 * np.pi * fft.rfftfreq(nw)[None, :]
    wv = 2 * np.pi * fft.fftfreq(nh)[:, None]
    den = wu ** 2 + wv ** 2
    den[0, 0] = 1.0
    Hf = (-1j * wu * fft.rfft2(P) - 1j * wv * fft.rfft2(Q)) / den
    Hf[0, 0] = 0.0
    h_box = fft.irfft2(Hf, s=(nh, nw))
    Hmap = np.zeros(mask.shape)
    Hmap[r0:r1, c0:c1] = h_box[ph:ph + r1 - r0, pw:pw + c1 - c0]
    depth = _fix_scale(Hmap, mask, Z0, distance)
    return IntegrationResult(depth=depth.astype(np.float32), method="frankot-chellappa",
                             iterations=0, time=time.perf_counter() - t0)


# ------------------------------------------------------------------ FacePSNet + Adam
def integrate_adam_facepsnet(normals: np.ndarray, depth0: np.ndarray, mask: np.ndarray,
                             camera: Camera, iterations: int = 30000, lr: float = 0.1, *,
                             smooth_weight: float = 12.0, offset_weight: float = 0.0005,
                             device: str = "cpu", dtype: str = "float32",
                             log_every: int | None = None) -> IntegrationResult:
    """The surface-from-normal scheme released with FacePSNet, as a baseline.

    Per-pixel depth offsets d (mm, start 0) on the proxy depth, ``z = depth0 + d``, are
    optimised with Adam (``lr`` mm) on

        smooth_weight * MSE(z, mean of its 4 neighbours)
      + MSE(eq. 7 normals of z, target normals)
      + offset_weight * mean(d^2)

    where the smoothness term runs over the mask pixels whose four neighbours are in the
    mask, the normal term over those that also have a target normal (normals by the
    interior form of eq. 7, ``normalise((V_r - V_l) x (V_u - V_d))``; MSE averages the
    three components), and the offset term over the mask.

    Args:
        normals: (H, W, 3) unit target normals (camera frame, facing the camera).
        depth0: (H, W) proxy depth in mm, finite and > 0 on the mask.
        mask: (H, W) bool region.
        camera: the (undistorted) camera, image_size (W, H).
        iterations: Adam steps (30000 in the released scheme).
        lr: Adam learning rate (mm per step, roughly).
        smooth_weight, offset_weight: the loss weights of the released scheme.
        device: torch device.
        dtype: ``float32`` (as released) or ``float64``.
        log_every: record the loss every this many steps (default: iterations // 100).

    Returns:
        :class:`IntegrationResult` (method ``adam-facepsnet``; ``history``: the loss).
    """
    import torch

    t0 = time.perf_counter()
    N, mask, Z0, _ = _check_inputs(normals, mask, camera, depth0, depth0_required=True)
    if int(iterations) < 0 or not (lr > 0):
        raise ConfigError(f"need iterations >= 0 and lr > 0; got {iterations}, {lr}")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    tdt = getattr(torch, dtype)
    rows, cols = np.nonzero(mask)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, mask.shape[0])
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, mask.shape[1])
    m = mask[r0:r1, c0:c1]
    interior = np.zeros_like(m)
    interior[1:-1, 1:-1] = (m[1:-1, 1:-1] & m[1:-1, 2:] & m[1:-1, :-2] & m[2:, 1:-1]
                            & m[:-2, 1:-1])
    n_box = N[r0:r1, c0:c1]
    has_n = interior & (np.einsum("hwc,hwc->hw", n_box, n_box) > 0.5)
    if not has_n.any():
        raise FitError("no mask pixel has four neighbours in the mask and a target normal")
    Kinv = np.linalg.inv(camera.K)
    u, v = np.meshgrid(np.arange(c0, c1, dtype=np.float64),
                       np.arange(r0, r1, dtype=np.float64))
    rays = np.stack([Kinv[i, 0] * u + Kinv[i, 1] * v + Kinv[i, 2] for i in range(3)])

    def T(x):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=tdt, device=device)

    # dense masked sums (no boolean indexing inside the loop); the normal and smoothness
    # terms live on the box interior [1:-1, 1:-1]
    z0 = T(np.where(m, Z0[r0:r1, c0:c1], 0.0))
    R = T(rays)                                               # (3, h, w)
    w_mask = T(m) / float(m.sum())
    w_smooth = T(interior[1:-1, 1:-1]) / float(interior.sum())
    w_normal = T(has_n[1:-1, 1:-1]) / (3.0 * float(has_n.sum()))
    target = T(np.moveaxis(np.where(has_n[..., None], n_box, 0.0), -1, 0)[:, 1:-1, 1:-1])
    offset = torch.zeros_like(z0, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=lr)
    every = max(1, int(iterations) // 100) if log_every is None else max(1, int(log_every))
    history: list[float] = []
    m_t = T(m)

    def loss_fn():
        z = z0 + offset * m_t
        zc = z[1:-1, 1:-1]
        mean4 = 0.25 * (z[1:-1, 2:] + z[1:-1, :-2] + z[2:, 1:-1] + z[:-2, 1:-1])
        smooth = torch.sum((zc - mean4) ** 2 * w_smooth)
        V = z[None] * R
        a = V[:, 1:-1, 2:] - V[:, 1:-1, :-2]                 # V_right - V_left
        b = V[:, :-2, 1:-1] - V[:, 2:, 1:-1]                 # V_up - V_down
        s = torch.linalg.cross(a, b, dim=0)
        n = s / torch.linalg.vector_norm(s, dim=0, keepdim=True).clamp_min(1e-12)
        normal = torch.sum((n - target) ** 2 * w_normal)
        reg = torch.sum(offset ** 2 * w_mask)
        return smooth_weight * smooth + normal + offset_weight * reg

    for it in range(int(iterations)):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        if it % every == 0 or it == int(iterations) - 1:
            history.append(float(loss.detach()))
    with torch.no_grad():
        z = (z0 + offset * m_t).cpu().numpy().astype(np.float64)
    depth = np.full(mask.shape, np.nan)
    depth[r0:r1, c0:c1] = np.where(m, z, np.nan)
    return IntegrationResult(depth=depth.astype(np.float32), method="adam-facepsnet",
                             iterations=int(iterations), time=time.perf_counter() - t0,
                             history=history)
