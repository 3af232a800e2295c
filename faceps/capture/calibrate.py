"""Near point-light calibration: proxy-guided self-calibration and target-based calibration.

Both methods fit the imaging model of DESIGN.md (paper eq. 1)::

    I_jc(V) = rho_c(V) * beta_jc * max(0, n . (P_j - V)) / |P_j - V|^3 * led_j(V)

for light positions P_j (mm, camera frame) and RGB intensities beta_j.

**Proxy-guided self-calibration** (:func:`calibrate_from_proxy`, after Cao et al., CVPR 2018,
ref. [9] of the paper, section 3.2): the geometry comes from a coarse face model (the proxy)
fitted beforehand, the albedo is unknown per surface point. A few thousand well-spread proxy
pixels are sampled; per light, observations that are saturated, darker than a noise floor or
in attached shadow (or grazing) under the current light estimate are excluded. The per-sample
RGB albedo is eliminated in closed form (variable projection)::

    rho_ic = sum_j w_ijc I_ijc s_ijc / sum_j w_ijc s_ijc^2,   s_ijc = beta_jc g_ij,
    g_ij = max(0, n_i . (P_j - V_i)) / |P_j - V_i|^3

so the reduced residuals ``sqrt(w_ijc) (I_ijc - rho_ic s_ijc)`` depend on the light parameters
only. They are minimised with Ceres (Levenberg-Marquardt, analytic Jacobian of the reduced
residuals) inside an iteratively reweighted loop: Cauchy (or Huber) weights from the robust
scale of the residuals, and exclusion masks recomputed from the current estimate. Residuals are
relative: each sample's are divided by its mean intensity, so dark and bright skin count alike.

*Gauge.* Images fix ``rho_ic * beta_jc`` only, so each colour channel has one free scale
shared by the albedo and the intensities. The returned intensities fix it like this: the
channel ratios of ``sum_j beta_jc`` equal those of the initial lights when ``init`` is given,
else they are equal (the lights are white on average, the albedo carries the colour); the
overall scale makes the median of the channel-mean sample albedo equal
``CalibrationConfig.albedo_median`` (0.5). Only the relative intensities within a channel
(light to light) are determined by the images.

**Target-based calibration** (:func:`calibrate_from_target`): images of a matte sphere or
plane of known pose per image set, with known albedo (absolute intensities) or an unknown
constant albedo (intensities relative: the albedo is taken as 1). Per-pixel geometry comes
from ray-sphere / ray-plane intersection. The lights are independent given the geometry and
albedo, so each is solved on its own: position and intensity, and with enough poses the LED
axis and anisotropy exponent mu.

Initialisation without given lights is a coarse search per light over directions on the
hemisphere in front of the surface and distances from its centroid, scoring a constant-albedo
single-light model, followed by a finer search around the best candidate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyceres

from faceps.capture.session import keeps_clipped_channels
from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FitError, ShapeError, check_finite, check_shape
from faceps.core.lights import PointLights

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "SphereTarget",
    "PlaneTarget",
    "calibrate_from_proxy",
    "calibrate_from_target",
    "target_geometry",
    "sample_pixels",
    "reduced_residuals",
]

log = logging.getLogger(__name__)

#: tuning constants of the robust weights (95 % efficiency for Gaussian noise)
_ROBUST_CONSTANT = {"cauchy": 2.3849, "huber": 1.345, "none": np.inf}
#: MAD to standard deviation for Gaussian noise
_MAD_TO_STD = 1.4826
#: smallest robust scale of relative residuals (noise-free data)
_MIN_SIGMA = 1e-6


# ===================================================================== config / result
@dataclass(frozen=True)
class CalibrationConfig:
    """Options of both calibration methods.

    Attributes:
        n_samples: pixels sampled from the proxy (a regular spread over the valid region);
            for targets, the number sampled per pose.
        dark_fraction: noise floor as a fraction of the 99th percentile of the sampled
            channel-mean intensities (all lights); darker observations are excluded.
        dark_level: absolute noise floor in image units; overrides ``dark_fraction``.
        min_cos: observations with ``cos(n, P - V) <= min_cos`` under the current estimate
            are excluded (attached shadow and grazing light, where proxy normal errors
            dominate).
        specular_deg: observations whose half-vector (between the directions to the light
            and to the camera) lies within this angle of the normal under the current
            estimate are excluded (the zone of specular highlights; 0: keep them).
        loss: robust loss of the reweighting: ``cauchy``, ``huber`` or ``none``.
        outer_iterations: reweighting / re-masking rounds (each one Ceres solve).
        max_iterations: Ceres iterations per solve.
        search_directions: candidate directions of the initial search (hemisphere).
        search_distances: candidate distances (mm) from the surface centroid.
        albedo_median: the median channel-mean albedo the self-calibration scales to.
        min_inliers: fewer inlier samples for a light raises a warning.
        max_condition: larger condition numbers (column-scaled Jacobian) raise a warning.
        grazing_deg: lights whose elevation above the fitted surface plane (seen from the
            centroid) is below this angle raise a warning.
        position_tolerance: outer-loop convergence: largest position change in mm (or a
            relative change of the final cost below 1e-3 between two rounds).
        settle_tolerance: a self-calibration whose last round still moved a light by more
            than ``position_tolerance`` but by at most this many mm is reported as
            converged (no warning): the reweighting rounds approach their end point
            slowly, 0.3-0.5 mm per round after ten rounds on 1600x1200 sessions, far
            below how well the data fix a position (tens of mm along the view).
    """

    n_samples: int = 8000
    dark_fraction: float = 0.02
    dark_level: float | None = None
    min_cos: float = 0.1
    specular_deg: float = 25.0
    loss: str = "cauchy"
    outer_iterations: int = 10
    max_iterations: int = 50
    search_directions: int = 600
    search_distances: tuple[float, ...] = (250.0, 300.0, 350.0, 400.0, 475.0, 550.0, 600.0)
    albedo_median: float = 0.5
    min_inliers: int = 100
    max_condition: float = 1e4
    grazing_deg: float = 10.0
    position_tolerance: float = 0.1
    settle_tolerance: float = 1.0

    def __post_init__(self) -> None:
        if self.n_samples < 10:
            raise ConfigError(f"n_samples must be >= 10; got {self.n_samples}")
        if not 0 <= self.dark_fraction < 1:
            raise ConfigError(f"dark_fraction must be in [0, 1); got {self.dark_fraction}")
        if self.dark_level is not None and self.dark_level < 0:
            raise ConfigError(f"dark_level must be >= 0; got {self.dark_level}")
        if not 0 <= self.specular_deg < 90:
            raise ConfigError(f"specular_deg must be in [0, 90); got {self.specular_deg}")
        if not -1 < self.min_cos < 1:
            raise ConfigError(f"min_cos must be in (-1, 1); got {self.min_cos}")
        if self.loss not in _ROBUST_CONSTANT:
            raise ConfigError(f"loss must be one of {sorted(_ROBUST_CONSTANT)}; got {self.loss!r}")
        if self.outer_iterations < 1 or self.max_iterations < 1:
            raise ConfigError("outer_iterations and max_iterations must be >= 1")
        if self.search_directions < 10 or not self.search_distances:
            raise ConfigError("the search needs >= 10 directions and at least one distance")
        if min(self.search_distances) <= 0:
            raise ConfigError("search_distances must be positive")
        if self.albedo_median <= 0:
            raise ConfigError("albedo_median must be > 0")
        if not (self.position_tolerance > 0 and self.settle_tolerance >= 0):
            raise ConfigError("position_tolerance must be > 0 and settle_tolerance >= 0")


@dataclass
class CalibrationResult:
    """Calibrated lights and how well they are determined.

    Attributes:
        lights: the L calibrated point lights (positions in mm, camera frame; intensities in
            image units x mm^2, see the module docstring for their gauge).
        rms: RMS of the inlier residuals relative to each sample's mean intensity.
        inliers: (L,) int number of inlier observations per light (used, robust weight
            >= 0.5).
        condition: condition number of the column-scaled Jacobian of the final problem
            (the square root of that of J^T J; the largest over lights for targets).
        position_std: (L, 3) float64 standard deviation of the positions (mm) from the
            inverse Gauss-Newton matrix, scaled by the residual variance.
        converged: True when every Ceres solve converged and the outer loop settled.
        iterations: Ceres iterations over all solves.
        cost_history: final cost of each Ceres solve, in order.
        warnings: human-readable warnings (geometry, conditioning, data).
        timings: seconds per stage (``sampling``, ``search``, ``refine``, ``total``).
        n_samples: surface samples used.
    """

    lights: PointLights
    rms: float
    inliers: np.ndarray
    condition: float
    position_std: np.ndarray
    converged: bool
    iterations: int
    cost_history: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0


# ===================================================================== sampling
def sample_pixels(valid: np.ndarray, n: int) -> np.ndarray:
    """Deterministic, well-spread pixel sample of a region.

    Takes the valid pixels of the coarsest regular grid that still holds at least ``n`` of
    them, then an evenly spaced subset in raster order.

    Args:
        valid: (H, W) bool region.
        n: number of pixels wanted.

    Returns:
        (m,) int64 flat (row-major) pixel indices, m = min(n, number of valid pixels),
        sorted.
    """
    valid = np.asarray(valid, dtype=bool)
    check_shape(valid, "valid", (None, None))
    count = int(valid.sum())
    if count <= n:
        return np.flatnonzero(valid)
    H, W = valid.shape
    stride = max(1, int(np.floor(np.sqrt(count / n))))
    while stride > 1:
        grid = np.zeros_like(valid)
        off = stride // 2
        grid[off::stride, off::stride] = True
        if int((grid & valid).sum()) >= n:
            break
        stride -= 1
    else:
        grid = np.ones_like(valid)
    idx = np.flatnonzero(grid & valid)
    pick = np.round(np.linspace(0, idx.size - 1, n)).astype(np.int64)
    return idx[np.unique(pick)]


def _dark_floor(y: np.ndarray, config: CalibrationConfig) -> float:
    """Noise floor (image units) from channel-mean intensities ``y`` of all lights."""
    if config.dark_level is not None:
        return float(config.dark_level)
    finite = y[np.isfinite(y)]
    if finite.size == 0:
        return 0.0
    return float(config.dark_fraction * np.percentile(finite, 99.0))


def _fibonacci_hemisphere(n: int, axis: np.ndarray, max_angle_deg: float = 88.0) -> np.ndarray:
    """(m, 3) unit directions spread over the cap of half-angle ``max_angle_deg`` about
    ``axis`` (a Fibonacci lattice of about n points)."""
    axis = axis / np.linalg.norm(axis)
    cmin = np.cos(np.radians(max_angle_deg))
    k = np.arange(n) + 0.5
    z = 1.0 - k / n * (1.0 - cmin)
    phi = np.pi * (1.0 + np.sqrt(5.0)) * k
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    local = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    e1, e2 = _orthonormal_basis(axis)
    return local[:, :1] * e1 + local[:, 1:2] * e2 + local[:, 2:3] * axis


def _orthonormal_basis(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing ``axis`` (unit) to a right-handed orthonormal basis."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(axis, e1)


def _geometry_factor(points: np.ndarray, normals: np.ndarray, positions: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """g = max(0, n.(P - V))/|P - V|^3 and cos(n, P - V) for candidate positions.

    Args:
        points, normals: (N, 3).
        positions: (C, 3).

    Returns:
        g (C, N) and cos (C, N).
    """
    nd = positions @ normals.T - np.einsum("nk,nk->n", points, normals)[None]
    dist2 = ((positions**2).sum(1)[:, None] - 2.0 * positions @ points.T
             + (points**2).sum(1)[None])
    dist = np.sqrt(np.maximum(dist2, 1e-18))
    g = np.maximum(nd, 0.0) / dist**3
    return g, nd / dist


_SEARCH_CHUNK = 128  # candidates per block of the initial search


def _search_position(points: np.ndarray, normals: np.ndarray, y: np.ndarray, ok: np.ndarray,
                     config: CalibrationConfig, max_points: int = 1500) -> np.ndarray:
    """Initial position of one light from its image alone (constant albedo).

    Candidates: directions on the hemisphere the surface faces (about its mean normal) times
    the configured distances from the centroid, then a finer grid around the best one. Each
    candidate is scored by the truncated relative residual of ``y ~ k g`` with the best
    scale k.

    Args:
        points, normals: (N, 3) samples (mm, unit).
        y: (N,) channel-mean intensity of this light (divided by a known albedo if any).
        ok: (N,) bool usable observations (not saturated; dark ones count as shadow).
        config: options (directions, distances).
        max_points: the search uses at most this many samples (evenly spaced).

    Returns:
        (3,) position in mm.
    """
    sel = np.flatnonzero(ok)
    if sel.size > max_points:
        sel = sel[np.round(np.linspace(0, sel.size - 1, max_points)).astype(int)]
    V, N, yy = points[sel], normals[sel], y[sel]
    centre = V.mean(0)
    axis = N.mean(0)
    if np.linalg.norm(axis) < 1e-6:
        axis = -centre
    axis = axis / np.linalg.norm(axis)
    scale = max(float(np.median(np.abs(yy))), 1e-12)

    def score(cands: np.ndarray) -> np.ndarray:
        # in chunks of candidates whose (chunk, N) temporaries stay in the CPU cache:
        # the whole (4200, 1500) search at once spent most of its time faulting in
        # fresh 50 MB arrays
        out = np.empty(cands.shape[0])
        for i in range(0, cands.shape[0], _SEARCH_CHUNK):
            g, _ = _geometry_factor(V, N, cands[i:i + _SEARCH_CHUNK])
            k = (g @ yy) / np.maximum(np.einsum("cn,cn->c", g, g), 1e-30)
            k = np.maximum(k, 0.0)
            r = (yy[None] - k[:, None] * g) / scale
            out[i:i + _SEARCH_CHUNK] = np.minimum(r * r, 1.0).sum(1)
        return out

    dirs = _fibonacci_hemisphere(config.search_directions, axis)
    dists = np.asarray(config.search_distances, dtype=np.float64)
    cands = (centre[None, None] + dists[None, :, None] * dirs[:, None, :]).reshape(-1, 3)
    best = cands[int(np.argmin(score(cands)))]
    # finer search around the best candidate: directions within the coarse spacing
    spacing = np.sqrt(2 * np.pi / config.search_directions)
    for _ in range(2):
        b_dir = best - centre
        b_dist = np.linalg.norm(b_dir)
        b_dir /= b_dist
        e1, e2 = _orthonormal_basis(b_dir)
        t = np.linspace(-spacing, spacing, 7)
        a, b = np.meshgrid(t, t)
        fine = b_dir + a.reshape(-1, 1) * e1 + b.reshape(-1, 1) * e2
        fine /= np.linalg.norm(fine, axis=1, keepdims=True)
        fd = b_dist * np.array([0.85, 0.92, 1.0, 1.08, 1.16])
        cands = (centre[None, None] + fd[None, :, None] * fine[:, None, :]).reshape(-1, 3)
        best = cands[int(np.argmin(score(cands)))]
        spacing /= 3.0
    return best


def _lit_mask(points: np.ndarray, normals: np.ndarray, positions: np.ndarray,
              config: CalibrationConfig) -> np.ndarray:
    """(L, N) observations usable under the light estimate: not grazing or in attached
    shadow (cos > ``min_cos``) and outside the specular zone (half-vector within
    ``specular_deg`` of the normal)."""
    _, cos = _geometry_factor(points, normals, positions)
    ok = cos > config.min_cos
    if config.specular_deg > 0:
        view = -points / np.linalg.norm(points, axis=1, keepdims=True)     # (N, 3)
        to_light = positions[:, None, :] - points[None]                   # (L, N, 3)
        to_light /= np.linalg.norm(to_light, axis=-1, keepdims=True)
        h = to_light + view[None]
        h /= np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
        ndoth = np.einsum("lnk,nk->ln", h, normals)
        ok &= ndoth < np.cos(np.radians(config.specular_deg))
    return ok


# ===================================================================== robust weights
def _robust_weights(e: np.ndarray, used: np.ndarray, loss: str) -> tuple[np.ndarray, float]:
    """IRLS weights of relative residuals ``e`` where ``used``; zero elsewhere.

    Returns:
        weights (same shape as ``e``) and the robust scale (1.4826 MAD).
    """
    vals = np.abs(e[used])
    sigma = max(_MAD_TO_STD * float(np.median(vals)) if vals.size else 0.0, _MIN_SIGMA)
    c = _ROBUST_CONSTANT[loss] * sigma
    a = np.abs(e)
    if loss == "cauchy":
        w = 1.0 / (1.0 + (a / c) ** 2)
    elif loss == "huber":
        w = np.where(a <= c, 1.0, c / np.maximum(a, 1e-300))
    else:
        w = np.ones_like(e)
    return np.where(used, w, 0.0), sigma


# ===================================================================== ceres glue
class _FunctionCost(pyceres.CostFunction):
    """One residual block: ``fun(theta, need_jacobian) -> (r (m,), J (m, p) or None)``."""

    def __init__(self, fun: Callable, n_residuals: int, n_params: int) -> None:
        super().__init__()
        self._fun = fun
        self.set_num_residuals(n_residuals)
        self.set_parameter_block_sizes([n_params])

    def Evaluate(self, parameters, residuals, jacobians):  # noqa: N802 (Ceres API)
        need = jacobians is not None and jacobians[0] is not None
        r, J = self._fun(np.asarray(parameters[0], dtype=np.float64), need)
        if not np.all(np.isfinite(r)):
            return False
        residuals[:] = r
        if need:
            jacobians[0][:] = J.reshape(-1)
        return True


def _solve(fun: Callable, theta: np.ndarray, n_residuals: int, config: CalibrationConfig,
           lower: dict[int, float] | None = None) -> tuple[np.ndarray, pyceres.SolverSummary]:
    """Minimise ``0.5 |fun(theta)|^2`` with Ceres LM; returns the new theta and summary."""
    x = np.array(theta, dtype=np.float64)
    problem = pyceres.Problem()
    problem.add_residual_block(_FunctionCost(fun, n_residuals, x.size), None, [x])
    for i, lo in (lower or {}).items():
        problem.set_parameter_lower_bound(x, i, lo)
    options = pyceres.SolverOptions()
    # 15 parameters against ~10^5 residuals: the normal equations (J^T J is 15 x 15) cost
    # a fraction of a QR of J; the scaled condition numbers here are 40-80 (bench/
    # RESULTS.md), far from where squaring them would matter. Measured on six 1600x1200
    # fits: the calibrations 25 % faster, four of six results identical to the digits.
    options.linear_solver_type = pyceres.LinearSolverType.DENSE_NORMAL_CHOLESKY
    options.max_num_iterations = config.max_iterations
    options.function_tolerance = 1e-10
    options.gradient_tolerance = 1e-14
    options.parameter_tolerance = 1e-10
    options.num_threads = 1
    options.minimizer_progress_to_stdout = False
    options.logging_type = pyceres.LoggingType.SILENT
    summary = pyceres.SolverSummary()
    pyceres.solve(options, problem, summary)
    return x, summary


def _scaled_condition(J: np.ndarray) -> float:
    """Condition number of J with unit-norm columns (inf when rank deficient)."""
    norms = np.linalg.norm(J, axis=0)
    if J.size == 0 or np.any(norms <= 0):
        return float("inf")
    s = np.linalg.svd(J / norms, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def _parameter_std(J: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Standard deviations of the parameters: diag(sigma^2 (J^T J)^-1)^(1/2)."""
    m, p = J.shape
    dof = max(m - p, 1)
    sigma2 = float(r @ r) / dof
    try:
        cov = np.linalg.pinv(J.T @ J) * sigma2
    except np.linalg.LinAlgError:
        return np.full(p, np.inf)
    return np.sqrt(np.maximum(np.diag(cov), 0.0))


