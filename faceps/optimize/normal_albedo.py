"""The method's alternating normal/albedo update (paper section 3.2, eq. 5-6).

Given linear images under L calibrated near point lights and a coarse proxy surface
(positions ``V_i`` and normals ``n0_i`` of its elements: pixels of a height field, or the
visible triangles of the proxy mesh), find per-element unit normals ``n_i`` and RGB albedo
``rho_i`` minimising eq. 6::

    E(n, rho) = sum_i sum_{j in L_i} loss( (I_ij - rho_i * beta_j * (n_i . g_ij)) / s )
              + mu1 * sum_i |n_i - n0_i|^2
              + mu2 * sum_i |rho_i / a - mean_{k in Omega_i} rho_k / a|^2,     |n_i| = 1

with ``g_ij = (P_j - V_i) / |P_j - V_i|^3`` (times the LED factor, :mod:`faceps.core.lights`;
products with ``beta_j`` are per colour channel) and:

- ``L_i`` the lights usable at element i: eq. 5 on the proxy (``n0_i . (P_j - V_i) > 0``),
  minus saturated samples, samples darker than ``dark_threshold * s`` (shadow or noise floor)
  and samples in a cast shadow of the proxy (shadow rays). Inside ``L_i`` the model is the
  linear eq. 1 (no clamp), as in the paper. With per-channel saturation flags a sample
  clipped in some channels only keeps the others (its residual and its light colour
  ``u_j`` restricted to them) when such samples are at least 2 % of the usable ones.
- ``s`` a robust image scale: the median channel-mean intensity of the lit samples. Dividing
  the residuals by ``s`` makes the data term dimensionless, so ``mu1``, ``mu2`` and the robust
  threshold mean the same at any exposure or light power; ``a`` (the median albedo of the
  first estimate) does the same for the albedo smoothness.
- ``loss`` the squared RGB norm (``robust="none"``), its Huber function (``"huber"``), or
  (``"sheen"``, the default) a dichromatic loss: the residual's component ``m`` along the
  light's colour ``u_j = beta_j / |beta_j|`` gets a one-sided Huber loss (``m^2`` for
  ``m <= k``, ``2 k m - k^2`` beyond), the rest stays quadratic. A specular sheen adds light
  of the light's own colour, so it only makes ``m`` positive: this is
  ``min_{sigma >= 0} |r - sigma u_j|^2 + 2 k sigma``, eq. 1 plus a non-negative white sheen per
  sample with an L1 cost.
- ``Omega_i`` the neighbours: the 4-neighbours inside the mask (pixel domain) or the
  solved triangles of the one-ring (triangle domain).

The minimisation alternates, vectorised over all elements, in float64:

- **normal step** (albedo fixed): per element the energy is a quadratic form on the unit
  sphere, ``n^T A n - 2 c^T n`` (``mu1 |n - n0|^2 = 2 mu1 (1 - n0 . n)`` on the sphere), whose
  global minimum is solved exactly (:func:`sphere_quadratic_min`).
- **albedo step** (normals fixed): a sparse SPD linear system, a 3x3 data block per element
  (the dichromatic loss couples the channels) plus ``mu2 M^T M`` (``M = I - mean of
  neighbours``), by block-Jacobi preconditioned conjugate gradients, warm-started and
  truncated (``cg_tol``, ``cg_maxiter``: every CG iteration lowers the energy).
- **robust weights** (IRLS) are recomputed from the current residuals before each step.
  With the sheen loss the first normal step ignores the light-coloured component entirely
  (see :func:`_solve`).
- **Anderson acceleration** of the alternation with an energy safeguard: plain alternation
  creeps along the low-frequency trade-off between albedo and shading; the accelerated
  iteration converges in a few tens of steps.

Iterations stop when the relative change of E falls below ``tol``; the result keeps the
history of E per element.

**Noise** (``noise_adaptive``, default on): ``mu1``, ``mu2`` and the robust threshold were
tuned on well-exposed images. A dark or high-ISO capture has several times their noise,
and with the same weights its normals followed the noise: four stops under-exposed, the
update ended 3-4 deg *further* from the truth than its prior. The update therefore
measures the images' noise itself (:func:`image_noise_level`, relative to ``s``) and, when
it exceeds ``noise_reference``, divides the data term by ``f^2`` (``f`` the ratio): the
residuals are measured in units of the noise, the prior and the albedo smoothness keep
their tuned balance with it. Images at or below the reference are solved exactly as
before.

**Coarse to fine** (pixel domain, ``levels``): the alternation is slow mostly along the
low-frequency albedo/shading trade-off, which a 2x2-averaged copy resolves at a quarter of
the cost. The update therefore first runs on coarser copies (recursively, while a level
keeps ``min_level_pixels``), and each finer level starts from the upsampled albedo and
runs only ``refine_iterations``. Measured on a 1600x1200 session with a fitted proxy
(303k pixels): 72 s and 3.97 degrees mean error at one level, 12.5 s and 3.70 degrees at
three; at 640x480 with the exact proxy, 2.63 vs 2.72 degrees. One outer iteration per
finer level (the default) instead of two changed the mean error of three 1600x1200
sessions by +0.00 to +0.03 degrees and saved 2-4 s of 8-13 (bench/RESULTS.md). The albedo
steps of the finer levels stop after ``refine_cg_maxiter`` conjugate-gradient iterations:
their albedo starts from the coarser level's, and what the outer iteration there brings is
mostly the second, re-weighted normal step (3 instead of 15 iterations: 1 s less on a
475k-pixel session, the same errors to +-0.02 degrees).

What to expect (synthetic sessions with sheen, noise and 8-bit images, true lights; see
``bench/bench_normal_albedo.py``): with three lights about half of the face sees only two,
where the data fix the normal only together with the albedo, so the low-frequency part of
the normals there comes from the proxy; fine detail comes from the images.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from faceps.capture.session import keeps_clipped_channels
from faceps.core.camera import Camera
from faceps.core.eig3 import CHUNK as EIG_CHUNK
from faceps.core.eig3 import eigh3_chunk
from faceps.core.errors import ConfigError, FitError, ShapeError, check_shape
from faceps.core.imageio import block_sum_2x2, sample_bilinear
from faceps.core.lights import PointLights
from faceps.core.mesh import face_normals, triangle_one_ring
from faceps.core.raycast import RayCaster
from faceps.core.threads import blas_threads

log = logging.getLogger(__name__)

__all__ = [
    "NormalAlbedoConfig",
    "NormalAlbedoResult",
    "update_normals_albedo",
    "update_normals_albedo_mesh",
    "cast_shadow_mask",
    "light_vectors",
    "normal_step",
    "sphere_quadratic_min",
    "image_noise_level",
]

_DOMAINS = ("pixel", "triangle")
_ROBUST = ("sheen", "huber", "none")
_TRANSFER = ("smooth", "constant")
#: default (mu1, mu2) per domain
_DEFAULT_WEIGHTS = {"pixel": (0.1, 8.0), "triangle": (0.3, 0.5)}
_MIN_BLOCK_ROWS = 20_000  # elements per thread of the normal step (smaller: not worth it)
_MAX_THREADS = 4


@dataclass(frozen=True)
class NormalAlbedoConfig:
    """Options of the normal/albedo update (eq. 6); see the module docstring for E.

    The defaults were tuned on synthetic sessions with specular sheen, sensor noise and
    8-bit sRGB images (seeds 100-102, 400x300 to 800x600; ``bench/bench_normal_albedo.py``
    measures them).

    Attributes:
        domain: ``pixel`` (:func:`update_normals_albedo`) or ``triangle`` (per visible proxy
            triangle as in the paper, :func:`update_normals_albedo_mesh`). Each function
            requires a config of its own domain; the domain picks the defaults of mu1, mu2.
        mu1: weight of the prior ``|n - n0|^2`` toward the proxy normal. The data term is
            normalised by the image scale ``s`` (a sample whose intensity is off by ``s``
            costs 1), so mu1 compares a squared relative intensity error with a squared
            normal change (rad^2): the default 0.1 lets a 1 % intensity error move a normal
            by about 1.8 degrees. Larger: closer to the proxy. Default (None): 0.1 for
            pixels, 0.3 for triangles (a triangle normal is a coarser prior).
        mu2: weight of the albedo smoothness ``|rho_i - mean of neighbours|^2``, the albedo
            divided by its median (relative albedo differences). Larger: smoother albedo,
            more of the shading goes into the normals. Default (None): 8 for pixels (4
            neighbours), 0.5 for triangles (one-ring of about 12). The defaults are resolved
            at construction, so ``dataclasses.replace(config, domain=...)`` keeps them.
        iterations: maximum number of outer iterations (normal step + albedo step).
        tol: stop when the relative change of E in one iteration is below this.
        robust: the per-sample loss (IRLS weights, updated every step):

            - ``sheen`` (default): dichromatic; the residual's component along the light's
              colour ``u_j = beta_j / |beta_j|`` gets a one-sided Huber loss (threshold
              ``robust_scale``): brighter-than-predicted in the light's own colour, which
              is what a specular sheen adds, costs only linearly, the chromatic part and
              darker-than-predicted residuals stay quadratic. With three lights a plain or
              symmetric robust loss absorbs the sheen into tilted normals (three lights
              fit three intensities exactly).
            - ``huber``: Huber loss on each sample's RGB residual norm.
            - ``none``: least squares.
        robust_scale: Huber threshold k in units of the image scale ``s``.
        dark_threshold: samples whose channel-mean intensity is below this fraction of the
            image scale ``s`` are treated as shadowed (noise floor).
        use_saturation: drop samples flagged as saturated (when a mask is given).
        clipped_channels: with per-channel saturation flags, a sample clipped in some
            channels only keeps the others (when such samples are at least 2 % of the
            usable ones); False: any clipped channel drops the whole sample.
        shadow_test: drop samples in a cast shadow of the proxy (shadow rays; see
            :func:`update_normals_albedo` and :func:`update_normals_albedo_mesh`).
        shadow_bias_mm: shadow rays start this far off the surface, mm.
        min_lights: elements with fewer usable lights ignore their data and keep the proxy
            normal (their albedo is filled in by the smoothness term). The prior keeps
            every count well posed, so 1 is the default.
        transfer: triangle domain only, how triangle normals become pixel normals:
            ``smooth`` (area-weighted vertex averages of the updated triangle normals,
            interpolated with the barycentric weights of the rendered proxy) or
            ``constant`` (each pixel takes its triangle's normal).
        anderson: history depth of the Anderson acceleration of the alternation (0: plain
            alternation).
        cg_tol: relative residual at which the albedo conjugate gradient stops.
        cg_maxiter: iteration cap of the albedo conjugate gradient per albedo step.
        levels: pixel domain only: resolution levels (1: the full resolution only). With
            more, the update is first solved on a 2x2-averaged copy (recursively), and
            its albedo, bilinearly upsampled, starts the finer level, which then runs
            only ``refine_iterations`` outer iterations. The albedo is smooth (``mu2``),
            so the coarse level settles its slow low-frequency part at a quarter of the
            cost; the fine level recovers the detail of the normals, which are solved
            per pixel. A level stops the recursion when its mask has fewer than
            ``min_level_pixels`` pixels.
        refine_cg_maxiter: iteration cap of the albedo conjugate gradient at the levels
            finer than the coarsest (their albedo starts from the coarser level's).
        refine_iterations: outer iterations at each level finer than the coarsest
            (0: those levels keep the upsampled albedo and only update the normals from
            it; measured on three 1600x1200 sessions: 2-3 s faster, normals up to 0.1
            deg worse).
        min_level_pixels: smallest mask of a coarser level.
        threads: threads of the per-element work: the set-up, the normal step, the
            energy, the albedo system and the CG's products (None: the CPUs available,
            at most 4; 1: none). The float32 results do not depend on it (the float64
            energies only by rounding).
        noise_adaptive: weigh the data term by the images' own noise. The weights above
            were tuned on images whose noise (:func:`image_noise_level`, relative to the
            image scale ``s``) is at most ``noise_reference``; for noisier images (dark
            or high-ISO captures) the data term is divided by ``f^2``, ``f = noise /
            noise_reference``, i.e. ``mu1`` and ``mu2`` are multiplied by ``f^2`` and
            ``robust_scale`` by ``f`` (the residuals measured in units of the noise).
            Images at or below the reference keep the tuned weights.
        noise_reference: the relative noise of the tuning images (default sessions of
            ``faceps synth session`` measure 0.021-0.031).
    """

    domain: str = "pixel"
    mu1: float | None = None
    mu2: float | None = None
    iterations: int = 20
    tol: float = 1e-4
    robust: str = "sheen"
    robust_scale: float = 0.003
    dark_threshold: float = 0.03
    use_saturation: bool = True
    clipped_channels: bool = True
    shadow_test: bool = True
    shadow_bias_mm: float = 0.5
    min_lights: int = 1
    transfer: str = "smooth"
    anderson: int = 5
    cg_tol: float = 1e-5
    cg_maxiter: int = 15
    levels: int = 3
    refine_iterations: int = 1
    refine_cg_maxiter: int = 3
    min_level_pixels: int = 15000
    threads: int | None = None
    noise_adaptive: bool = True
    noise_reference: float = 0.035

    def __post_init__(self) -> None:
        if self.domain not in _DOMAINS:
            raise ConfigError(f"domain must be one of {_DOMAINS}; got {self.domain!r}")
        if self.robust not in _ROBUST:
            raise ConfigError(f"robust must be one of {_ROBUST}; got {self.robust!r}")
        if self.transfer not in _TRANSFER:
            raise ConfigError(f"transfer must be one of {_TRANSFER}; got {self.transfer!r}")
        for name, default in zip(("mu1", "mu2"), _DEFAULT_WEIGHTS[self.domain]):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("mu1", "mu2", "dark_threshold", "shadow_bias_mm"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")
        if not np.isfinite(self.robust_scale) or self.robust_scale <= 0:
            raise ConfigError(f"robust_scale must be > 0; got {self.robust_scale!r}")
        if not np.isfinite(self.tol) or self.tol < 0:
            raise ConfigError(f"tol must be >= 0; got {self.tol!r}")
        if not np.isfinite(self.cg_tol) or self.cg_tol <= 0:
            raise ConfigError(f"cg_tol must be > 0; got {self.cg_tol!r}")
        for name in ("iterations", "cg_maxiter", "levels", "refine_cg_maxiter"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if int(self.refine_iterations) < 0:
            raise ConfigError(f"refine_iterations must be >= 0; got {self.refine_iterations!r}")
        if int(self.anderson) < 0:
            raise ConfigError(f"anderson must be >= 0; got {self.anderson!r}")
        if int(self.min_lights) < 0:
            raise ConfigError(f"min_lights must be >= 0; got {self.min_lights!r}")
        if int(self.min_level_pixels) < 1:
            raise ConfigError(f"min_level_pixels must be >= 1; got {self.min_level_pixels!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"threads must be >= 1 or None; got {self.threads!r}")
        if not np.isfinite(self.noise_reference) or self.noise_reference <= 0:
            raise ConfigError(f"noise_reference must be > 0; got {self.noise_reference!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NormalAlbedoResult:
    """Outcome of the normal/albedo update, at the image resolution.

    Attributes:
        normals: (H, W, 3) float32 unit normals, camera frame (n_z < 0 facing the camera);
            NaN outside ``mask``.
        albedo: (H, W, 3) float32 linear RGB albedo on the scale of the lights' intensities
            (eq. 1); NaN outside ``mask``.
        mask: (H, W) bool pixels with a solution.
        lights_used: (L, H, W) bool samples that entered the data term (eq. 5, not
            saturated, not dark, not cast-shadowed, element with >= ``min_lights``). In the
            triangle domain: those of each pixel's triangle.
        n_lights: (H, W) int32 number of usable lights per pixel (0 outside ``mask``).
        residual_history: E / (number of elements) after the initialisation (first
            albedo and normal estimates) and after every outer iteration.
        converged: whether the relative change of E went below ``tol``.
        iterations: outer iterations run.
        timings: seconds per stage (``setup``, ``shadows``, ``normal_step``,
            ``albedo_step``, ``transfer``, ``total``) and two counts: ``cg_iterations``
            (all albedo steps) and ``anderson_accepted`` (accelerated iterates kept).
        scale: the image scale ``s`` that normalises the data term (image units).
        config: the configuration used.
        noise: the images' noise relative to their scale (:func:`image_noise_level`), or
            None when it was not measured (``noise_adaptive`` off, too few samples).
        noise_factor: ``f`` of ``noise_adaptive`` (1: the configured weights were used).
        triangle_normals: triangle domain only: (F, 3) float32 updated normals of the
            proxy's triangles, NaN where not solved.
        triangle_albedo: triangle domain only: (F, 3) float32 albedo, NaN where not solved.
        triangle_mask: triangle domain only: (F,) bool solved (visible, in the region)
            triangles.
        triangle_lights_used: triangle domain only: (L, F) bool samples in the data term.
    """

    normals: np.ndarray
    albedo: np.ndarray
    mask: np.ndarray
    lights_used: np.ndarray
    n_lights: np.ndarray
    residual_history: list[float]
    converged: bool
    iterations: int
    timings: dict
    scale: float
    config: NormalAlbedoConfig = field(default_factory=NormalAlbedoConfig)
    triangle_normals: np.ndarray | None = None
    triangle_albedo: np.ndarray | None = None
    triangle_mask: np.ndarray | None = None
    triangle_lights_used: np.ndarray | None = None
    noise: float | None = None
    noise_factor: float = 1.0


# --------------------------------------------------------------------------- kernels
def sphere_quadratic_min(A: np.ndarray, c: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Global minimisers of ``n^T A n - 2 c^T n`` subject to ``|n| = 1``, batched.

    Why an exact solve: with only three lights, some of them shadowed, ``A`` is often
    rank-deficient or strongly anisotropic, and a quadratic on the sphere can then have two
    local minima; Newton steps on the sphere started at the proxy normal may stop in the
    wrong one. The global minimum is characterised (trust-region theory, Moré & Sorensen
    1983) by ``(A + nu I) n = c`` with ``A + nu I`` positive semi-definite. In the
    eigenbasis of ``A`` (eigenvalues ``l_1 <= l_2 <= l_3``, ``z = Q^T c``) and with
    ``t = nu + l_1 > 0``, ``n_k = z_k / (l_k - l_1 + t)`` and ``t`` is the root of the
    secular equation ``|n(t)| = 1``, bracketed by ``|z_1| <= t <= |z|``. Newton's method on
    ``1 / |n(t)| - 1`` (concave and increasing in t) started at the left end of the bracket
    converges monotonically and quadratically; a few iterations reach machine precision.
    The 3x3 eigen-decompositions (closed form, :mod:`faceps.core.eig3`: about 3x faster
    than LAPACK, ``bench/bench_eig3.py``) and the iterations are vectorised over chunks of
    elements.

    The "hard case" (``z_1 = 0``, the solution has a free component along the first
    eigenvector) is handled by flooring ``|z_1|`` at ``1e-12 |c|``, which changes the
    energy by a negligible amount. ``c = 0`` returns the first eigenvector of ``A``.

    Args:
        A: (M, 3, 3) symmetric matrices.
        c: (M, 3) vectors.
        max_iter: Newton iteration cap (convergence usually takes < 10).

    Returns:
        (M, 3) float64 unit vectors.
    """
    A = np.asarray(A, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    dims = check_shape(A, "A", ("M", 3, 3))
    check_shape(c, "c", (dims["M"], 3))
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(c))):
        raise FitError("sphere_quadratic_min: A or c holds NaN or infinite values")
    if A.shape[0] == 0:
        return np.zeros((0, 3))
    A = 0.5 * (A + np.swapaxes(A, 1, 2))
    out = np.empty((A.shape[0], 3))
    for i in range(0, A.shape[0], EIG_CHUNK):
        out[i:i + EIG_CHUNK] = _sphere_min_chunk(A[i:i + EIG_CHUNK], c[i:i + EIG_CHUNK],
                                                  max_iter)
    return out


def _sphere_min_chunk(A: np.ndarray, c: np.ndarray, max_iter: int) -> np.ndarray:
    """:func:`sphere_quadratic_min` of one chunk of elements (closed-form eigenvectors,
    :func:`faceps.core.eig3.eigh3`; the secular equation on whole columns, so the chunk's
    arrays stay in the CPU cache)."""
    lam, Q = eigh3_chunk(A)
    g1 = lam[:, 1] - lam[:, 0]                                       # gaps >= 0
    g2 = lam[:, 2] - lam[:, 0]
    q = [Q[:, :, k] for k in range(3)]
    z = [q[k][:, 0] * c[:, 0] + q[k][:, 1] * c[:, 1] + q[k][:, 2] * c[:, 2]
         for k in range(3)]                                          # Q^T c
    cnorm = np.sqrt(c[:, 0] * c[:, 0] + c[:, 1] * c[:, 1] + c[:, 2] * c[:, 2])
    floor = np.maximum(1e-12 * cnorm, 1e-300)
    z0 = np.where(np.abs(z[0]) < floor, np.where(z[0] < 0, -floor, floor), z[0])
    z1, z2 = z[1], z[2]
    zn = np.sqrt(z0 * z0 + z1 * z1 + z2 * z2)
    # bracket: t >= |z_1| (as above) and t >= |z| - g2 (as |n(t)| >= |z| / (g2 + t))
    lo = np.maximum(np.abs(z0), zn - g2)
    hi = np.maximum(zn, lo)
    t = lo.copy()
    for _ in range(max_iter):
        i0, i1, i2 = 1.0 / t, 1.0 / (g1 + t), 1.0 / (g2 + t)
        p0, p1, p2 = z0 * i0, z1 * i1, z2 * i2
        a0, a1, a2 = p0 * p0, p1 * p1, p2 * p2
        r = 1.0 / np.sqrt(a0 + a1 + a2)                              # 1 / |n(t)|
        f = r - 1.0
        df = (a0 * i0 + a1 * i1 + a2 * i2) * (r * r * r)
        t = np.clip(t - f / df, lo, hi)
        if not np.any(np.abs(f) > 1e-14):
            break
    p0, p1, p2 = z0 / t, z1 / (g1 + t), z2 / (g2 + t)
    n = q[0] * p0[:, None] + q[1] * p1[:, None] + q[2] * p2[:, None]
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def light_vectors(points: np.ndarray, lights: PointLights) -> np.ndarray:
    """The vectors ``g_ij`` of eq. 1: ``(P_j - V_i) / |P_j - V_i|^3`` times the LED factor.

    The shading of element i under light j is ``max(0, n_i . g_ij)``; for an LED the
    factor ``max(0, d_j . (V_i - P_j) / |V_i - P_j|)^mu_j`` does not depend on the normal.

    Args:
        points: (M, 3) surface positions, mm, camera frame.
        lights: L point lights.

    Returns:
        (L, M, 3) float64, units 1/mm^2.
    """
    V = np.asarray(points, dtype=np.float64)
    check_shape(V, "points", (None, 3))
    d = lights.positions[:, None, :] - V[None]
    dist = np.maximum(np.linalg.norm(d, axis=-1), 1e-9)
    g = d / dist[..., None] ** 3
    if np.any(lights.anisotropy > 0):
        cos = np.maximum(np.einsum("lmk,lk->lm", -d, lights.directions) / dist, 0.0)
        led = np.where(lights.anisotropy[:, None] > 0, cos ** lights.anisotropy[:, None], 1.0)
        g = g * led[..., None]
    return g