# ===================================================================== proxy-guided
def reduced_residuals(theta: np.ndarray, points: np.ndarray, normals: np.ndarray,
                      images: np.ndarray, weights: np.ndarray, need_jacobian: bool = True
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Residuals of the self-calibration with the albedo eliminated (variable projection).

    Parameters ``theta`` = (P_0, ..., P_{L-1}, b_1, ..., b_{L-1}): positions (mm) and the
    log intensities ``b_jc = log beta_jc`` of lights 1..L-1; light 0 has ``b_0 = 0`` (the
    per-channel gauge, see the module docstring).

    Args:
        theta: (3L + 3(L-1),) float64 parameters.
        points: (N, 3) sample positions V_i (mm); normals: (N, 3) unit normals n_i.
        images: (N, L, 3) observed intensities I_ijc.
        weights: (N, L, 3) non-negative weights w_ijc (0: excluded).
        need_jacobian: also return the exact Jacobian of the reduced residuals.

    Returns:
        r (N*L*3,) residuals ``sqrt(w_ijc) (I_ijc - rho_ic s_ijc)`` in (i, j, c) order,
        J (N*L*3, p) or None, and rho (N, 3) the eliminated albedo.
    """
    N, L, _ = images.shape
    P = theta[:3 * L].reshape(L, 3)
    b = np.zeros((L, 3))
    b[1:] = theta[3 * L:].reshape(L - 1, 3)
    beta = np.exp(b)
    d = P[None] - points[:, None, :]                              # (N, L, 3)
    dist = np.maximum(np.linalg.norm(d, axis=-1), 1e-9)            # (N, L)
    nd = np.einsum("nlk,nk->nl", d, normals)
    lit = nd > 0
    g = np.where(lit, nd / dist**3, 0.0)
    s = g[..., None] * beta[None]                                  # (N, L, 3)
    A = np.einsum("nlc,nlc,nlc->nc", weights, images, s)
    B = np.einsum("nlc,nlc,nlc->nc", weights, s, s)
    invB = np.where(B > 0, 1.0 / np.where(B > 0, B, 1.0), 0.0)
    rho = A * invB
    sw = np.sqrt(weights)
    r = sw * (images - rho[:, None, :] * s)
    if not need_jacobian:
        return r.reshape(-1), None, rho
    n_par = theta.size
    J = np.zeros((N, L, 3, n_par))
    G = np.where(lit[..., None], normals[:, None, :] / dist[..., None] ** 3
                 - 3.0 * (nd / dist**5)[..., None] * d, 0.0)       # (N, L, 3) dg/dP
    E = weights * (images - 2.0 * rho[:, None, :] * s)             # (N, L, 3)
    for j in range(L):
        ds = beta[j][None, :, None] * G[:, j, None, :]             # (N, c, k) ds_ijc/dP_jk
        drho = E[:, j, :, None] * ds * invB[..., None]             # (N, c, k)
        blk = -sw[..., None] * s[..., None] * drho[:, None]        # (N, L, c, k)
        blk[:, j] -= sw[:, j, :, None] * ds * rho[..., None]
        J[..., 3 * j:3 * j + 3] = blk
        if j == 0:
            continue
        for c in range(3):
            col = 3 * L + 3 * (j - 1) + c
            drho_c = E[:, j, c] * s[:, j, c] * invB[:, c]          # (N,)
            J[:, :, c, col] = -sw[:, :, c] * s[:, :, c] * drho_c[:, None]
            J[:, j, c, col] -= sw[:, j, c] * s[:, j, c] * rho[:, c]
    return r.reshape(-1), J.reshape(-1, n_par), rho


def _light_geometry_warnings(points: np.ndarray, positions: np.ndarray, names: Sequence[str],
                             grazing_deg: float) -> list[str]:
    """Warnings about lights grazing the (least-squares) plane of the surface samples."""
    centre = points.mean(0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    normal = vt[-1]
    warnings = []
    elev = []
    for name, P in zip(names, positions):
        v = P - centre
        e = np.degrees(np.arcsin(min(1.0, abs(float(v @ normal)) / max(np.linalg.norm(v),
                                                                        1e-12))))
        elev.append(e)
        if e < grazing_deg:
            warnings.append(f"light {name!r} is nearly coplanar with the surface plane "
                            f"({e:.1f} deg elevation < {grazing_deg:g})")
    if len(elev) > 1 and max(elev) < grazing_deg:
        warnings.append("all lights are nearly coplanar with the surface plane: the "
                        "calibration is poorly determined")
    return warnings


def calibrate_from_proxy(images: np.ndarray, points: np.ndarray, normals: np.ndarray,
                         valid: np.ndarray, *, saturated: np.ndarray | None = None,
                         init: PointLights | None = None, names: Sequence[str] | None = None,
                         config: CalibrationConfig = CalibrationConfig()) -> CalibrationResult:
    """Calibrate near point lights from images of a face and its fitted proxy surface.

    See the module docstring for the model, the albedo elimination and the intensity gauge.

    Args:
        images: (L, H, W, 3) linear images, one per light (L >= 2).
        points: (H, W, 3) proxy surface positions in mm (camera frame); NaN outside.
        normals: (H, W, 3) proxy unit normals (camera frame); NaN outside.
        valid: (H, W) bool pixels to use (visible face region of the proxy).
        saturated: optional (L, H, W) bool clipped pixels, excluded per light; or
            (L, H, W, 3) per channel: when at least 2 % of the sampled observations are
            clipped in some channels only, a sample keeps its unclipped channels (the
            initial search still leaves out every sample with a clipped channel).
        init: optional initial lights (e.g. the rig layout); without it a coarse search
            initialises each light. Its LED parameters are ignored (isotropic model); its
            intensities give the colour balance of the result.
        names: L light names (default: those of ``init``, else ``light0``...).
        config: options.

    Returns:
        :class:`CalibrationResult` with isotropic lights.

    Raises:
        ShapeError: for inconsistent shapes.
        FitError: for fewer than two lights or without usable observations.
    """
    t_start = time.perf_counter()
    images = np.asarray(images)
    dims = check_shape(images, "images", ("L", "H", "W", 3))
    L, H, W = dims["L"], dims["H"], dims["W"]
    check_shape(points, "points", (H, W, 3))
    check_shape(normals, "normals", (H, W, 3))
    valid = np.asarray(valid, dtype=bool)
    check_shape(valid, "valid", (H, W))
    if saturated is not None:
        saturated = np.asarray(saturated, dtype=bool)
        check_shape(saturated, "saturated", (L, H, W, 3) if saturated.ndim == 4 else (L, H, W))
    if init is not None and len(init) != L:
        raise ShapeError(f"init has {len(init)} lights; the images have {L}")
    names = _light_names(names, init, L)
    if L < 2:
        raise FitError("self-calibration needs at least two lights: with one image the "
                       "unknown albedo explains any light position")

    # ---------------------------------------------------------------- samples
    pts = np.asarray(points, dtype=np.float64)
    nrm = np.asarray(normals, dtype=np.float64)
    ok_geom = (valid & np.all(np.isfinite(pts), axis=-1) & np.all(np.isfinite(nrm), axis=-1)
               & (np.linalg.norm(np.nan_to_num(nrm), axis=-1) > 0.5))
    idx = sample_pixels(ok_geom, config.n_samples)
    if idx.size < 10:
        raise FitError(f"only {idx.size} valid proxy pixels: no usable data")
    V = pts.reshape(-1, 3)[idx]
    Nn = nrm.reshape(-1, 3)[idx]
    Nn /= np.linalg.norm(Nn, axis=1, keepdims=True)
    I = np.moveaxis(images.reshape(L, -1, 3)[:, idx].astype(np.float64), 0, 1)  # (N, L, 3)
    finite = np.all(np.isfinite(I), axis=-1)
    I = np.where(finite[..., None], I, 0.0)
    chan = np.ones(I.shape)                         # (N, L, 3) 1 where a channel measured
    if saturated is None:
        sat = sat_any = np.zeros((idx.size, L), bool)
    elif saturated.ndim == 4:
        sat_ch = np.moveaxis(saturated.reshape(L, -1, 3)[:, idx], 0, 1)   # (N, L, 3)
        sat_any = sat_ch.any(-1)
        sat = sat_ch.all(-1)                       # a sample is lost with every channel
        if keeps_clipped_channels(sat_ch):
            chan = (~sat_ch).astype(np.float64)
        else:
            sat = sat_any            # a few partly clipped samples: dropped whole, as before
    else:
        sat = sat_any = saturated.reshape(L, -1)[:, idx].T
    y = I.mean(-1)
    dark = _dark_floor(np.where(finite & ~sat_any, y, np.nan), config)
    usable = finite & ~sat & (y > dark)                             # (N, L)
    # the initial search and intensities use the samples without any clipped channel
    clean = usable & ~sat_any
    timings = {"sampling": time.perf_counter() - t_start}
    if usable.sum() < 10:
        raise FitError("no usable observations: every sampled pixel is saturated, dark or "
                       "invalid in every image")
    warnings: list[str] = []

    # ---------------------------------------------------------------- init
    t0 = time.perf_counter()
    if init is not None:
        P0 = init.positions.copy()
        ref_colour = init.intensities.sum(0)
    else:
        P0 = np.stack([_search_position(V, Nn, y[:, j], finite[:, j] & ~sat_any[:, j],
                                        config) for j in range(L)])
        ref_colour = np.ones(3)
    ref_colour = ref_colour / ref_colour.mean() if ref_colour.mean() > 0 else np.ones(3)
    # initial intensities relative to light 0 from the robust albedo of all lights
    g0, _ = _geometry_factor(V, Nn, P0)                              # (L, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = I / (g0.T[..., None])
    ratio = np.where(clean[..., None] & (g0.T[..., None] > 0), ratio, np.nan)
    beta0 = np.nanmedian(ratio, axis=0) if np.any(np.isfinite(ratio)) else np.ones((L, 3))
    beta0 = np.where(np.isfinite(beta0) & (beta0 > 0), beta0, 1.0)
    b0 = np.log(beta0) - np.log(beta0[0])
    theta = np.concatenate([P0.reshape(-1), b0[1:].reshape(-1)])
    timings["search"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- refine
    t0 = time.perf_counter()
    robust = np.ones((idx.size, L, 3))
    history: list[float] = []
    iterations = 0
    converged = False
    all_converged = True
    for outer in range(config.outer_iterations):
        P = theta[:3 * L].reshape(L, 3)
        used = usable & _lit_mask(V, Nn, P, config).T               # (N, L)
        if used.sum() < 10:
            raise FitError("no usable observations: all sampled points are shadowed, dark "
                           "or saturated under the light estimate")
        scale = _sample_scale(I, used, dark)                        # (N,)
        used3 = used[..., None] * chan
        Wt = used3 * robust / scale[:, None, None] ** 2

        def fun(th, need, Wt=Wt):
            r, J, _ = reduced_residuals(th, V, Nn, I, Wt, need)
            return r, J

        new, summary = _solve(fun, theta, Wt.size, config)
        iterations += summary.num_successful_steps + summary.num_unsuccessful_steps
        history.append(float(summary.final_cost))
        all_converged &= summary.termination_type == pyceres.TerminationType.CONVERGENCE
        step = float(np.abs(new[:3 * L] - theta[:3 * L]).max())
        theta = new
        # robust weights from the relative residuals at the new estimate
        r, _, _ = reduced_residuals(theta, V, Nn, I, used3, False)
        e = r.reshape(idx.size, L, 3) / scale[:, None, None]
        robust, _ = _robust_weights(e, used3 > 0, config.loss)
        if outer > 0 and (step < config.position_tolerance
                          or abs(history[-1] - history[-2]) <= 1e-3 * history[-2]):
            converged = True
            break
    else:
        converged = len(history) > 1 and step <= config.settle_tolerance
    timings["refine"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- report
    P = theta[:3 * L].reshape(L, 3)
    used = usable & _lit_mask(V, Nn, P, config).T
    scale = _sample_scale(I, used, dark)
    used3f = used[..., None] * chan
    Wt = used3f * robust / scale[:, None, None] ** 2
    r, J, rho = reduced_residuals(theta, V, Nn, I, Wt, True)
    n_param = theta.size
    condition = _scaled_condition(J)
    pstd = _parameter_std(J, r)[:3 * L].reshape(L, 3)
    r_plain, _, _ = reduced_residuals(theta, V, Nn, I, used3f, False)
    e = r_plain.reshape(idx.size, L, 3) / scale[:, None, None]
    used3 = used3f > 0
    rms = float(np.sqrt(np.mean(e[used3] ** 2))) if used3.any() else float("nan")
    inliers = (((robust >= 0.5) | ~used3).all(-1) & used).sum(0).astype(int)

    beta = np.ones((L, 3))
    beta[1:] = np.exp(theta[3 * L:].reshape(L - 1, 3))
    beta, _ = _fix_gauge(beta, rho, used.any(1), ref_colour, config.albedo_median)
    lights = PointLights(P, beta, names=names)

    warnings += _light_geometry_warnings(V, P, names, config.grazing_deg)
    for name, n_in in zip(names, inliers):
        if n_in < config.min_inliers:
            warnings.append(f"light {name!r}: only {n_in} unshadowed inlier samples "
                            f"(< {config.min_inliers})")
    if not np.isfinite(condition) or condition > config.max_condition:
        warnings.append(f"ill-conditioned calibration: condition number {condition:.3g} "
                        f"(> {config.max_condition:g}) of the {n_param}-parameter problem")
    converged = converged and all_converged
    if not converged:
        warnings.append("the calibration did not converge within the iteration limits")
    for w in warnings:
        log.warning("light calibration: %s", w)
    timings["total"] = time.perf_counter() - t_start
    return CalibrationResult(lights=lights, rms=rms, inliers=inliers, condition=condition,
                             position_std=pstd, converged=converged, iterations=iterations,
                             cost_history=history, warnings=warnings, timings=timings,
                             n_samples=int(idx.size))


def _light_names(names: Sequence[str] | None, init: PointLights | None, L: int
                 ) -> tuple[str, ...]:
    if names is None:
        return init.names if init is not None else tuple(f"light{j}" for j in range(L))
    names = tuple(str(n) for n in names)
    if len(names) != L:
        raise ShapeError(f"expected {L} light names; got {len(names)}")
    return names


def _sample_scale(I: np.ndarray, used: np.ndarray, dark: float) -> np.ndarray:
    """(N,) mean intensity of each sample over its used observations (>= the floor)."""
    cnt = used.sum(1)
    tot = (I.mean(-1) * used).sum(1)
    mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), 1.0)
    floor = max(dark, 1e-12)
    return np.maximum(mean, floor)


def _fix_gauge(beta: np.ndarray, rho: np.ndarray, has_data: np.ndarray, ref_colour: np.ndarray,
               albedo_median: float) -> tuple[np.ndarray, np.ndarray]:
    """Apply the intensity gauge of the module docstring.

    Args:
        beta: (L, 3) intensities in the solver's gauge; rho: (N, 3) albedo in that gauge.
        has_data: (N,) samples with at least one used observation.
        ref_colour: (3,) channel ratios of the summed intensities (mean 1).
        albedo_median: target median of the channel-mean albedo.

    Returns:
        (L, 3) intensities and (N, 3) albedo in the returned gauge.
    """
    k = ref_colour / beta.sum(0)                                     # per channel
    beta = beta * k
    rho = rho / k
    med = float(np.median(rho[has_data].mean(1))) if has_data.any() else 0.0
    if med > 0 and np.isfinite(med):
        a = med / albedo_median
        beta, rho = beta * a, rho / a
    return beta, rho


# ===================================================================== target-based
@dataclass(frozen=True)
class SphereTarget:
    """A matte sphere in one pose.

    Attributes:
        centre: (3,) mm, camera frame.
        radius: mm.
        albedo: linear albedo (one number or RGB), or None when unknown (then the returned
            intensities are relative: they include the albedo).
    """

    centre: np.ndarray
    radius: float
    albedo: float | Sequence[float] | None = None

    def __post_init__(self) -> None:
        c = np.asarray(self.centre, dtype=np.float64)
        check_shape(c, "centre", (3,))
        check_finite(c, "centre")
        if not np.isfinite(self.radius) or self.radius <= 0:
            raise ShapeError(f"sphere radius must be > 0; got {self.radius}")
        object.__setattr__(self, "centre", c)


@dataclass(frozen=True)
class PlaneTarget:
    """A matte plane in one pose.

    Attributes:
        point: (3,) a point of the plane, mm, camera frame.
        normal: (3,) plane normal (either sign; oriented toward the camera internally).
        albedo: as for :class:`SphereTarget`.
    """

    point: np.ndarray
    normal: np.ndarray
    albedo: float | Sequence[float] | None = None

    def __post_init__(self) -> None:
        p = np.asarray(self.point, dtype=np.float64)
        n = np.asarray(self.normal, dtype=np.float64)
        check_shape(p, "point", (3,))
        check_shape(n, "normal", (3,))
        check_finite(p, "point")
        check_finite(n, "normal")
        if np.linalg.norm(n) < 1e-12:
            raise ShapeError("plane normal must be non-zero")
        object.__setattr__(self, "point", p)
        object.__setattr__(self, "normal", n / np.linalg.norm(n))


def target_geometry(target: SphereTarget | PlaneTarget, camera: Camera
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel geometry of a target by ray intersection.

    Args:
        target: a sphere or a plane.
        camera: the camera (zero distortion assumed: undistorted images).

    Returns:
        points (H, W, 3) mm and normals (H, W, 3) facing the camera (NaN where the ray
        misses), and hit (H, W) bool.
    """
    rays = camera.rays()                                             # (H, W, 3), z = 1
    if isinstance(target, SphereTarget):
        c, R = target.centre, float(target.radius)
        rc = rays @ c
        rr = np.einsum("hwk,hwk->hw", rays, rays)
        disc = rc**2 - rr * (c @ c - R * R)
        hit = disc >= 0
        t = (rc - np.sqrt(np.maximum(disc, 0.0))) / rr
        hit &= t > 0
        X = t[..., None] * rays
        n = (X - c) / R
    elif isinstance(target, PlaneTarget):
        n0 = target.normal
        rn = rays @ n0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (target.point @ n0) / rn
        hit = np.isfinite(t) & (t > 0) & (np.abs(rn) > 1e-9)
        X = np.where(hit[..., None], t[..., None] * rays, 0.0)
        n = np.broadcast_to(np.where((target.point @ n0) > 0, -n0, n0), X.shape).copy()
    else:
        raise ShapeError(f"expected a SphereTarget or PlaneTarget; got {type(target).__name__}")
    X = np.where(hit[..., None], X, np.nan)
    n = np.where(hit[..., None], n, np.nan)
    return X, n, hit


def _led_axis(d0: np.ndarray, e1: np.ndarray, e2: np.ndarray, ab: np.ndarray) -> np.ndarray:
    a = d0 + ab[0] * e1 + ab[1] * e2
    return a / np.linalg.norm(a)


def _target_model(theta: np.ndarray, V: np.ndarray, N: np.ndarray, alb: np.ndarray,
                  chart: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Predicted (M, 3) intensities of one light: theta = P (3), log beta (3)
    [, LED chart coordinates (2), mu (1)]."""
    P, beta = theta[:3], np.exp(theta[3:6])
    d = P[None] - V
    dist = np.maximum(np.linalg.norm(d, axis=1), 1e-9)
    g = np.maximum(np.einsum("mk,mk->m", d, N), 0.0) / dist**3
    if chart is not None:
        axis = _led_axis(*chart, theta[6:8])
        cos = np.maximum(-(d @ axis) / dist, 0.0)
        mu = max(float(theta[8]), 0.0)
        g = g * np.where(cos > 0, cos ** mu, 0.0)
    return alb * beta[None] * g[:, None]


def _numeric_jacobian(f: Callable[[np.ndarray], np.ndarray], theta: np.ndarray,
                      steps: np.ndarray) -> np.ndarray:
    """Central finite-difference Jacobian (m, p) of f at theta."""
    cols = []
    for k in range(theta.size):
        tp, tm = theta.copy(), theta.copy()
        tp[k] += steps[k]
        tm[k] -= steps[k]
        cols.append((f(tp) - f(tm)) / (2.0 * steps[k]))
    return np.stack(cols, axis=1)


def calibrate_from_target(images_per_pose: Sequence[np.ndarray],
                          target: SphereTarget | PlaneTarget | Sequence[SphereTarget | PlaneTarget],
                          camera: Camera, *, fit_led: bool | None = None,
                          saturated: Sequence[np.ndarray] | None = None,
                          init: PointLights | None = None, names: Sequence[str] | None = None,
                          config: CalibrationConfig = CalibrationConfig()) -> CalibrationResult:
    """Calibrate near point lights (optionally LEDs) from images of a known matte target.

    Args:
        images_per_pose: K arrays (L, H, W, 3) of linear images, one per light, for each
            target pose (same camera, same light order).
        target: one target for all poses or K targets (one per pose). The albedo is known
            when the targets give it, else one unknown constant albedo is assumed and the
            intensities are relative (they include it).
        camera: the camera of the images (size (W, H), zero distortion).
        fit_led: also fit each light's LED axis and anisotropy exponent; default: when more
            than 4 poses are given.
        saturated: optional K arrays (L, H, W) bool of clipped pixels.
        init: optional initial lights (positions, intensities and, when fitting LEDs, axes
            and exponents); without it a coarse search initialises each light.
        names: L light names (default: those of ``init``, else ``light0``...).
        config: options (``n_samples`` is per pose).

    Returns:
        :class:`CalibrationResult` (``condition`` is the largest over the lights).

    Raises:
        ShapeError: for inconsistent inputs.
        FitError: when a light has no usable observation.
    """
    t_start = time.perf_counter()
    if len(images_per_pose) == 0:
        raise FitError("no target images given")
    K = len(images_per_pose)
    targets = list(target) if isinstance(target, Sequence) else [target] * K
    if len(targets) != K:
        raise ShapeError(f"expected {K} targets (one per pose); got {len(targets)}")
    if saturated is not None and len(saturated) != K:
        raise ShapeError(f"expected {K} saturation masks; got {len(saturated)}")
    W, H = camera.image_size
    L = None
    Vs, Ns, As, Is, Ss = [], [], [], [], []
    known = [t.albedo is not None for t in targets]
    if any(known) and not all(known):
        raise ShapeError("give the albedo for every target pose or for none")
    for k, (imgs, tgt) in enumerate(zip(images_per_pose, targets)):
        imgs = np.asarray(imgs)
        dims = check_shape(imgs, f"images_per_pose[{k}]", ("L", H, W, 3))
        if L is None:
            L = dims["L"]
        elif dims["L"] != L:
            raise ShapeError(f"images_per_pose[{k}] has {dims['L']} lights; expected {L}")
        X, n, hit = target_geometry(tgt, camera)
        sel = sample_pixels(hit, config.n_samples)
        Vs.append(X.reshape(-1, 3)[sel])
        Ns.append(n.reshape(-1, 3)[sel])
        alb = np.ones(3) if tgt.albedo is None else np.broadcast_to(
            np.asarray(tgt.albedo, dtype=np.float64), (3,))
        As.append(np.broadcast_to(alb, (sel.size, 3)))
        Is.append(imgs.reshape(L, -1, 3)[:, sel].astype(np.float64))
        if saturated is None:
            Ss.append(np.zeros((L, sel.size), bool))
        else:
            s = np.asarray(saturated[k], dtype=bool)
            check_shape(s, f"saturated[{k}]", (L, H, W))
            Ss.append(s.reshape(L, -1)[:, sel])
    V, Nn, alb = np.concatenate(Vs), np.concatenate(Ns), np.concatenate(As)
    I, sat = np.concatenate(Is, axis=1), np.concatenate(Ss, axis=1)   # (L, M, 3), (L, M)
    if V.shape[0] < 10:
        raise FitError("the target covers fewer than 10 pixels in the images")
    if init is not None and len(init) != L:
        raise ShapeError(f"init has {len(init)} lights; the images have {L}")
    names = _light_names(names, init, L)
    led = (K > 4) if fit_led is None else bool(fit_led)
    finite = np.all(np.isfinite(I), axis=-1)
    I = np.where(finite[..., None], I, 0.0)
    y = (I / alb[None]).mean(-1)                                      # (L, M)
    dark = _dark_floor(np.where(finite & ~sat, I.mean(-1), np.nan), config)
    usable = finite & ~sat & (I.mean(-1) > dark)
    timings = {"sampling": time.perf_counter() - t_start, "search": 0.0, "refine": 0.0}

    positions, intensities = np.zeros((L, 3)), np.zeros((L, 3))
    axes, mus = np.zeros((L, 3)), np.zeros(L)
    inliers = np.zeros(L, int)
    conds, stds, rms_parts, history = [], [], [], []
    iterations, converged = 0, True
    warnings: list[str] = []
    for j in range(L):
        if usable[j].sum() < 10:
            raise FitError(f"light {names[j]!r}: no usable target observations (all dark, "
                           f"saturated or outside the target)")
        t0 = time.perf_counter()
        if init is not None:
            P0 = init.positions[j]
        else:
            P0 = _search_position(V, Nn, y[j], finite[j] & ~sat[j], config)
        g0, _ = _geometry_factor(V, Nn, P0[None])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = I[j] / (alb * g0[0][:, None])
        ok = usable[j] & (g0[0] > 0)
        beta0 = (np.median(ratio[ok], axis=0) if ok.any() else np.ones(3))
        beta0 = np.where(np.isfinite(beta0) & (beta0 > 0), beta0, 1.0)
        if init is not None and np.all(init.intensities[j] > 0):
            beta0 = init.intensities[j]
        timings["search"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        theta = np.concatenate([P0, np.log(beta0)])
        stages = [None]
        if led:
            stages.append("led")
        chart = None
        robust = np.ones((V.shape[0], 3))
        for stage in stages:
            if stage == "led":
                if init is not None and init.anisotropy[j] > 0:
                    d0, mu0 = init.directions[j], float(init.anisotropy[j])
                else:
                    d0 = V.mean(0) - theta[:3]
                    d0, mu0 = d0 / np.linalg.norm(d0), 1.0
                chart = (d0, *_orthonormal_basis(d0))
                theta = np.concatenate([theta[:6], [0.0, 0.0, mu0]])
            settled = False
            for outer in range(config.outer_iterations):
                used = usable[j] & _lit_mask(V, Nn, theta[None, :3], config)[0]
                if used.sum() < 10:
                    raise FitError(f"light {names[j]!r}: the target is in shadow under the "
                                   f"light estimate")
                scale = np.maximum(I[j].mean(-1), max(dark, 1e-12))
                sw = np.sqrt(used[:, None] * robust) / scale[:, None]

                def resid(th, j=j, sw=sw, chart=chart):
                    return (sw * (I[j] - _target_model(th, V, Nn, alb, chart))).reshape(-1)

                steps = np.concatenate([np.full(3, 1e-4), np.full(3, 1e-7),
                                        np.full(theta.size - 6, 1e-7)])

                def fun(th, need, resid=resid, steps=steps):
                    r = resid(th)
                    return r, (_numeric_jacobian(resid, th, steps) if need else None)

                lower = {8: 0.0} if chart is not None else None
                new, summary = _solve(fun, theta, V.shape[0] * 3, config, lower)
                iterations += summary.num_successful_steps + summary.num_unsuccessful_steps
                history.append(float(summary.final_cost))
                ok_term = summary.termination_type == pyceres.TerminationType.CONVERGENCE
                step = float(np.abs(new[:3] - theta[:3]).max())
                theta = new
                if chart is not None:
                    axis = _led_axis(*chart, theta[6:8])
                    chart = (axis, *_orthonormal_basis(axis))
                    theta[6:8] = 0.0
                e = (I[j] - _target_model(theta, V, Nn, alb, chart)) / scale[:, None]
                robust, _ = _robust_weights(e, np.repeat(used[:, None], 3, 1), config.loss)
                cost_settled = (len(history) > 1 and abs(history[-1] - history[-2])
                                <= 1e-3 * history[-2])
                if outer > 0 and (step < config.position_tolerance or cost_settled):
                    settled = ok_term
                    break
            converged &= settled
        timings["refine"] += time.perf_counter() - t0

        sw = np.sqrt(used[:, None] * robust) / scale[:, None]

        def resid_final(th, j=j, sw=sw, chart=chart):
            return (sw * (I[j] - _target_model(th, V, Nn, alb, chart))).reshape(-1)

        Jf = _numeric_jacobian(resid_final, theta, steps)
        conds.append(_scaled_condition(Jf))
        stds.append(_parameter_std(Jf, resid_final(theta))[:3])
        e = (I[j] - _target_model(theta, V, Nn, alb, chart)) / scale[:, None]
        rms_parts.append(e[used].reshape(-1))
        inliers[j] = int(((robust >= 0.5).all(1) & used).sum())
        positions[j], intensities[j] = theta[:3], np.exp(theta[3:6])
        if chart is not None:
            axes[j], mus[j] = chart[0], max(float(theta[8]), 0.0)

    lights = PointLights(positions, intensities, axes if led else None, mus if led else None,
                         names)
    condition = float(max(conds))
    all_e = np.concatenate(rms_parts)
    rms = float(np.sqrt(np.mean(all_e**2))) if all_e.size else float("nan")
    if not np.isfinite(condition) or condition > config.max_condition:
        warnings.append(f"ill-conditioned calibration: condition number {condition:.3g} "
                        f"(> {config.max_condition:g})")
    for name, n_in in zip(names, inliers):
        if n_in < config.min_inliers:
            warnings.append(f"light {name!r}: only {n_in} inlier target samples "
                            f"(< {config.min_inliers})")
    if led and K <= 4 and fit_led:
        warnings.append(f"LED axes and exponents fitted from only {K} target poses")
    if not converged:
        warnings.append("the calibration did not converge within the iteration limits")
    for w in warnings:
        log.warning("target light calibration: %s", w)
    timings["total"] = time.perf_counter() - t_start
    return CalibrationResult(lights=lights, rms=rms, inliers=inliers, condition=condition,
                             position_std=np.array(stds), converged=converged,
                             iterations=iterations, cost_history=history, warnings=warnings,
                             timings=timings, n_samples=int(V.shape[0]))