def _normal_system(Y: np.ndarray, G: np.ndarray, beta: np.ndarray, rho: np.ndarray,
                   w: np.ndarray, wm: np.ndarray | None = None,
                   channels: np.ndarray | None = None, uc: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The data part of the normal step's quadratic ``n^T A n - 2 b^T n``.

    Per sample the residual ``r = Y_ij - e_ij h`` (``e_ij = beta_j * rho_i`` channel-wise,
    ``h = n . g_ij``) is measured with the channel metric ``w (I - (1 - wm) u_j u_j^T)``,
    ``u_j`` the unit colour of light j (``wm = 1`` or None: the plain squared norm).
    ``channels``: optional (L, M, 3) masks of the measured channels (``Y`` zero in the
    others), with ``uc`` (L, M, 3) the unit light colour restricted to them.

    Returns:
        A (M, 3, 3) and b (M, 3), float64.
    """
    e = rho[None] * beta[:, None, :]                                  # (L, M, 3)
    if channels is not None:
        e = e * channels
    ee = np.einsum("lmc,lmc->lm", e, e)
    ey = np.einsum("lmc,lmc->lm", e, Y)
    if wm is not None:
        if uc is None:
            u = beta / np.maximum(np.linalg.norm(beta, axis=1, keepdims=True), 1e-300)
            ue = np.einsum("lc,lmc->lm", u, e)
            uy = np.einsum("lc,lmc->lm", u, Y)
        else:
            ue = np.einsum("lmc,lmc->lm", uc, e)
            uy = np.einsum("lmc,lmc->lm", uc, Y)
        ee = ee - (1.0 - wm) * ue * ue
        ey = ey - (1.0 - wm) * ue * uy
    A = np.einsum("lm,lmi,lmj->mij", w * ee, G, G)
    b = np.einsum("lm,lmi->mi", w * ey, G)
    return A, b


def normal_step(Y: np.ndarray, G: np.ndarray, beta: np.ndarray, rho: np.ndarray,
                weights: np.ndarray, n0: np.ndarray, mu1: float, *,
                sheen_weights: np.ndarray | None = None) -> np.ndarray:
    """Exact normal step of eq. 6 with the albedo fixed, for M elements at once.

    Minimises, per element i and over unit vectors n::

        sum_j w_ij |Y_ij - rho_i * beta_j * (n . G_ij)|_S^2 + mu1 |n - n0_i|^2

    where ``|r|_S^2 = |r|^2 - (1 - s_ij) (u_j . r)^2`` down-weights the component of the
    residual along the unit light colour ``u_j = beta_j / |beta_j|`` by ``s_ij``
    (``sheen_weights``; default 1, the plain RGB norm). See :func:`sphere_quadratic_min`.

    Args:
        Y: (L, M, 3) observed intensities (e.g. divided by an image scale).
        G: (L, M, 3) light vectors ``g_ij`` (:func:`light_vectors`).
        beta: (L, 3) RGB light intensities (divided by the same scale as Y).
        rho: (M, 3) albedo.
        weights: (L, M) sample weights (0: not used).
        n0: (M, 3) unit prior normals.
        mu1: prior weight (>= 0).
        sheen_weights: optional (L, M) weights in [0, 1] of the light-coloured component.

    Returns:
        (M, 3) float64 unit normals.
    """
    dims = check_shape(Y, "Y", ("L", "M", 3))
    L, M = dims["L"], dims["M"]
    check_shape(G, "G", (L, M, 3))
    check_shape(beta, "beta", (L, 3))
    check_shape(rho, "rho", (M, 3))
    check_shape(weights, "weights", (L, M))
    check_shape(n0, "n0", (M, 3))
    if sheen_weights is not None:
        check_shape(sheen_weights, "sheen_weights", (L, M))
        sheen_weights = np.asarray(sheen_weights, np.float64)
    if not np.isfinite(mu1) or mu1 < 0:
        raise ConfigError(f"mu1 must be a finite number >= 0; got {mu1!r}")
    A, b = _normal_system(np.asarray(Y, np.float64), np.asarray(G, np.float64),
                          np.asarray(beta, np.float64), np.asarray(rho, np.float64),
                          np.asarray(weights, np.float64), sheen_weights)
    return sphere_quadratic_min(A, b + float(mu1) * np.asarray(n0, np.float64))


class _Smoothness:
    """The albedo smoothness term ``rho^T Q rho = sum_i |rho_i - mean of neighbours|^2``
    with ``Q = M^T M``, ``M = I - D^{-1} Adj`` on elements with neighbours (rows of
    elements without neighbours are zero: they have no smoothness term).

    Kept factored: on a pixel grid ``Q`` has a 13-point stencil, and forming it cost more
    than all the products with it (0.24 s at 475k pixels against 15-20 ms per product);
    ``M^T (M X)`` is also the cheaper product (10 instead of 13 entries per row). The
    transposed rows are split once into the row blocks of the threads."""

    def __init__(self, adjacency: sp.csr_matrix, blocks: list[slice]) -> None:
        adj = sp.csr_matrix(adjacency, dtype=np.float64)
        deg = np.asarray(adj.sum(axis=1)).ravel()
        has = deg > 0
        inv = np.where(has, 1.0 / np.maximum(deg, 1.0), 0.0)
        self.M = (sp.diags(has.astype(np.float64)) - sp.diags(inv) @ adj).tocsr()
        MT = self.M.T.tocsr()
        self.diagonal = np.asarray(self.M.multiply(self.M).sum(axis=0)).ravel()
        self.blocks = blocks
        self.MT_rows = [MT[b] for b in blocks] if len(blocks) > 1 else [MT]

    def energy(self, rho: np.ndarray) -> float:
        """``rho^T Q rho``."""
        Y = self.M @ rho
        return _dot(Y, Y)

    def matrix(self) -> sp.csr_matrix:
        """``Q`` itself (for tests and inspection)."""
        return (self.M.T @ self.M).tocsr()


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of the products of two (M, 3) arrays. einsum rather than BLAS (vdot, norm): on
    a shared machine BLAS threads waiting for busy cores cost milliseconds per call."""
    return float(np.einsum("mc,mc->", a, b))


def _inv3(A: np.ndarray) -> np.ndarray:
    """Inverses of (M, 3, 3) matrices by the adjugate: 5x faster than ``np.linalg.inv``
    on hundreds of thousands of 3x3 blocks (LAPACK's per-matrix call overhead). For the
    well-conditioned positive definite blocks of the preconditioner only."""
    a, b, c = A[:, 0, 0], A[:, 0, 1], A[:, 0, 2]
    d, e, f = A[:, 1, 0], A[:, 1, 1], A[:, 1, 2]
    g, h, i = A[:, 2, 0], A[:, 2, 1], A[:, 2, 2]
    out = np.empty_like(A)
    out[:, 0, 0] = e * i - f * h
    out[:, 1, 0] = f * g - d * i
    out[:, 2, 0] = d * h - e * g
    out[:, 0, 1] = c * h - b * i
    out[:, 1, 1] = a * i - c * g
    out[:, 2, 1] = b * g - a * h
    out[:, 0, 2] = b * f - c * e
    out[:, 1, 2] = c * d - a * f
    out[:, 2, 2] = a * e - b * d
    det = a * out[:, 0, 0] + b * out[:, 1, 0] + c * out[:, 2, 0]
    out /= det[:, None, None]
    return out


def _block_matvec(D: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``D_i X_i`` for (M, 3, 3) blocks and (M, 3) vectors (batched matmul: 1.5x faster
    than the equivalent einsum)."""
    return np.matmul(D, X[:, :, None])[:, :, 0]


def _block_cg(D: np.ndarray, S: _Smoothness, mu2: float, rhs: np.ndarray, x0: np.ndarray,
              tol: float, maxiter: int) -> tuple[np.ndarray, int]:
    """Solve ``D_i x_i + mu2 (Q X)_i = rhs_i`` for X (M, 3): D (M, 3, 3) symmetric positive
    definite blocks (the data term couples an element's channels), Q the smoothness
    operator ``S`` shared by the channels. Conjugate gradients on the 3M unknowns with the
    block-Jacobi preconditioner, started at x0; every iteration lowers the quadratic, so a
    truncated solve is still a descent step. The operator and the preconditioner are
    applied in the row blocks of ``S`` on one thread each (the sums stay whole, so the
    result does not depend on the count). Returns (X, iterations)."""
    blocks = S.blocks
    n = len(blocks)
    P_inv = np.empty_like(D)

    def invert(b: slice) -> None:
        P_inv[b] = _inv3(D[b] + (mu2 * S.diagonal[b])[:, None, None] * np.eye(3))

    _for_row_blocks(invert, blocks)
    pool = ThreadPoolExecutor(n) if n > 1 else None

    def apply(fn) -> np.ndarray:
        if pool is None:
            return fn(0, slice(None))
        return np.concatenate(list(pool.map(fn, range(n), blocks)))

    def matvec(X: np.ndarray) -> np.ndarray:
        Y = S.M @ X
        return apply(lambda i, b: _block_matvec(D[b], X[b]) + mu2 * (S.MT_rows[i] @ Y))

    def precond(R: np.ndarray) -> np.ndarray:
        return apply(lambda i, b: _block_matvec(P_inv[b], R[b]))

    try:
        X = x0.copy()
        R = rhs - matvec(X)
        stop = tol * tol * max(_dot(rhs, rhs), 1e-300)
        Z = precond(R)
        P = Z.copy()
        rz = _dot(R, Z)
        its = 0
        while its < maxiter and _dot(R, R) > stop and rz > 0:
            AP = matvec(P)
            pap = _dot(P, AP)
            if pap <= 0:
                break
            alpha = rz / pap
            X += alpha * P
            R -= alpha * AP
            Z = precond(R)
            rz_new = _dot(R, Z)
            P = Z + (rz_new / rz) * P
            rz = rz_new
            its += 1
    finally:
        if pool is not None:
            pool.shutdown()
    return X, its


# --------------------------------------------------------------------------- core solver
@dataclass
class _Solution:
    normals: np.ndarray       # (M, 3)
    albedo: np.ndarray        # (M, 3) in the units of eq. 1
    used: np.ndarray          # (L, M) bool
    history: list[float]
    converged: bool
    iterations: int
    scale: float


def _image_scale_of_means(m: np.ndarray, lit: np.ndarray) -> float:
    """Median channel-mean intensity of the lit samples (the robust image scale), from
    the samples' channel means ``m`` (L, M)."""
    vals = m[lit & (m > 0)]
    if vals.size == 0:
        raise FitError("no lit sample in the solved region: every sample is dark, saturated, "
                       "shadowed or faces away from its light")
    return float(np.median(vals))


def _for_row_blocks(fn, blocks: list[slice]) -> None:
    """Call ``fn(block)`` for each row block, in parallel threads when there are several.
    ``fn`` writes its results into the block's rows of arrays allocated by the caller.
    Per-element work only: numpy releases the GIL in its array loops, so the blocks run
    on several cores; sums across elements are taken by the caller over the whole array,
    so the count of blocks changes a result at most by rounding."""
    if len(blocks) == 1:
        fn(blocks[0])
        return
    with ThreadPoolExecutor(len(blocks)) as pool:
        list(pool.map(fn, blocks))


def _row_blocks(M: int, threads: int | None) -> list[slice]:
    """Contiguous row blocks of M elements, one per thread, each of at least
    ``_MIN_BLOCK_ROWS`` rows (a single block when M is too small to split)."""
    n = min(_thread_count(threads), max(M // _MIN_BLOCK_ROWS, 1))
    edges = np.linspace(0, M, n + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _thread_count(threads: int | None) -> int:
    if threads is not None:
        return int(threads)
    return max(1, min(_MAX_THREADS, len(os.sched_getaffinity(0))
                      if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


class _Problem:
    """Eq. 6 over M elements in normalised units: intensities ``Y = I / s``, albedo
    ``rho / a`` (a: median albedo of the first estimate), so ``beta`` below is
    ``beta_j * a / s``."""

    def __init__(self, I: np.ndarray, G: np.ndarray, lights: PointLights, n0: np.ndarray,
                 usable: np.ndarray, adjacency: sp.csr_matrix, config: NormalAlbedoConfig,
                 timings: dict, channels: np.ndarray | None = None) -> None:
        L, M = I.shape[:2]
        # (L, M, 3) masks of the measured (unclipped) channels, or None: all measured
        self.C = channels
        self.L, self.M, self.G, self.n0, self.config, self.timings = L, M, G, n0, config, timings
        self.blocks = blocks = _row_blocks(M, config.threads)
        ok = np.empty((L, M), bool)
        mean = np.empty((L, M))

        def lit(b: slice) -> None:
            facing = np.einsum("lmk,mk->lm", G[:, b], n0[b]) > 0      # eq. 5
            Ib = I[:, b]
            ok[:, b] = usable[:, b] & facing & np.all(np.isfinite(Ib), axis=-1)
            mean[:, b] = np.nan_to_num(Ib).mean(-1)

        _for_row_blocks(lit, blocks)
        self.scale = s = _image_scale_of_means(mean, ok)
        Y = np.empty((L, M, 3))
        used = np.empty((L, M), bool)
        beta = lights.intensities / s
        d0 = np.empty((M, 3))
        r0 = np.empty((M, 3))

        def first(b: slice) -> None:
            Yb = np.where(ok[:, b, None], np.nan_to_num(I[:, b]) / s, 0.0)
            ub = ok[:, b] & (Yb.mean(-1) >= config.dark_threshold)
            ub &= (ub.sum(0) >= max(int(config.min_lights), 1))[None]
            used[:, b] = ub
            # first albedo: per-element least squares with the proxy normals (eq. 1 units)
            f0 = beta[:, None, :] * np.einsum("lmk,mk->lm", G[:, b], n0[b])[..., None]
            w0 = ub.astype(np.float64)
            if channels is None:
                d0[b] = np.einsum("lm,lmc->mc", w0, f0 * f0)
                r0[b] = np.einsum("lm,lmc->mc", w0, f0 * Yb)
            else:
                # a clipped channel measures nothing: zero data, zero weight
                Yb = Yb * channels[:, b]
                wc = w0[..., None] * channels[:, b]
                d0[b] = np.einsum("lmc,lmc->mc", wc, f0 * f0)
                r0[b] = np.einsum("lmc,lmc->mc", wc, f0 * Yb)
            Y[:, b] = Yb

        _for_row_blocks(first, blocks)
        self.Y, self.used, self.W0 = Y, used, used.astype(np.float64)
        has = d0 > 0
        rho0 = np.where(has, r0 / np.where(has, d0, 1.0), 0.0)
        good = np.all(has, axis=1)
        a = float(np.median(rho0[good].mean(-1))) if good.any() else 1.0
        self.a = a if np.isfinite(a) and a > 0 else 1.0
        self.beta = beta * self.a
        fill = float(np.median(rho0[has])) / self.a if has.any() else 1.0
        self.ref = np.where(has, rho0 / self.a, fill)
        self.u = self.beta / np.maximum(np.linalg.norm(self.beta, axis=1, keepdims=True),
                                        1e-300)
        # the light colour restricted to each sample's measured channels (a sheen adds
        # light of that colour to them), unit length; None: every channel measured
        self.uc = None
        if channels is not None:
            uc = self.u[:, None, :] * channels
            self.uc = uc / np.maximum(np.linalg.norm(uc, axis=-1, keepdims=True), 1e-300)
        self.S = _Smoothness(adjacency, blocks)
        self.mu1, self.mu2 = float(config.mu1), float(config.mu2)
        self.k = float(config.robust_scale)

    def _tick(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def residual(self, n: np.ndarray, rho: np.ndarray, rows: slice = slice(None)
                 ) -> np.ndarray:
        """(L, M, 3) residuals of eq. 1 (zero where a sample is not used); ``rows``: of
        these elements only (``n``, ``rho`` given for them)."""
        h = np.einsum("lmk,mk->lm", self.G[:, rows], n)
        r = ((self.Y[:, rows] - self.beta[:, None, :] * rho[None] * h[..., None])
             * self.W0[:, rows, None])
        return r if self.C is None else r * self.C[:, rows]

    def robust(self, r: np.ndarray, rows: slice = slice(None)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Loss (L, M) of each sample and the IRLS weights of the next step: w on the whole
        residual and wm on its light-coloured component (loss ~ w (|r|^2 - (1 - wm) m^2))."""
        k, W0 = self.k, self.W0[:, rows]
        if self.config.robust == "sheen":
            m = (np.einsum("lc,lmc->lm", self.u, r) if self.uc is None    # light-coloured
                 else np.einsum("lmc,lmc->lm", self.uc[:, rows], r))      # part
            perp = np.einsum("lmc,lmc->lm", r, r) - m * m
            sheen = m > k
            loss = perp + np.where(sheen, 2 * k * m - k * k, m * m)
            return loss * W0, W0, np.where(sheen, k / np.maximum(m, 1e-300), 1.0)
        rn = np.sqrt(np.einsum("lmc,lmc->lm", r, r))
        if self.config.robust == "huber":
            loss = np.where(rn <= k, rn * rn, 2 * k * rn - k * k)
            return loss * W0, W0 * np.minimum(1.0, k / np.maximum(rn, 1e-300)), np.ones_like(rn)
        return rn * rn * W0, W0, np.ones_like(rn)

    def energy(self, n: np.ndarray, rho: np.ndarray) -> float:
        """E of eq. 6 (robust data term) divided by the number of elements."""
        per = np.empty(self.M)

        def part(b: slice) -> None:
            per[b] = self.robust(self.residual(n[b], rho[b], b), b)[0].sum(0)

        _for_row_blocks(part, self.blocks)
        data = per.sum()
        prior = 2.0 * (self.M - np.einsum("mk,mk->", n, self.n0))    # |n - n0|^2, unit n
        smooth = self.S.energy(rho)
        return float((data + self.mu1 * prior + self.mu2 * smooth) / max(self.M, 1))

    def normal_step(self, n: np.ndarray, rho: np.ndarray, sheen_free: bool = False
                    ) -> np.ndarray:
        """Exact minimisation over the normals (weights from the current n, rho)."""
        t0 = time.perf_counter()

        out = np.empty((self.M, 3))

        def rows(sl: slice) -> None:
            _, w, wm = self.robust(self.residual(n[sl], rho[sl], sl), sl)
            if sheen_free:
                wm = np.zeros_like(wm)
            A, b = _normal_system(self.Y[:, sl], self.G[:, sl], self.beta, rho[sl], w, wm,
                                  None if self.C is None else self.C[:, sl],
                                  None if self.uc is None else self.uc[:, sl])
            out[sl] = sphere_quadratic_min(A, b + self.mu1 * self.n0[sl])

        _for_row_blocks(rows, self.blocks)
        self._tick("normal_step", t0)
        return out

    def albedo_step(self, n: np.ndarray, rho: np.ndarray, plain: bool = False) -> np.ndarray:
        """Minimisation over the albedo (weights from the current n, rho), by truncated
        block-preconditioned CG started at rho. Per element the data term is
        ``sum_j w h_j^2 diag(beta_j) S_j diag(beta_j)`` with the channel metric
        ``S_j = I - (1 - wm) u_j u_j^T``; a ridge of 1e-9 of the mean data weight toward the
        first estimate keeps patches without any data well posed."""
        t0 = time.perf_counter()
        beta, bu = self.beta, self.beta * self.u
        # D_i = sum_j c1_ij diag(beta_j^2) - c1_ij (1 - wm_ij) bu_j bu_j^T, as one
        # (M, 2L) x (2L, 9) product (3.5x faster than the equivalent einsums)
        L = beta.shape[0]
        K = np.concatenate([(np.eye(3)[None] * (beta * beta)[:, :, None]).reshape(L, 9),
                            -(bu[:, :, None] * bu[:, None, :]).reshape(L, 9)])
        D = np.empty((self.M, 3, 3))
        rhs = np.empty((self.M, 3))

        def system(b: slice) -> None:
            if plain:
                w = self.W0[:, b]
                wm = np.ones_like(w)
            else:
                _, w, wm = self.robust(self.residual(n[b], rho[b], b), b)
            h = np.einsum("lmk,mk->lm", self.G[:, b], n[b])
            Y = self.Y[:, b]
            c1 = w * h * h
            if self.C is not None:
                # per-sample channel masks: the same blocks with each sample's measured
                # channels (diag(beta^2 C)) and its restricted colour direction
                buc = beta[:, None, :] * self.uc[:, b]
                Db = np.einsum("lm,lmc->mc", c1, (beta * beta)[:, None, :] * self.C[:, b])
                D[b] = Db[:, :, None] * np.eye(3) - np.einsum(
                    "lm,lmi,lmj->mij", c1 * (1.0 - wm), buc, buc)
                uy = np.einsum("lmc,lmc->lm", self.uc[:, b], Y)
                rhs[b] = np.einsum("lm,lc,lmc->mc", w * h, beta, Y) \
                    - np.einsum("lm,lmc->mc", w * h * (1.0 - wm) * uy, buc)
                return
            D[b] = (np.concatenate([c1, c1 * (1.0 - wm)]).T @ K).reshape(-1, 3, 3)
            uy = np.einsum("lc,lmc->lm", self.u, Y)
            rhs[b] = np.einsum("lm,lc,lmc->mc", w * h, beta, Y) \
                - np.einsum("lm,lc->mc", w * h * (1.0 - wm) * uy, bu)

        _for_row_blocks(system, self.blocks)
        ridge = 1e-9 * max(float(np.einsum("mcc->", D)) / max(3 * self.M, 1), 1e-12)
        x, its = _block_cg(D + ridge * np.eye(3), self.S, self.mu2, rhs + ridge * self.ref,
                           rho, self.config.cg_tol, int(self.config.cg_maxiter))
        self._tick("albedo_step", t0)
        self.timings["cg_iterations"] = self.timings.get("cg_iterations", 0) + its
        return x


def _solve(I: np.ndarray, G: np.ndarray, lights: PointLights, n0: np.ndarray, usable: np.ndarray,
           adjacency: sp.csr_matrix, config: NormalAlbedoConfig, timings: dict,
           rho_init: np.ndarray | None = None, iterations: int | None = None,
           channels: np.ndarray | None = None) -> _Solution:
    """Alternating minimisation of eq. 6 over M elements.

    Args:
        I: (L, M, 3) observed linear intensities (NaN allowed where not usable).
        G: (L, M, 3) light vectors.
        lights: the lights (intensities beta).
        n0: (M, 3) unit proxy normals.
        usable: (L, M) bool samples not saturated and not cast-shadowed (eq. 5, the dark
            test and ``min_lights`` are applied here).
        adjacency: (M, M) symmetric 0/1 neighbour matrix.
        config: options.
        timings: dict to add ``normal_step``, ``albedo_step`` seconds and counts to.
        rho_init: optional (M, 3) starting albedo in the units of eq. 1 (e.g. from a
            coarser level; NaN: none there, the first estimate is used).
        iterations: outer iteration cap (default ``config.iterations``).
        channels: optional (L, M, 3) masks of the measured channels (0: clipped), when
            some usable sample has a clipped channel.
    """
    pb = _Problem(I, G, lights, n0, usable, adjacency, config, timings, channels)
    if rho_init is None:
        rho = pb.albedo_step(n0, pb.ref, plain=True)
        # With the sheen model, the first normal step ignores the light-coloured part of
        # every residual: the first albedo, fitted with the sheen, is off only along the
        # light colour, so these normals are sheen-free and the sheen then shows up as
        # large positive residuals (down-weighted) instead of being absorbed into tilted
        # normals.
        n = pb.normal_step(n0, rho, sheen_free=config.robust == "sheen")
    else:
        # an albedo solved with the robust loss already (a coarser level): plain steps
        rho = np.where(np.isfinite(rho_init), rho_init / pb.a, pb.ref)
        n = pb.normal_step(n0, rho)
    E = pb.energy(n, rho)
    history = [E]
    converged = False
    it = 0
    # Anderson acceleration (type II, Walker & Ni 2011) of the fixed-point map
    # rho -> albedo_step(normal_step(rho)), with the energy safeguard of Peng et al. 2018:
    # an accelerated iterate is kept only if it lowers E, else the plain iterate is taken
    # and the history restarts. Plain alternation moves slowly along the low-frequency
    # albedo/normal trade-off; this cuts the iterations several-fold.
    depth = int(config.anderson)
    dF: list[np.ndarray] = []
    dG: list[np.ndarray] = []
    f_prev = g_prev = None
    accepted = 0
    n_iter = int(config.iterations if iterations is None else iterations)
    for it in range(1, n_iter + 1):  # noqa: B007 - the count is returned
        g = pb.albedo_step(n, rho)
        f = g - rho
        cand = None
        if depth > 0 and f_prev is not None:
            dF.append((f - f_prev).ravel())
            dG.append((g - g_prev).ravel())
            if len(dF) > depth:
                dF.pop(0)
                dG.pop(0)
            Fm = np.stack(dF, 1)
            gram = np.einsum("ki,kj->ij", Fm, Fm)
            gram += 1e-10 * max(float(np.trace(gram)), 1e-300) * np.eye(gram.shape[0])
            gamma = np.linalg.solve(gram, np.einsum("ki,k->i", Fm, f.ravel()))
            cand = g - np.einsum("ki,i->k", np.stack(dG, 1), gamma).reshape(g.shape)
        f_prev, g_prev = f, g
        if cand is not None:
            n_c = pb.normal_step(n, cand)
            E_c = pb.energy(n_c, cand)
            if E_c < E:
                accepted += 1
            else:
                cand = None
                dF.clear()
                dG.clear()
        if cand is None:
            cand = g
            n_c = pb.normal_step(n, g)
            E_c = pb.energy(n_c, g)
        change = (E - E_c) / max(abs(E), 1e-300)
        rho, n, E = cand, n_c, E_c
        history.append(E)
        log.debug("normal/albedo iteration %d: E = %.6g (relative change %.3g)", it, E, change)
        if abs(change) < config.tol:
            converged = True
            break
    timings["anderson_accepted"] = accepted
    return _Solution(normals=n, albedo=rho * pb.a, used=pb.used, history=history,
                     converged=converged, iterations=it, scale=pb.scale)


# --------------------------------------------------------------------------- helpers
#: fewest interior lit pixels per image for a noise estimate
_NOISE_MIN_SAMPLES = 200
#: 3x3 Laplacian-like mask of Immerkaer's noise estimator (sum of squares 36)
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def image_noise_level(images: np.ndarray, mask: np.ndarray, dark_threshold: float = 0.03,
                      saturated: np.ndarray | None = None) -> float | None:
    """The images' noise relative to their scale, measured on the images themselves.

    Immerkaer's estimator (Fast noise variance estimation, CVIU 1996) made robust: the
    images are filtered with the 3x3 mask ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels
    intensity that is locally constant, linear or quadratic and turns white noise of
    standard deviation sigma into noise of deviation ``6 sigma``; ``sigma`` is the median
    absolute response (times 1.4826, the Gaussian MAD factor) over the pixels whose 3x3
    neighbourhood lies in ``mask`` and that are lit, per image and channel, then the median
    over images and channels; clipped pixels (flat at full scale) are left out with
    their neighbours. Divided by the image scale ``s`` of eq. 6 (the median
    channel-mean intensity of the lit pixels), it is in the units of the data term.
    Skin detail at the pixel scale adds to it; on the default synthetic sessions it
    reads 0.021-0.031 at 480x360 to 1600x1200.

    Args:
        images: (L, H, W, 3) linear images.
        mask: (H, W) bool pixels of the surface to measure on.
        dark_threshold: pixels darker than this fraction of ``s`` (shadows) are left out.
        saturated: optional (L, H, W) bool clipped samples, or (L, H, W, 3) per channel;
            left out.

    Returns:
        ``sigma / s``, or None when fewer than 200 pixels per image qualify.
    """
    import cv2

    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(np.any(mask, 1))[0], np.nonzero(np.any(mask, 0))[0]
    if rows.size < 3 or cols.size < 3:
        return None
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inner = cv2.erode(mask[crop].astype(np.uint8), np.ones((3, 3), np.uint8),
                      borderValue=0) > 0
    imgs = np.asarray(images, np.float32)[:, crop[0], crop[1]]
    # channel means by column arithmetic (a reduction over a last axis of 3 is slow); a
    # non-finite channel makes the mean non-finite
    means = (imgs[..., 0] + imgs[..., 1] + imgs[..., 2]) / np.float32(3)   # (L, h, w)
    finite = np.isfinite(means)
    if saturated is not None:
        sat = np.asarray(saturated, bool)[:, crop[0], crop[1]]
        finite &= ~(sat.any(-1) if sat.ndim == 4 else sat)
    vals = means[:, mask[crop] & np.all(finite, 0)]
    vals = vals[vals > 0]
    if vals.size < _NOISE_MIN_SAMPLES:
        return None
    s = float(np.median(vals))
    # the medians are taken on every other row and column (a quarter of the pixels, still
    # tens of thousands at capture sizes)
    grid = np.zeros(inner.shape, bool)
    grid[::2, ::2] = True
    sigmas = []
    for j in range(imgs.shape[0]):
        # every pixel of the 3x3 neighbourhood finite and not clipped (a NaN poisons the
        # filter response, a clipped one flattens it)
        ok = cv2.erode(finite[j].astype(np.uint8), np.ones((3, 3), np.uint8),
                       borderValue=0) > 0
        sel = inner & ok & (means[j] > dark_threshold * s)
        if int(sel.sum()) < _NOISE_MIN_SAMPLES:
            continue
        if int((sel & grid).sum()) >= _NOISE_MIN_SAMPLES:
            sel &= grid
        for c in range(imgs.shape[-1]):
            r = cv2.filter2D(np.ascontiguousarray(imgs[j, ..., c]), -1, _NOISE_KERNEL,
                             borderType=cv2.BORDER_REFLECT)
            sigmas.append(1.4826 / 6.0 * float(np.median(np.abs(r[sel]))))
    if not sigmas or s <= 0:
        return None
    return float(np.median(sigmas)) / s


def _noise_scaled(config: NormalAlbedoConfig, images: np.ndarray, mask: np.ndarray,
                  saturated: np.ndarray | None) -> tuple[NormalAlbedoConfig, float | None,
                                                         float]:
    """``config`` with the weights of ``noise_adaptive`` applied (and turned off, for the
    inner solves), the measured noise and the factor ``f``."""
    if not config.noise_adaptive:
        return config, None, 1.0
    noise = image_noise_level(images, mask, config.dark_threshold, saturated)
    f = 1.0 if noise is None else max(1.0, noise / float(config.noise_reference))
    inner = replace(config, noise_adaptive=False)
    if f > 1.0:
        inner = replace(inner, mu1=float(config.mu1) * f * f, mu2=float(config.mu2) * f * f,
                        robust_scale=float(config.robust_scale) * f)
        log.info("normal/albedo: image noise %.3f of the image scale, %.2fx the reference: "
                 "data term weighted by 1/%.2f", noise, f, f * f)
    return inner, noise, f


def _check_config(config: object, domain: str) -> NormalAlbedoConfig:
    if config is None:
        return NormalAlbedoConfig(domain=domain)
    if not isinstance(config, NormalAlbedoConfig):
        raise ConfigError(f"expected a NormalAlbedoConfig; got {type(config).__name__}")
    if config.domain != domain:
        raise ConfigError(f"this function solves the {domain} domain; got a config for "
                          f"domain={config.domain!r} (use NormalAlbedoConfig(domain="
                          f"{domain!r}, ...))")
    return config


def _check_lights(lights: object, L: int) -> PointLights:
    if not isinstance(lights, PointLights):
        raise ShapeError(f"expected lights to be PointLights; got {type(lights).__name__}")
    if len(lights) != L:
        raise ShapeError(f"{L} images but {len(lights)} lights")
    return lights


def _check_images(images: object) -> tuple[np.ndarray, dict]:
    dims = check_shape(images, "images", ("L", "H", "W", 3))
    if dims["L"] < 1:
        raise ShapeError("expected at least one image")
    return np.asarray(images), dims


def _check_pixel_inputs(who: str, images: object, points: object, proxy_normals: object,
                        mask: object, lights: object, saturated: object, shadow: object
                        ) -> tuple:
    """Shapes and types of the pixel-domain inputs (ShapeError naming the argument).
    Returns (images, lights, points and proxy normals as float64, the valid pixels: in the
    mask with finite points and non-zero normals); FitError naming ``who`` when none is."""
    images, dims = _check_images(images)
    L, H, W = dims["L"], dims["H"], dims["W"]
    lights = _check_lights(lights, L)
    check_shape(points, "points", (H, W, 3))
    check_shape(proxy_normals, "proxy_normals", (H, W, 3))
    check_shape(mask, "mask", (H, W))
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ShapeError(f"expected mask to be bool; got {mask.dtype}")
    if saturated is not None and np.ndim(saturated) == 4:
        check_shape(saturated, "saturated", (L, H, W, 3))
    elif saturated is not None:
        check_shape(saturated, "saturated", (L, H, W))
    if shadow is not None:
        check_shape(shadow, "shadow", (L, H, W))
    pts = np.asarray(points, dtype=np.float64)
    nrm = np.asarray(proxy_normals, dtype=np.float64)
    nn = np.linalg.norm(nrm, axis=-1)
    valid = mask & np.all(np.isfinite(pts), -1) & np.isfinite(nn) & (nn > 1e-6)
    if not valid.any():
        raise FitError(f"{who}: no pixel to solve (mask empty, or no finite points and "
                       "proxy normals inside it)")
    return images, lights, pts, nrm, valid


def _pixel_elements(images: np.ndarray, points: np.ndarray, normals: np.ndarray,
                    valid: np.ndarray, excluded: list, clipped: np.ndarray | None = None
                    ) -> tuple:
    """The elements of the valid pixels of (L, H, W, 3) images and (H, W, 3) maps:
    (flat pixel ids, positions (M, 3), unit normals (M, 3), float64 intensities
    (L, M, 3), usable samples (L, M): not flagged in any (L, H, W) bool map of
    ``excluded``, None entries skipped, channel masks). ``clipped``: optional per-channel
    saturation, (L, H, W) bool (the whole sample) or (L, H, W, 3); a sample with every
    channel clipped is not usable, one with some clipped keeps the others: the channel
    masks are (L, M, 3) float64 (1: measured) when any usable sample has a clipped
    channel, else None (whether that is worth it is decided before, by
    :func:`_channel_flags`)."""
    L = images.shape[0]
    idx = np.nonzero(valid.reshape(-1))[0]
    V = points.reshape(-1, 3)[idx]
    n0 = normals.reshape(-1, 3)[idx]
    n0 = n0 / np.linalg.norm(n0, axis=-1)[:, None]
    I = np.asarray(images).reshape(L, -1, 3)[:, idx].astype(np.float64)
    usable = np.ones((L, idx.size), bool)
    for flags in excluded:
        if flags is not None:
            usable &= ~np.asarray(flags, bool).reshape(L, -1)[:, idx]
    channels = None
    if clipped is not None:
        clipped = np.asarray(clipped, bool)
        if clipped.ndim == 3:
            usable &= ~clipped.reshape(L, -1)[:, idx]
        else:
            c = clipped.reshape(L, -1, 3)[:, idx]
            full = c[..., 0] & c[..., 1] & c[..., 2]
            usable &= ~full
            if (usable & (c[..., 0] | c[..., 1] | c[..., 2])).any():
                channels = (~c).astype(np.float64)
    return idx, V, n0, I, usable, channels


def _channel_flags(clipped: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-channel saturation flags (L, H, W, 3) as they are worth keeping: reduced to
    whole samples (L, H, W) unless enough of the valid pixels' samples are clipped in
    some channels only (:func:`faceps.capture.session.keeps_clipped_channels`; a
    well-exposed capture has a few tenths of a percent, and the per-channel path would
    cost more than they bring)."""
    if keeps_clipped_channels(clipped[:, valid]):
        return clipped
    return clipped[..., 0] | clipped[..., 1] | clipped[..., 2]


def _element_adjacency(idx: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """4-neighbour adjacency of the elements at flat pixel ids ``idx`` of an (H, W) grid."""
    index = -np.ones(shape[0] * shape[1], np.int64)
    index[idx] = np.arange(idx.size)
    return _grid_adjacency(index.reshape(shape))


def _grid_adjacency(index: np.ndarray) -> sp.csr_matrix:
    """4-neighbour adjacency of the elements of an (H, W) index map (-1: not an element)."""
    pairs = []
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        ok = (a >= 0) & (b >= 0)
        pairs.append((a[ok], b[ok]))
    i = np.concatenate([p[0] for p in pairs])
    j = np.concatenate([p[1] for p in pairs])
    n = int(index.max()) + 1 if index.size else 0
    adj = sp.csr_matrix((np.ones(i.size), (i, j)), shape=(n, n))
    return (adj + adj.T).tocsr()


def _coarser(images: np.ndarray, points: np.ndarray, normals: np.ndarray, valid: np.ndarray,
             saturated: np.ndarray | None, shadow: np.ndarray | None) -> tuple:
    """The pixel-domain inputs at half resolution: 2x2 blocks averaged over their valid
    pixels (images linear, points, normals renormalised); a coarse pixel is valid when
    any child is; it is saturated or shadowed for a light when any valid child is
    (saturation per channel when given per channel).
    Returns (images, points, normals, valid, saturated, shadow), float64."""
    cnt = block_sum_2x2(valid)
    valid2 = cnt > 0
    inv = np.where(valid2, 1.0 / np.maximum(cnt, 1.0), np.nan)
    pts2 = block_sum_2x2(np.where(valid[..., None], points, 0.0)) * inv[..., None]
    nsum = block_sum_2x2(np.where(valid[..., None], normals, 0.0))
    nn = np.linalg.norm(nsum, axis=-1, keepdims=True)
    n2 = np.where(valid2[..., None] & (nn > 1e-12), nsum / np.maximum(nn, 1e-12), np.nan)
    img = np.asarray(images)
    ok = valid[None] & np.all(np.isfinite(img), axis=-1)
    ci = block_sum_2x2(ok, lead=1)
    # zeros in the images' own dtype (float32 captures stay float32 until summed)
    img2 = block_sum_2x2(np.where(ok[..., None], img, img.dtype.type(0)), lead=1) / \
        np.maximum(ci, 1.0)[..., None]
    img2 = np.where((ci > 0)[..., None], img2, np.nan)

    def any_child(flags: np.ndarray | None) -> np.ndarray | None:
        if flags is None:
            return None
        flags = np.asarray(flags, bool)
        inside = valid[None] if flags.ndim == 3 else valid[None, ..., None]
        return block_sum_2x2(flags & inside, lead=1) > 0

    return img2, pts2, n2, valid2, any_child(saturated), any_child(shadow)


def _upsample_map(coarse: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of an (Hc, Wc, C) map (NaN: no value) to the (H, W) pixels of
    ``valid`` (coarse u = (fine u + 0.5) / 2 - 0.5), normalised over the finite coarse
    taps; NaN where none is finite or outside ``valid``."""
    Hc, Wc, C = coarse.shape
    H, W = valid.shape
    out = np.full((H, W, C), np.nan)
    rows, cols = np.nonzero(valid)
    y = (rows + 0.5) / 2 - 0.5
    x = (cols + 0.5) / 2 - 0.5
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    acc = np.zeros((rows.size, C))
    wsum = np.zeros(rows.size)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy = np.clip(y0 + dy, 0, Hc - 1)
            xx = np.clip(x0 + dx, 0, Wc - 1)
            v = coarse[yy, xx]
            ok = np.all(np.isfinite(v), axis=1)
            wgt = np.where(ok, wy * wx, 0.0)
            acc += np.where(ok[:, None], v, 0.0) * wgt[:, None]
            wsum += wgt
    has = wsum > 1e-12
    out[rows[has], cols[has]] = acc[has] / wsum[has, None]
    return out


def _grid_mesh(points: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangulate the valid pixels of a point map: two triangles per 2x2 block of valid
    pixels, counter-clockwise seen from the camera. Returns (vertices (N, 3), triangles)."""
    H, W = valid.shape
    index = -np.ones((H, W), np.int64)
    index[valid] = np.arange(int(valid.sum()))
    a, b = index[:-1, :-1], index[:-1, 1:]
    c, d = index[1:, :-1], index[1:, 1:]
    t1 = (a >= 0) & (c >= 0) & (b >= 0)
    t2 = (b >= 0) & (c >= 0) & (d >= 0)
    tris = np.concatenate([np.stack([a[t1], c[t1], b[t1]], 1),
                           np.stack([b[t2], c[t2], d[t2]], 1)])
    return points[valid].astype(np.float64), tris


def cast_shadow_mask(points: np.ndarray, lights: PointLights, vertices_cam: np.ndarray,
                     triangles: np.ndarray, *, normals: np.ndarray | None = None,
                     bias_mm: float = 0.5, caster: RayCaster | None = None) -> np.ndarray:
    """Cast shadows of a mesh (the proxy) by shadow rays.

    A ray from each point toward each light is tested against the mesh; the ray starts
    ``bias_mm`` off the surface (along ``normals`` when given, else along the ray) so that
    it does not hit the surface it starts on.

    Args:
        points: (..., 3) surface positions, mm, camera frame (e.g. (H, W, 3)); NaN: none.
        lights: L point lights.
        vertices_cam: (V, 3) mesh vertices in the camera frame, mm.
        triangles: (F, 3) vertex ids.
        normals: optional (..., 3) unit surface normals for the start offset.
        bias_mm: start offset, mm.
        caster: an existing :class:`RayCaster` of the same mesh (skips building one).

    Returns:
        (L, ...) bool, True where light j is blocked (False where the point is NaN).
    """
    P = np.asarray(points, dtype=np.float64)
    check_shape(P, "points", (3,), leading=True)
    if not isinstance(lights, PointLights):
        raise ShapeError(f"expected lights to be PointLights; got {type(lights).__name__}")
    if not np.isfinite(bias_mm) or bias_mm < 0:
        raise ConfigError(f"bias_mm must be >= 0; got {bias_mm!r}")
    lead = P.shape[:-1]
    flat = P.reshape(-1, 3)
    ok = np.all(np.isfinite(flat), axis=1)
    Nflat = None
    if normals is not None:
        N = np.asarray(normals, dtype=np.float64)
        if N.shape != P.shape:
            raise ShapeError(f"expected normals to have shape {P.shape}; got {N.shape}")
        Nflat = N.reshape(-1, 3)
        ok &= np.all(np.isfinite(Nflat), axis=1)
    caster = caster or RayCaster(vertices_cam, triangles)
    idx = np.nonzero(ok)[0]
    out = np.zeros((len(lights), flat.shape[0]), bool)
    V = flat[idx]
    for j in range(len(lights)):
        to_light = lights.positions[j] - V
        dist = np.linalg.norm(to_light, axis=1)
        dirs = to_light / np.maximum(dist, 1e-12)[:, None]
        off = Nflat[idx] if Nflat is not None else dirs
        origins = V + bias_mm * off
        seg = lights.positions[j] - origins
        out[j, idx] = caster.occluded(origins, seg, 1.0 - 1e-6)
    return out.reshape((len(lights),) + lead)


# --------------------------------------------------------------------------- pixel domain
@blas_threads(1)  # see faceps.core.threads.blas_threads
def update_normals_albedo(images: np.ndarray, points: np.ndarray, proxy_normals: np.ndarray,
                          mask: np.ndarray, lights: PointLights,
                          config: NormalAlbedoConfig | None = None, *,
                          saturated: np.ndarray | None = None,
                          shadow: np.ndarray | None = None) -> NormalAlbedoResult:
    """Eq. 6 per pixel: updated normals and albedo of a height field.

    Args:
        images: (L, H, W, 3) linear images (float, not clipped), one per light.
        points: (H, W, 3) surface positions in mm, camera frame (e.g. the proxy depth
            back-projected, :meth:`faceps.core.camera.Camera.backproject`).
        proxy_normals: (H, W, 3) unit proxy normals (the prior n0 and the eq. 5 test).
        mask: (H, W) bool pixels to solve (pixels with non-finite points or normals are
            left out).
        lights: the L calibrated lights, in the order of ``images``.
        config: options (default :class:`NormalAlbedoConfig`).
        saturated: optional clipped samples, used when ``config.use_saturation``:
            (L, H, W) bool (the sample is dropped) or (L, H, W, 3) bool per channel (a
            sample drops its clipped channels and keeps the others: skin clips in red
            first, and its green and blue still measure the shading).
        shadow: optional (L, H, W) bool cast shadows, e.g. :func:`cast_shadow_mask` against
            the proxy mesh. When absent and ``config.shadow_test``, the shadow rays are
            tested against the height field of ``points`` itself (triangulated pixel grid
            of the solved region).

    Returns:
        :class:`NormalAlbedoResult` (float32 maps, NaN outside ``mask``).

    Raises:
        ShapeError: inconsistent shapes or light count.
        ConfigError: an invalid option.
        FitError: nothing to solve (empty mask or no lit sample).
    """
    t_start = time.perf_counter()
    config = _check_config(config, "pixel")
    images, lights, pts, n0map, valid = _check_pixel_inputs(
        "update_normals_albedo", images, points, proxy_normals, mask, lights, saturated,
        shadow)
    if saturated is not None and np.ndim(saturated) == 4:
        saturated = np.asarray(saturated, bool)
        saturated = (_channel_flags(saturated, valid) if config.clipped_channels
                     else saturated.any(-1))
    if config.noise_adaptive:
        inner, noise, f = _noise_scaled(config, images, valid, saturated)
        result = update_normals_albedo(images, pts, n0map, valid, lights, inner,
                                       saturated=saturated, shadow=shadow)
        result.config, result.noise, result.noise_factor = config, noise, f
        result.timings["total"] = time.perf_counter() - t_start
        return result
    L, H, W = images.shape[:3]
    idx = np.nonzero(valid.reshape(-1))[0]
    box = _solve_box(valid, int(config.levels))
    if box is not None:
        # A face fills a fraction of a capture: solve on the pixels around it (the same
        # 2x2 blocks at every level, so the result is the one of the whole frame) instead
        # of averaging, shadow-testing and upsampling whole frames.
        (r0, r1), (c0, c1) = box
        sub = update_normals_albedo(
            images[:, r0:r1, c0:c1], pts[r0:r1, c0:c1], n0map[r0:r1, c0:c1],
            valid[r0:r1, c0:c1], lights, config,
            saturated=None if saturated is None else np.asarray(saturated)[:, r0:r1, c0:c1],
            shadow=None if shadow is None else np.asarray(shadow)[:, r0:r1, c0:c1])
        sub.timings["total"] = time.perf_counter() - t_start
        return _pasted(sub, box, (H, W))
    timings: dict = {}
    _, V, n0, I, usable, channels = _pixel_elements(
        images, pts, n0map, valid, [], saturated if config.use_saturation else None)
    G = light_vectors(V, lights)
    timings["setup"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    if shadow is not None:
        shadow = np.asarray(shadow, bool)
        usable &= ~shadow.reshape(L, -1)[:, idx]
    elif config.shadow_test:
        gv, gt = _grid_mesh(pts, valid)
        if gt.shape[0]:
            sh = cast_shadow_mask(V, lights, gv, gt, normals=n0, bias_mm=config.shadow_bias_mm)
            usable &= ~sh
            shadow = np.zeros((L, H * W), bool)
            shadow[:, idx] = sh
            shadow = shadow.reshape(L, H, W)
    timings["shadows"] = time.perf_counter() - t0

    rho_init, n_iter, solve_config = None, None, config
    if int(config.levels) > 1:
        t0 = time.perf_counter()
        coarse = _coarser(images, pts, n0map, valid,
                          saturated if config.use_saturation else None, shadow)
        if int(coarse[3].sum()) >= int(config.min_level_pixels):
            try:
                sub = update_normals_albedo(
                    *coarse[:4], lights, replace(config, levels=int(config.levels) - 1),
                    saturated=coarse[4], shadow=coarse[5])
            except FitError as exc:
                log.debug("normal/albedo: coarse level failed (%s); full resolution only", exc)
            else:
                rho_init = _upsample_map(sub.albedo, valid).reshape(-1, 3)[idx]
                n_iter = int(config.refine_iterations)
                solve_config = replace(config, cg_maxiter=int(config.refine_cg_maxiter))
                timings["coarse_levels"] = sub.timings.get("coarse_levels", 0) + 1
                timings["coarse_pixels"] = int(sub.mask.sum())
        timings["coarse"] = time.perf_counter() - t0

    adj = _element_adjacency(idx, (H, W))
    sol = _solve(I, G, lights, n0, usable, adj, solve_config, timings, rho_init=rho_init,
                 iterations=n_iter, channels=channels)

    t0 = time.perf_counter()
    normals = np.full((H * W, 3), np.nan, np.float32)
    albedo = np.full((H * W, 3), np.nan, np.float32)
    normals[idx] = sol.normals
    albedo[idx] = sol.albedo
    used = np.zeros((L, H * W), bool)
    used[:, idx] = sol.used
    n_lights = used.sum(0).astype(np.int32)
    timings["transfer"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    log.info("normal/albedo update (pixel): %d pixels, %d iterations, E %.4g -> %.4g, %.2f s",
             idx.size, sol.iterations, sol.history[0], sol.history[-1], timings["total"])
    return NormalAlbedoResult(
        normals=normals.reshape(H, W, 3), albedo=albedo.reshape(H, W, 3),
        mask=valid, lights_used=used.reshape(L, H, W), n_lights=n_lights.reshape(H, W),
        residual_history=sol.history, converged=sol.converged, iterations=sol.iterations,
        timings=timings, scale=sol.scale, config=config)


def _solve_box(valid: np.ndarray, levels: int) -> tuple | None:
    """Row and column ranges around the valid pixels, starts and ends on multiples of
    the coarsest block side (``2^(levels-1)``, so every level's 2x2 blocks are those of
    the whole frame) with a margin of one such block; None when it would not be smaller
    than the frame."""
    H, W = valid.shape
    step = 2 ** max(int(levels) - 1, 0)
    rows = np.nonzero(valid.any(1))[0]
    cols = np.nonzero(valid.any(0))[0]

    def span(ix: np.ndarray, n: int) -> tuple[int, int]:
        lo = max((int(ix[0]) // step - 1) * step, 0)
        hi = min((int(ix[-1]) // step + 2) * step, n)
        return lo, hi

    box = (span(rows, H), span(cols, W))
    (r0, r1), (c0, c1) = box
    return None if (r1 - r0) * (c1 - c0) >= 0.9 * H * W else box


def _pasted(sub: NormalAlbedoResult, box: tuple, size: tuple[int, int]) -> NormalAlbedoResult:
    """A result solved on the pixels of ``box`` placed in a frame of ``size``."""
    (r0, r1), (c0, c1) = box
    H, W = size

    def paste(a: np.ndarray, fill, lead: int = 0) -> np.ndarray:
        out = np.full(a.shape[:lead] + (H, W) + a.shape[lead + 2:], fill, a.dtype)
        out[(slice(None),) * lead + (slice(r0, r1), slice(c0, c1))] = a
        return out

    return replace(sub, normals=paste(sub.normals, np.nan), albedo=paste(sub.albedo, np.nan),
                   mask=paste(sub.mask, False), lights_used=paste(sub.lights_used, False, 1),
                   n_lights=paste(sub.n_lights, 0))


# --------------------------------------------------------------------------- triangle domain
@blas_threads(1)
def update_normals_albedo_mesh(images: np.ndarray, camera: Camera, vertices_cam: np.ndarray,
                               triangles: np.ndarray, lights: PointLights,
                               config: NormalAlbedoConfig | None = None, *,
                               saturated: np.ndarray | None = None,
                               region: np.ndarray | None = None) -> NormalAlbedoResult:
    """Eq. 6 per visible proxy triangle (the paper's domain), transferred to pixels.

    Each triangle is an element at its centroid ``V_i`` with its face normal as the prior
    ``n0_i``; ``I_ij`` is the bilinear sample of image j at the projected centroid. The
    elements are the triangles that face the camera, whose centroid the camera sees (a
    ray cast from the camera hits the triangle itself) and projects inside the image, and
    that lie in ``region``; the albedo neighbourhood is the one-ring among them. Cast
    shadows (``config.shadow_test``) come from shadow rays against the mesh itself. The
    solved triangle normals become pixel normals through the proxy's rendered triangle-id
    map (``config.transfer``).

    Args:
        images: (L, H, W, 3) linear images, one per light.
        camera: the camera of the images (W x H; no distortion is applied).
        vertices_cam: (V, 3) proxy vertices in the camera frame, mm.
        triangles: (F, 3) vertex ids, counter-clockwise seen from outside.
        lights: the L calibrated lights, in the order of ``images``.
        config: options (default :class:`NormalAlbedoConfig` with ``domain="triangle"``).
        saturated: optional (L, H, W) bool clipped samples; a triangle sample is saturated
            when any of its four bilinear taps is.
        region: optional restriction of the solved triangles: (F,) bool per triangle, or
            (H, W) bool pixel mask tested at the projected centroids.

    Returns:
        :class:`NormalAlbedoResult` with the pixel maps and ``triangle_normals``,
        ``triangle_albedo``, ``triangle_mask`` (per triangle, NaN where not solved).

    Raises:
        ShapeError: inconsistent shapes, light count or camera size.
        ConfigError: an invalid option.
        FitError: no visible triangle to solve, or no lit sample.
    """
    t_start = time.perf_counter()
    config = _check_config(config, "triangle")
    images, dims = _check_images(images)
    L, H, W = dims["L"], dims["H"], dims["W"]
    lights = _check_lights(lights, L)
    if not isinstance(camera, Camera):
        raise ShapeError(f"expected camera to be a Camera; got {type(camera).__name__}")
    if (camera.width, camera.height) != (W, H):
        raise ShapeError(f"camera image size {camera.image_size} does not match the images "
                         f"({W}, {H})")
    Vm = np.asarray(vertices_cam, dtype=np.float64)
    F = np.asarray(triangles)
    check_shape(Vm, "vertices_cam", (None, 3))
    check_shape(F, "triangles", (None, 3))
    if saturated is not None:
        check_shape(saturated, "saturated", (L, H, W))
    nF = F.shape[0]
    timings: dict = {}
    caster = RayCaster(Vm, F)  # validates the mesh
    Fi = caster.triangles
    nf = face_normals(Vm, Fi)
    cen = Vm[Fi].mean(axis=1)

    # visible triangles: facing the camera, centroid seen by the camera, inside the image
    sel = (np.einsum("fk,fk->f", nf, cen) < 0) & (cen[:, 2] > 0) & \
        (np.linalg.norm(nf, axis=1) > 0)
    cand = np.nonzero(sel)[0]
    hits = caster.cast(np.zeros((cand.size, 3)), cen[cand])
    seen = (hits.triangle == cand) | (hits.t >= 1.0 - 1e-4)
    sel[cand] = seen
    uv = camera.project(cen)
    inside = np.all(np.isfinite(uv), 1) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & \
        (uv[:, 0] <= W - 1) & (uv[:, 1] <= H - 1)
    sel &= inside
    if region is not None:
        reg = np.asarray(region)
        if reg.dtype != bool:
            raise ShapeError(f"expected region to be bool; got {reg.dtype}")
        if reg.shape == (nF,):
            sel &= reg
        elif reg.shape == (H, W):
            ui = np.clip(np.rint(np.nan_to_num(uv[:, 0])).astype(np.int64), 0, W - 1)
            vi = np.clip(np.rint(np.nan_to_num(uv[:, 1])).astype(np.int64), 0, H - 1)
            sel &= reg[vi, ui]
        else:
            raise ShapeError(f"expected region to have shape ({nF},) or ({H}, {W}); "
                             f"got {reg.shape}")
    tid = np.nonzero(sel)[0]
    if tid.size == 0:
        raise FitError("update_normals_albedo_mesh: no visible triangle to solve")
    uvs = uv[tid]
    I = np.stack([sample_bilinear(images[j], uvs) for j in range(L)])   # (L, M, 3)
    usable = np.all(np.isfinite(I), axis=-1)
    if saturated is not None and config.use_saturation:
        sat = np.stack([sample_bilinear(np.asarray(saturated[j], np.float64)[..., None], uvs)
                        [:, 0] for j in range(L)])
        usable &= ~(np.nan_to_num(sat, nan=1.0) > 0)
    n0 = nf[tid]
    V = cen[tid]
    G = light_vectors(V, lights)
    timings["setup"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    if config.shadow_test:
        usable &= ~cast_shadow_mask(V, lights, Vm, Fi, normals=n0,
                                    bias_mm=config.shadow_bias_mm, caster=caster)
    timings["shadows"] = time.perf_counter() - t0

    ring = triangle_one_ring(Fi, Vm.shape[0])
    adj = ring[tid][:, tid].tocsr()
    # the pixels of the solved triangles (for the noise estimate and the transfer)
    t0 = time.perf_counter()
    maps = caster.render(camera)
    tmap = maps["triangle"]
    pix = maps["mask"] & ~maps["backface"] & (tmap >= 0)
    pix &= sel[np.where(tmap >= 0, tmap, 0)]
    timings["transfer"] = time.perf_counter() - t0
    solve_config, noise, f = _noise_scaled(config, images, pix, saturated)
    sol = _solve(I, G, lights, n0, usable, adj, solve_config, timings)

    # transfer to pixels through the rendered triangle ids
    t0 = time.perf_counter()
    tri_n = np.full((nF, 3), np.nan)
    tri_a = np.full((nF, 3), np.nan)
    tri_n[tid] = sol.normals
    tri_a[tid] = sol.albedo
    tri_used = np.zeros((L, nF), bool)
    tri_used[:, tid] = sol.used
    t_pix = tmap[pix]
    if config.transfer == "constant":
        n_pix = tri_n[t_pix]
        a_pix = tri_a[t_pix]
    else:
        n_pix, a_pix = _smooth_transfer(Vm, Fi, tid, tri_n, tri_a, t_pix,
                                        maps["barycentric"][pix])
    normals = np.full((H, W, 3), np.nan, np.float32)
    albedo = np.full((H, W, 3), np.nan, np.float32)
    normals[pix] = n_pix
    albedo[pix] = a_pix
    used = np.zeros((L, H, W), bool)
    used[:, pix] = tri_used[:, t_pix]
    n_lights = used.sum(0).astype(np.int32)
    timings["transfer"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    log.info("normal/albedo update (triangle): %d triangles -> %d pixels, %d iterations, "
             "E %.4g -> %.4g, %.2f s", tid.size, int(pix.sum()), sol.iterations,
             sol.history[0], sol.history[-1], timings["total"])
    return NormalAlbedoResult(
        normals=normals, albedo=albedo, mask=pix, lights_used=used, n_lights=n_lights,
        residual_history=sol.history, converged=sol.converged, iterations=sol.iterations,
        timings=timings, scale=sol.scale, config=config,
        triangle_normals=tri_n.astype(np.float32), triangle_albedo=tri_a.astype(np.float32),
        triangle_mask=sel, triangle_lights_used=tri_used, noise=noise, noise_factor=f)


def _smooth_transfer(V: np.ndarray, F: np.ndarray, tid: np.ndarray, tri_n: np.ndarray,
                     tri_a: np.ndarray, t_pix: np.ndarray, bary: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel normals and albedo from solved triangles: area-weighted averages at the
    vertices over the solved triangles around them, interpolated with the pixels'
    barycentric weights (normals renormalised)."""
    _, area = face_normals(V, F, return_area=True)
    nV = V.shape[0]
    corner = F[tid].reshape(-1)
    wgt = np.repeat(area[tid], 3)
    acc_w = np.bincount(corner, weights=wgt, minlength=nV)
    vn = np.stack([np.bincount(corner, weights=wgt * np.repeat(tri_n[tid, k], 3), minlength=nV)
                   for k in range(3)], 1)
    va = np.stack([np.bincount(corner, weights=wgt * np.repeat(tri_a[tid, k], 3), minlength=nV)
                   for k in range(3)], 1) / np.maximum(acc_w, 1e-300)[:, None]
    vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-300)
    corners = F[t_pix]                                                  # (P, 3)
    n = np.einsum("pk,pkc->pc", bary, vn[corners])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
    a = np.einsum("pk,pkc->pc", bary, va[corners])
    return n, a
