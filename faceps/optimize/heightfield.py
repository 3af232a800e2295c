"""Height-field recovery from pixel normals: the paper's eq. 7, solved by Gauss-Newton.

The unknown is the depth ``Z`` (z in mm, camera frame, DESIGN.md conventions) of every
pixel of a mask. A pixel p back-projects to ``V_p = Z_p * r_p`` with ``r_p = K^-1 (u, v, 1)``
(:meth:`faceps.core.camera.Camera.rays`). Its *height-field normal* is eq. 7's

    N_p = normalise( sum_k  e_k x e_(k+1) ),   e_k = V_(neighbour k) - V_p,

with the four neighbours in counter-clockwise order *as seen in the image*: right (u+1),
up (v-1), left (u-1), down (v+1), cyclically. With this order a surface seen from the camera
gets ``N . ray < 0`` (``n_z < 0`` for a frontal surface), the project's convention; no
data-dependent flip is applied. Where all four neighbours exist the sum equals
``(V_right - V_left) x (V_up - V_down)``, a central-difference normal that does not depend
on ``Z_p`` itself. At the border of the mask only the consecutive pairs (k, k+1) whose two
neighbours are both in the mask are summed (a one-sided estimate); a pixel without any
such pair (e.g. with only its left and right neighbours in the mask) has no normal (NaN).

Energy (sums over the M pixels of the mask, divided by M so that costs are per-pixel
averages comparable across resolutions):

    E(Z) = 1/M [ sum_p c_p |N_p(Z) - N0_p|^2  +  w1 sum_p (Z_p - Z0_p)^2
                 + w2 sum_p (Lap Z)_p^2 ]

- ``N0``: target normals; ``c_p``: optional per-pixel confidence (default 1).
- ``w1`` in mm^-2 (the depth residual is in mm). For a surface perturbation of wavelength
  lambda the normal term grows like (2 pi / lambda)^2 and the prior like w1: the prior
  decides the shape at wavelengths above about ``2 pi / sqrt(w1)`` and still pulls a
  fraction ``w1 / (w1 + (2 pi / lambda)^2)`` of shorter ones toward Z0. The default 1e-4
  (crossover 630 mm) lets the proxy set the distance, scale and tilt of a face and keeps
  < 2 % of its error at wavelengths below 75 mm; 1e-3 already flattens 50-80 mm features
  by 5-12 % toward a smooth proxy. ``w1 > 0`` is required: normals fix a perspective
  height field only up to scale.
- ``w2`` in mm^2. ``Lap Z`` is the Laplacian of depth over the lateral position in mm
  (unit 1/mm): second differences along u and v divided by the squared pixel footprint
  ``(Z0_p / f)^2``. It dominates the normal term at wavelengths below about
  ``2 pi sqrt(w2)`` (0.34 mm for the default 3e-3, two pixels of a 1600x1200 face capture
  at fx 2600: it removes pixel-level noise, not detail). An axis contributes at p only
  where both neighbours along it are in the mask. The term also couples the two
  checkerboard sub-lattices that the central-difference normal leaves independent.

Because all terms are per-pixel averages in physical units, the same weights give the same
surface at any image resolution (up to discretisation).

Solver (:func:`solve_height_field`): a coarse-to-fine pyramid (2x2 averaging of the
inputs). The coarsest level starts from the linearised problem, the constraints
``n_edge . (V_q - V_p) = 0`` for 4-neighbour pairs (linear in Z because V = Z r) with the
same prior and Laplacian; every level then runs Gauss-Newton with backtracking on the exact
eq. 7, and its result, upsampled bilinearly, initialises the next finer level. The normal
equations are assembled directly as a 13-point stencil on the pixel grid (vectorised, no
loops over pixels) and solved by preconditioned CG (aggregation AMG from pyamg, built once
per level and reused across its Gauss-Newton iterations, or Jacobi), or by scipy's sparse
direct solver. Everything is float64 inside; outputs are float32 with NaN outside the mask.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FitError, ShapeError, check_shape
from faceps.core.imageio import block_sum_2x2

log = logging.getLogger(__name__)

__all__ = [
    "HeightFieldConfig",
    "HeightFieldResult",
    "depth_breaks",
    "height_field_normals",
    "height_field_normals_jacobian",
    "solve_height_field",
]

#: solver names accepted by :class:`HeightFieldConfig`
SOLVERS = ("amg-cg", "cg", "direct")
#: initialisations accepted by :class:`HeightFieldConfig`
INITS = ("linear", "depth0")

# Neighbour taps (dv, du): the pixel itself, then eq. 7's counter-clockwise order in the
# image (right, up, left, down). Index 0 is the centre; 1..4 are the neighbours.
_TAPS = ((0, 0), (0, 1), (-1, 0), (0, -1), (1, 0))
# Offsets of the normal-equation stencil (differences of two taps), in raster order so that
# the column indices of each CSR row come out sorted.
_STENCIL = tuple(sorted({(a[0] - b[0], a[1] - b[1]) for a in _TAPS for b in _TAPS}))
_PAD = 2  # grid padding: taps reach 1 pixel, stencil entries 2
_LINE_SEARCH_HALVINGS = 5


# ---------------------------------------------------------------------------- types
@dataclass(frozen=True)
class HeightFieldConfig:
    """Options of :func:`solve_height_field`.

    Attributes:
        w1: weight of the depth prior |Z - Z0|^2 in mm^-2 (Z in mm). The prior controls the
            shape at wavelengths above ~2 pi / sqrt(w1) mm (630 mm for 1e-4). > 0.
        w2: weight of |Lap Z|^2 in mm^2 (Lap Z in 1/mm over the lateral position in mm);
            smooths wavelengths below ~2 pi sqrt(w2) mm (0.34 mm for 3e-3). >= 0.
        iterations: maximum Gauss-Newton iterations at full resolution. A third one (the
            default before) ran only where the second still gained more than ``tol``, and
            there it took the most CG iterations: on three 1600x1200 sessions 2 instead of
            3 saved 1.1-3.5 s and moved the depth error by -0.06 to +0.035 mm
            (bench/RESULTS.md).
        coarse_iterations: maximum Gauss-Newton iterations at each coarser pyramid level.
        tol: a level stops when an iteration lowers its cost by less than this fraction.
            Gauss-Newton converges quadratically here: after an iteration that gains less
            than 2 % the next one typically gains < 0.05 %.
        solver: ``amg-cg``: CG preconditioned by one V-cycle of pyamg aggregation AMG
            (``smoothed_aggregation_solver`` with unsmoothed tentative prolongation and
            symmetric Gauss-Seidel: on this 13-point operator smoothing the prolongator
            makes the set-up ~40x slower for only a 2-3x lower iteration count), built once
            per pyramid level and reused across its Gauss-Newton iterations; ``cg``:
            Jacobi-preconditioned CG; ``direct``: scipy ``spsolve`` (small problems, tests).
        cg_tol: relative residual at which CG stops. The Gauss-Newton steps are inexact
            Newton steps: the default 0.2 against 0.05 moved the depth of the synthetic
            benchmark surface by 0.005 mm and that of three 1600x1200 face sessions by
            -0.035 to +0.007 mm, and took 0.6-2.6 s less (bench/RESULTS.md).
        cg_maxiter: maximum CG iterations per solve.
        init: start of the coarsest level: ``linear`` (the linearised edge constraints with
            the same prior and Laplacian) or ``depth0`` (the prior depth itself).
        levels: maximum pyramid levels (1: full resolution only). Each extra level halves
            the resolution; the first Gauss-Newton step on a level starts from the coarser
            level's result, upsampled bilinearly.
        min_level_pixels: a coarser level is added only while it keeps at least this
            many mask pixels (below that a level costs more than it saves).
        break_ratio: depth discontinuities of the prior: 4-neighbours whose prior depths
            differ by more than this many pixel footprints (``Z0 / f`` mm, the lateral
            size of a pixel there), i.e. a surface steeper than ``atan(break_ratio)`` from
            the view direction, are not coupled: no eq. 7 pair, Laplacian axis or
            linearised edge spans them. An occluding contour (the side of the nose in
            front of a cheek) is a jump that normals cannot integrate across; coupled, it
            drags the occluded side to a wrong depth. Evaluated on every pyramid level
            (its footprint). 0 couples every pair of mask neighbours. Default 5 (a surface
            steeper than 79 degrees from the view direction): on six 1600x1200 sessions of
            `faceps reconstruct` (bench/RESULTS.md) it lowered the depth error on five
            (0.968 -> 0.705, 0.936 -> 0.857, 1.226 -> 1.204, 0.987 -> 0.969, 1.075 -> 0.870
            mm) and raised it on one (0.810 -> 0.853); 3 helped the turned face more
            (0.707) but hurt two others (0.810 -> 0.953, 0.936 -> 0.947).
    """

    w1: float = 1e-4
    w2: float = 3e-3
    iterations: int = 2
    coarse_iterations: int = 2
    tol: float = 2e-2
    solver: str = "amg-cg"
    cg_tol: float = 0.2
    cg_maxiter: int = 200
    init: str = "linear"
    levels: int = 4
    min_level_pixels: int = 20_000
    break_ratio: float = 5.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.w1) and self.w1 > 0):
            raise ConfigError(f"w1 must be a positive number (mm^-2); got {self.w1!r}")
        if not (np.isfinite(self.w2) and self.w2 >= 0):
            raise ConfigError(f"w2 must be a non-negative number (mm^2); got {self.w2!r}")
        for name in ("iterations", "coarse_iterations"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if not (self.tol >= 0):
            raise ConfigError(f"tol must be >= 0; got {self.tol!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if not (0 < self.cg_tol < 1):
            raise ConfigError(f"cg_tol must be in (0, 1); got {self.cg_tol!r}")
        if int(self.cg_maxiter) < 1:
            raise ConfigError(f"cg_maxiter must be >= 1; got {self.cg_maxiter!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}; got {self.init!r}")
        if int(self.levels) < 1:
            raise ConfigError(f"levels must be >= 1; got {self.levels!r}")
        if int(self.min_level_pixels) < 1:
            raise ConfigError(f"min_level_pixels must be >= 1; got {self.min_level_pixels!r}")
        if not (np.isfinite(self.break_ratio) and self.break_ratio >= 0):
            raise ConfigError(f"break_ratio must be a number >= 0; got {self.break_ratio!r}")


@dataclass
class HeightFieldResult:
    """Output of :func:`solve_height_field`.

    Attributes:
        depth: (H, W) float32 z in mm; NaN outside ``mask``.
        normals: (H, W, 3) float32 eq. 7 normals of ``depth`` (as
            :func:`height_field_normals`); NaN outside the mask and where undefined.
        mask: (H, W) bool pixels solved.
        converged: True when the last full-resolution Gauss-Newton iteration lowered the
            cost by less than ``config.tol`` or no step lowered it any more; False when
            ``config.iterations`` ran out first (or is 0).
        iterations: Gauss-Newton iterations at full resolution.
        history: per-pixel cost E(Z) at full resolution at the start (after the
            initialisation) and after each iteration.
        terms: the parts of the final cost (``normal``, ``prior``, ``laplacian``), each
            weighted and divided by the pixel count (they sum to ``history[-1]``).
        cg_iterations: CG iterations of each full-resolution solve (0 for ``direct``).
        levels: per pyramid level, coarsest first: ``pixels``, ``iterations``, ``cost``
            (final), ``cg_iterations``.
        timings: seconds per stage: ``validate``, ``coarse`` (all coarser levels),
            ``init``, ``assemble``, ``precondition``, ``solve``, ``line_search``,
            ``output``, ``total`` (full-resolution stages exclude ``coarse``).
    """

    depth: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    converged: bool
    iterations: int
    history: list[float]
    terms: dict[str, float] = field(default_factory=dict)
    cg_iterations: list[int] = field(default_factory=list)
    levels: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- grid
class _Grid:
    """The bounding box of a mask, padded by ``_PAD``, with index maps and tap views.

    Per-pixel fields live on the padded grid (Hp, Wp), vectors component-first
    (3, Hp, Wp). ``view(X, dv, du)`` is the core (H, W) window shifted by a tap offset:
    ``view(X, dv, du)[i, j]`` is X at core pixel (i + dv, j + du).
    """

    def __init__(self, mask: np.ndarray, camera: Camera,
                 breaks: tuple[np.ndarray, np.ndarray] | None = None):
        """``breaks``: optional (H, W) bool maps of the image (``cut_u``: pixel and its
        right neighbour not coupled, ``cut_v``: pixel and the one below)."""
        rows, cols = np.nonzero(mask)
        self.v0, self.u0 = int(rows.min()), int(cols.min())
        self.H = int(rows.max()) + 1 - self.v0
        self.W = int(cols.max()) + 1 - self.u0
        self.Hp, self.Wp = self.H + 2 * _PAD, self.W + 2 * _PAD
        self.full_shape = mask.shape
        self.msk = np.zeros((self.Hp, self.Wp), bool)
        self.core(self.msk)[:] = mask[self.v0:self.v0 + self.H, self.u0:self.u0 + self.W]
        self.flat = np.flatnonzero(self.msk)          # raster order = order of the unknowns
        self.M = self.flat.size
        index = np.full(self.Hp * self.Wp, -1, np.int64)
        index[self.flat] = np.arange(self.M)
        self.index = index.reshape(self.Hp, self.Wp)
        # rays of the padded grid (pixels beyond the image only give a direction)
        Kinv = np.linalg.inv(camera.K)
        u = np.arange(self.Wp, dtype=np.float64) + (self.u0 - _PAD)
        v = np.arange(self.Hp, dtype=np.float64) + (self.v0 - _PAD)
        uu, vv = np.meshgrid(u, v)
        self.rays = np.einsum("ij,jhw->ihw", Kinv, np.stack([uu, vv, np.ones_like(uu)]))
        self.fx, self.fy = float(camera.K[0, 0]), float(camera.K[1, 1])
        mc = self.core(self.msk)
        #: (5, H, W) bool: the pixel and its tap k are in the mask (and coupled)
        self.has = np.stack([mc & self.view(self.msk, dv, du) for dv, du in _TAPS])
        if breaks is not None:
            cu = self.crop(breaks[0]) > 0
            cv = self.crop(breaks[1]) > 0
            for k, cut in ((1, self.core(cu)), (3, self.view(cu, 0, -1)),
                           (4, self.core(cv)), (2, self.view(cv, -1, 0))):
                self.has[k] &= ~cut
        #: (4, H, W) bool: consecutive neighbour pair (k, k+1) available (eq. 7 terms)
        self.pair = np.stack([self.has[1 + k] & self.has[1 + (k + 1) % 4] for k in range(4)])
        #: (H, W) bool: the eq. 7 normal is defined
        self.defined = self.pair.any(axis=0)
        #: pixels with a normal but not all four pairs: flat core and padded positions
        border = self.defined & ~self.pair.all(axis=0)
        self.border_core = np.flatnonzero(border)
        bi, bj = np.nonzero(border)
        self.border_pad = (bi + _PAD) * self.Wp + (bj + _PAD)

    def core(self, X: np.ndarray) -> np.ndarray:
        return X[..., _PAD:_PAD + self.H, _PAD:_PAD + self.W]

    def view(self, X: np.ndarray, dv: int, du: int) -> np.ndarray:
        return X[..., _PAD + dv:_PAD + dv + self.H, _PAD + du:_PAD + du + self.W]

    def crop(self, X: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A full-image (H, W) or (H, W, C) map as a padded grid (Hp, Wp) or (C, Hp, Wp)."""
        X = np.asarray(X, np.float64)
        win = X[self.v0:self.v0 + self.H, self.u0:self.u0 + self.W]
        if X.ndim == 3:
            out = np.full((X.shape[2], self.Hp, self.Wp), fill)
            self.core(out)[:] = np.moveaxis(win, -1, 0)
        else:
            out = np.full((self.Hp, self.Wp), fill)
            self.core(out)[:] = win
        return out

    def gather(self, X: np.ndarray) -> np.ndarray:
        """Values of a padded grid (Hp, Wp) at the unknowns, (M,)."""
        return X.reshape(-1)[self.flat]

    def scatter(self, x: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(M,) values of the unknowns as a padded grid (Hp, Wp)."""
        out = np.full(self.Hp * self.Wp, fill)
        out[self.flat] = x
        return out.reshape(self.Hp, self.Wp)

    def uncrop(self, X: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """A padded grid (Hp, Wp) or core-sized / padded (C, ., .) back to the full image
        (H, W) or (H, W, C)."""
        c = self.core(X) if X.shape[-2:] == (self.Hp, self.Wp) else X
        Hf, Wf = self.full_shape
        sl = (slice(self.v0, self.v0 + self.H), slice(self.u0, self.u0 + self.W))
        if X.ndim == 3:
            out = np.full((Hf, Wf, X.shape[0]), fill)
            out[sl] = np.moveaxis(c, 0, -1)
        else:
            out = np.full((Hf, Wf), fill)
            out[sl] = c
        return out


def _cross(a, b):
    """Cross product of component-first vectors (3, ...)."""
    return np.stack([a[1] * b[2] - a[2] * b[1],
                     a[2] * b[0] - a[0] * b[2],
                     a[0] * b[1] - a[1] * b[0]])


def _dot(a, b):
    """Dot product of component-first vectors (3, ...)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


# ------------------------------------------------------------------- eq. 7 normals
def _eq7_pairs(Vp, rp, Vn, rn, pair, jacobian: bool):
    """Eq. 7 summed over the available consecutive neighbour pairs (general form).

    Args:
        Vp, rp: (3, ...) points (mm) and rays of the pixels.
        Vn, rn: lists of four (3, ...) neighbour points and rays (right, up, left, down).
        pair: (4, ...) bool: pair (k, k+1 mod 4) available.
        jacobian: also return the derivatives of the sum.

    Returns:
        s: (3, ...) sum of ``e_k x e_(k+1)`` (mm^2),
        ds: None or (5, 3, ...) ds / dZ at (pixel, right, up, left, down), in mm.
    """
    e = [v - Vp for v in Vn]
    s = np.zeros_like(Vp)
    ds = np.zeros((5,) + Vp.shape) if jacobian else None
    for k in range(4):
        k1 = (k + 1) % 4
        m = pair[k]
        s += np.where(m, _cross(e[k], e[k1]), 0.0)
        if jacobian:
            # d(e_k x e_k1)/dZ_k = r_k x e_k1, /dZ_k1 = e_k x r_k1, /dZ_p = r_p x (e_k - e_k1)
            ds[1 + k] += np.where(m, _cross(rn[k], e[k1]), 0.0)
            ds[1 + k1] += np.where(m, _cross(e[k], rn[k1]), 0.0)
            ds[0] += np.where(m, _cross(rp, e[k] - e[k1]), 0.0)
    return s, ds


def _normalise_with_jacobian(s, ds):
    """n = s / |s| and dn = (I - n n^T) ds / |s| (component axis first / second)."""
    norm = np.sqrt(_dot(s, s))
    inv = 1.0 / np.where(norm > 0, norm, 1.0)
    n = s * inv
    if ds is None:
        return n, norm, None
    for t in range(ds.shape[0]):                 # per tap: small temporaries
        nds = _dot(n, ds[t])
        nds *= inv
        for c in range(3):
            ds[t, c] *= inv
            ds[t, c] -= n[c] * nds
    return n, norm, ds


def _eq7(grid: _Grid, Z: np.ndarray, jacobian: bool, out: np.ndarray | None = None):
    """Eq. 7 normals of a padded depth grid and optionally their derivatives.

    Interior pixels (all four neighbours in the mask) use the closed form
    ``s = (V_r - V_l) x (V_u - V_d)`` (equal to the sum of the four cross products, and
    independent of Z_p); the other pixels with a normal use :func:`_eq7_pairs`.

    Args:
        grid: the grid.
        Z: (Hp, Wp) float64 depth in mm (values outside the mask are ignored).
        jacobian: also return dN_p/dZ at the five taps.
        out: optional (5, 3, H, W) float64 buffer for the Jacobian.

    Returns:
        n: (3, H, W) unit normals (meaningless where ``grid.defined`` is False),
        norm: (H, W) |s| in mm^2,
        J: None or (5, 3, H, W) dN_p / dZ_(p + tap) in 1/mm; J[0] is zero except at the
        border pixels (``grid.border_core``).
    """
    V = Z[None] * grid.rays
    a = grid.view(V, 0, 1) - grid.view(V, 0, -1)
    b = grid.view(V, -1, 0) - grid.view(V, 1, 0)
    s = _cross(a, b)
    J = None
    if jacobian:
        J = np.empty((5, 3, grid.H, grid.W)) if out is None else out
        J[0] = 0.0
        J[1] = _cross(grid.view(grid.rays, 0, 1), b)
        J[3] = _cross(b, grid.view(grid.rays, 0, -1))
        J[2] = _cross(a, grid.view(grid.rays, -1, 0))
        J[4] = _cross(grid.view(grid.rays, 1, 0), a)
    # projects J[1:] in place (J[0] is zero at interior pixels)
    n, norm, _ = _normalise_with_jacobian(s, None if J is None else J[1:])
    if grid.border_pad.size:
        Vf, Rf = V.reshape(3, -1), grid.rays.reshape(3, -1)
        pos = grid.border_pad
        lin = [dv * grid.Wp + du for dv, du in _TAPS[1:]]
        sb, dsb = _eq7_pairs(Vf[:, pos], Rf[:, pos], [Vf[:, pos + o] for o in lin],
                             [Rf[:, pos + o] for o in lin],
                             grid.pair.reshape(4, -1)[:, grid.border_core], jacobian)
        nb, normb, Jb = _normalise_with_jacobian(sb, dsb)
        n.reshape(3, -1)[:, grid.border_core] = nb
        norm.reshape(-1)[grid.border_core] = normb
        if jacobian:
            J.reshape(5, 3, -1)[:, :, grid.border_core] = Jb
    return n, norm, J


# ------------------------------------------------------------------ normal equations
def _laplacian_taps(grid: _Grid, Z0: np.ndarray) -> np.ndarray:
    """(5, H, W) coefficients of Lap Z at the taps (1/mm^2).

    Second differences along u (v) are divided by the squared pixel footprint
    (Z0_p / fx)^2 ((Z0_p / fy)^2); an axis is used only where both its neighbours exist.
    """
    z0 = grid.core(Z0)
    h = grid.has
    au = np.where(h[1] & h[3], (grid.fx / z0) ** 2, 0.0)
    av = np.where(h[2] & h[4], (grid.fy / z0) ** 2, 0.0)
    return np.stack([-2 * (au + av), au, av, au, av])


class _Stencil:
    """Accumulates sum_p B_p^T B_p of per-pixel tap blocks into a 13-point stencil on the
    padded grid and turns it into a CSR matrix over the unknowns (fixed pattern)."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.pos = {d: i for i, d in enumerate(_STENCIL)}
        self.S = np.zeros((len(_STENCIL), grid.Hp, grid.Wp))
        lin = np.array([dv * grid.Wp + du for dv, du in _STENCIL])
        cols = grid.index.reshape(-1)[grid.flat[:, None] + lin[None, :]]   # (M, 13)
        valid = cols >= 0
        self.indices = cols[valid].astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
        plane = np.arange(len(_STENCIL)) * (grid.Hp * grid.Wp)
        #: flat positions in S of the CSR data, row by row
        self.source = (grid.flat[:, None] + plane[None, :])[valid]

    def add_blocks(self, B, taps) -> None:
        """Add sum_p B_p^T B_p. ``B[i]`` is (H, W) or (3, H, W): the residual
        component(s) at each core pixel p times the unknown at ``p + taps[i]``."""
        g = self.grid
        for a in range(len(taps)):
            for b in range(a, len(taps)):
                if B[a].ndim == 3:
                    prod = _dot(B[a], B[b])
                else:
                    prod = B[a] * B[b]
                oa, ob = taps[a], taps[b]
                d = (ob[0] - oa[0], ob[1] - oa[1])
                g.view(self.S[self.pos[d]], *oa)[:] += prod
                if a != b:
                    g.view(self.S[self.pos[(-d[0], -d[1])]], *ob)[:] += prod

    def add_center_blocks(self, Bb: np.ndarray, pos: np.ndarray) -> None:
        """Add the products of the centre tap with all five taps for a few pixels.

        Args:
            Bb: (5, 3, K) blocks (taps ``_TAPS``) of K pixels whose centre tap is non-zero
                (the dense pass of :meth:`add_blocks` left the centre tap out).
            pos: (K,) distinct flat padded positions of the pixels.
        """
        for b, (dv, du) in enumerate(_TAPS):
            prod = _dot(Bb[0], Bb[b])
            self.S[self.pos[(dv, du)]].reshape(-1)[pos] += prod
            if b:
                self.S[self.pos[(-dv, -du)]].reshape(-1)[pos + dv * self.grid.Wp + du] += prod

    def matrix(self) -> sp.csr_matrix:
        g = self.grid
        data = self.S.reshape(-1)[self.source]
        A = sp.csr_matrix((data, self.indices, self.indptr), shape=(g.M, g.M))
        A.has_sorted_indices = True
        return A


def _taps_T(grid: _Grid, B, taps, res) -> np.ndarray:
    """sum_p B_p^T res_p as a padded grid (the gradient of 1/2 |res|^2 w.r.t. Z)."""
    out = np.zeros((grid.Hp, grid.Wp))
    for Bi, t in zip(B, taps):
        grid.view(out, *t)[:] += _dot(Bi, res) if Bi.ndim == 3 else Bi * res
    return out


def _taps_apply(grid: _Grid, B, taps, Z: np.ndarray) -> np.ndarray:
    """sum_i B[i] * Z(p + taps[i]) at each core pixel p (a linear residual), (H, W)."""
    out = np.zeros((grid.H, grid.W))
    for Bi, t in zip(B, taps):
        out += Bi * grid.view(Z, *t)
    return out


class _Problem:
    """Eq. 7 on one grid: targets, weights, cost and Gauss-Newton systems."""

    def __init__(self, grid: _Grid, N0: np.ndarray, C: np.ndarray, Z0: np.ndarray,
                 config: HeightFieldConfig):
        """N0: (3, H, W) core targets (0 where none), C: (H, W) normal weights,
        Z0: (Hp, Wp) prior depth."""
        self.grid, self.cfg = grid, config
        self.N0, self.Z0 = N0, Z0
        self.C = np.where(grid.defined, C, 0.0)
        self.sqc = np.sqrt(self.C)
        self.L = _laplacian_taps(grid, Z0)
        self.lap_rows = self.L[0] != 0
        self.stencil = _Stencil(grid)
        if config.w2 > 0:
            self.stencil.add_blocks(list(np.sqrt(config.w2) * self.L), _TAPS)
        self.stencil.S[self.stencil.pos[(0, 0)]] += np.where(grid.msk, config.w1, 0.0)
        self.S_const = self.stencil.S.copy()          # w1 I + w2 L^T L
        self.J = None                                  # Jacobian buffer (5, 3, H, W)

    def terms(self, Z: np.ndarray, n: np.ndarray | None = None) -> dict[str, float]:
        """The weighted, per-pixel parts of E(Z); ``n``: precomputed eq. 7 normals."""
        g, cfg = self.grid, self.cfg
        if n is None:
            n = _eq7(g, Z, jacobian=False)[0]
        dn = n - self.N0
        t_n = float(np.sum(self.C * _dot(dn, dn)))
        dz = g.gather(Z - self.Z0)
        t_p = cfg.w1 * _vdot(dz, dz)
        t_l = 0.0
        if cfg.w2 > 0:
            lap = _taps_apply(g, self.L, _TAPS, Z)[self.lap_rows]
            t_l = cfg.w2 * _vdot(lap, lap)
        return {"normal": t_n / g.M, "prior": t_p / g.M, "laplacian": t_l / g.M}

    def cost(self, Z: np.ndarray) -> float:
        return sum(self.terms(Z).values())

    def gauss_newton(self, Z: np.ndarray):
        """Normal equations at Z: (A, g) with A = J^T J (CSR) and g = J^T r, (M,)."""
        g, cfg = self.grid, self.cfg
        if self.J is None:
            self.J = np.empty((5, 3, g.H, g.W))
        n, _, J = _eq7(g, Z, jacobian=True, out=self.J)
        J *= self.sqc
        res = self.sqc * (n - self.N0)
        st = self.stencil
        st.S[:] = self.S_const
        # interior pixels have no centre tap: dense pass over the neighbour taps, then the
        # centre-tap products of the border pixels
        st.add_blocks(J[1:], _TAPS[1:])
        grad = _taps_T(g, J[1:], _TAPS[1:], res)
        if g.border_core.size:
            Jb = J.reshape(5, 3, -1)[:, :, g.border_core]
            st.add_center_blocks(Jb, g.border_pad)
            grad.reshape(-1)[g.border_pad] += _dot(Jb[0], res.reshape(3, -1)[:, g.border_core])
        grad += np.where(g.msk, cfg.w1 * (Z - self.Z0), 0.0)
        if cfg.w2 > 0:
            lap = np.where(self.lap_rows, _taps_apply(g, self.L, _TAPS, Z), 0.0)
            grad += _taps_T(g, cfg.w2 * self.L, _TAPS, lap)
        return st.matrix(), g.gather(grad)

    def linear_system(self):
        """The linearised problem: rows ``sqrt(c) n_e . (V_q - V_p) f / Z0_p`` for each pair
        of 4-neighbours (n_e: normalised mean of their targets), plus prior and Laplacian.
        Returns (A, rhs) of its normal equations over the unknowns."""
        g, cfg = self.grid, self.cfg
        Np = np.zeros((3, g.Hp, g.Wp))
        g.core(Np)[:] = self.N0
        Cp = np.zeros((g.Hp, g.Wp))
        g.core(Cp)[:] = self.C
        rp = g.core(g.rays)
        z0 = g.core(self.Z0)
        st = self.stencil
        st.S[:] = self.S_const
        for tap, f in (((0, 1), g.fx), ((1, 0), g.fy)):
            ne = self.N0 + g.view(Np, *tap)
            ne = ne / np.maximum(np.sqrt(_dot(ne, ne)), 1e-12)
            cq = g.view(Cp, *tap)
            ok = (self.C > 0) & (cq > 0) & g.has[_TAPS.index(tap)]
            scale = np.where(ok, np.sqrt(0.5 * (self.C + cq)) * f / z0, 0.0)
            st.add_blocks([-scale * _dot(ne, rp), scale * _dot(ne, g.view(g.rays, *tap))],
                          [(0, 0), tap])
        rhs = g.gather(np.where(g.msk, cfg.w1 * self.Z0, 0.0))
        return st.matrix(), rhs


# -------------------------------------------------------------------- linear solves
class _LinearSolver:
    """Solves A x = b by the configured method; an AMG hierarchy is kept for reuse until
    :meth:`reset`."""

    def __init__(self, method: str, rtol: float, maxiter: int):
        self.method, self.rtol, self.maxiter = method, rtol, maxiter
        self.precond = None
        self.t_precond = 0.0

    def reset(self) -> None:
        self.precond = None

    def _build(self, A: sp.csr_matrix) -> None:
        t = time.perf_counter()
        if self.method == "amg-cg":
            import pyamg

            gs = ("gauss_seidel", {"sweep": "symmetric"})
            ml = pyamg.smoothed_aggregation_solver(
                A, symmetry="symmetric", strength=None, smooth=None, improve_candidates=None,
                presmoother=gs, postsmoother=gs, coarse_solver="pinv", max_coarse=300)
            # pinv, not splu: aggregation can leave the coarsest matrix exactly singular
            # on face masks (measured at 1600x1200), which a pseudo-inverse tolerates
            self.precond = _v_cycle(ml)
        else:
            d = A.diagonal()
            inv = 1.0 / np.where(d > 0, d, 1.0)
            self.precond = lambda r: inv * r
        self.t_precond += time.perf_counter() - t

    def solve(self, A: sp.csr_matrix, b: np.ndarray, x0: np.ndarray | None = None):
        """Returns (x, CG iterations)."""
        if self.method == "direct":
            return spla.spsolve(A.tocsc(), b), 0
        if self.precond is None:
            self._build(A)
        return _pcg(A, b, x0, self.precond, self.rtol, self.maxiter)


def _v_cycle(ml):
    """One V-cycle of a pyamg hierarchy as a preconditioner r -> M^-1 r.

    The same cycle as ``ml.aspreconditioner(cycle="V")`` without its per-cycle residual
    norms (BLAS calls that are slow when the machine is busy).
    """
    levels = ml.levels

    def cycle(lvl: int, b: np.ndarray) -> np.ndarray:
        A = levels[lvl].A
        if lvl == len(levels) - 1:
            return np.asarray(ml.coarse_solver(A, b)).reshape(b.shape)
        x = np.zeros_like(b)
        levels[lvl].presmoother(A, x, b)
        x += levels[lvl].P @ cycle(lvl + 1, levels[lvl].R @ (b - A @ x))
        levels[lvl].postsmoother(A, x, b)
        return x

    return lambda r: cycle(0, r)


def _vdot(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product of two vectors without BLAS (whose threads stall on a busy machine)."""
    return float(np.einsum("i,i->", a, b))


def _pcg(A, b, x0, precond, rtol: float, maxiter: int):
    """Preconditioned conjugate gradients; stops at |r| <= rtol |b| or after maxiter.

    Returns (x, iterations).
    """
    x = np.zeros_like(b) if x0 is None else x0.copy()
    r = b.copy() if x0 is None else b - A @ x
    stop2 = rtol * rtol * _vdot(b, b)
    if _vdot(r, r) <= stop2:
        return x, 0
    z = precond(r)
    p = z.copy()
    rz = _vdot(r, z)
    it, converged = 0, False
    while it < maxiter and not converged:
        it += 1
        Ap = A @ p
        pAp = _vdot(p, Ap)
        if not pAp > 0:
            raise FitError("the height-field normal equations are not positive definite")
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        converged = _vdot(r, r) <= stop2
        if not converged:
            z = precond(r)
            rz_new = _vdot(r, z)
            p *= rz_new / rz
            p += z
            rz = rz_new
    if not converged:
        log.debug("CG reached %d iterations above rtol %.1e", maxiter, rtol)
    return x, it


# ------------------------------------------------------------------------ validation
def _check_prior_depth(z: np.ndarray) -> None:
    """Raise ShapeError unless the prior depths ``z`` of the mask pixels are finite and
    > 0 (shared with :mod:`faceps.optimize.integrate`)."""
    if not np.all(np.isfinite(z)):
        raise ShapeError(f"depth0 must be finite on the mask; {int((~np.isfinite(z)).sum())}"
                         f" of {z.size} mask pixels are NaN or infinite")
    if np.any(z <= 0):
        raise ShapeError(f"depth0 must be > 0 mm on the mask (in front of the camera); "
                         f"its minimum there is {float(z.min())}")


def _validate(normals, depth0, mask, camera, weights):
    """Checks the inputs and crops them to the bounding box of the mask (origin aligned to
    even pixels so that pyramid blocks align with the image's).

    Returns (N0, Z0, mask, C, camera, (v0, u0)): the crop's unit targets (0 where none),
    prior depth, mask, normal weights, camera, and the crop's origin in the image.
    """
    if not isinstance(camera, Camera):
        raise ShapeError(f"expected camera to be a faceps.core.camera.Camera; "
                         f"got {type(camera).__name__}")
    H, W = camera.height, camera.width
    check_shape(normals, "normals", (H, W, 3))
    check_shape(depth0, "depth0", (H, W))
    check_shape(mask, "mask", (H, W))
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ShapeError(f"expected mask to be a bool array; got dtype {mask.dtype}")
    if weights is not None:
        check_shape(weights, "weights", (H, W))
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise FitError("the mask is empty: no pixel to solve")
    v0, u0 = int(rows.min()) // 2 * 2, int(cols.min()) // 2 * 2
    crop = (slice(v0, int(rows.max()) + 1), slice(u0, int(cols.max()) + 1))
    mask = mask[crop]
    H, W = mask.shape
    Z0 = np.asarray(depth0)[crop].astype(np.float64)
    _check_prior_depth(Z0[mask])
    N = np.asarray(normals)[crop].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        nrm = np.sqrt(np.einsum("hwc,hwc->hw", N, N))
    has = mask & np.isfinite(nrm) & (nrm > 1e-6)
    if weights is None:
        C = np.ones((H, W))
    else:
        C = np.asarray(weights)[crop].astype(np.float64)
        cw = C[has]
        if not np.all(np.isfinite(cw)) or np.any(cw < 0):
            raise ShapeError("weights must be finite and >= 0 where normals are given")
    C = np.where(has, C, 0.0)
    if not np.any(C > 0):
        raise FitError("no pixel of the mask has a target normal with positive weight")
    Nu = np.where(has[..., None], N / np.where(has, nrm, 1.0)[..., None], 0.0)
    camera = camera.cropped(u0, v0, W, H)
    vv, uu = np.nonzero(C > 0)
    rays = np.einsum("ij,jn->ni", np.linalg.inv(camera.K),
                     np.stack([uu, vv, np.ones_like(uu)]).astype(np.float64))
    if np.median(np.einsum("nc,nc->n", Nu[vv, uu], rays)) > 0:
        raise FitError("the target normals point away from the camera; expected normals "
                       "facing it (n . ray < 0, n_z < 0 when frontal; DESIGN.md)")
    if camera.has_distortion:
        log.warning("camera has lens distortion; the height field assumes undistorted maps")
    return Nu, Z0, mask, C, camera, (v0, u0)


# ----------------------------------------------------------------------- public API
def height_field_normals(depth: np.ndarray, camera: Camera,
                         mask: np.ndarray | None = None) -> np.ndarray:
    """Eq. 7 pixel normals of a depth map under the perspective camera.

    Each pixel is back-projected, ``V = z * ray``; with e1..e4 the vectors to its right,
    up, left and down neighbours (counter-clockwise in the image), the normal is the
    normalised sum of ``e_k x e_(k+1)`` over the consecutive pairs whose two neighbours are
    in the mask. Interior pixels thus get ``normalise((V_r - V_l) x (V_u - V_d))``; pixels
    without any complete pair get NaN. The order makes a surface seen by the camera face it
    (``n . ray < 0``; ``n_z < 0`` when frontal).

    Args:
        depth: (H, W) z in mm; NaN marks no value.
        camera: the camera; ``camera.image_size`` must be (W, H).
        mask: optional (H, W) bool pixels to use; default: where depth is finite and > 0.
            Mask pixels whose depth is not finite and > 0 are left out.

    Returns:
        (H, W, 3) float32 unit normals in the camera frame; NaN outside the mask and
        where undefined.
    """
    H, W = camera.height, camera.width
    check_shape(depth, "depth", (H, W))
    D = np.asarray(depth, np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(D) & (D > 0)
    if mask is not None:
        check_shape(mask, "mask", (H, W))
        ok &= np.asarray(mask, bool)
    if not ok.any():
        return np.full((H, W, 3), np.nan, np.float32)
    grid = _Grid(ok, camera)
    n, norm, _ = _eq7(grid, grid.crop(np.where(ok, D, 0.0)), jacobian=False)
    return _normals_image(grid, n, norm)


def _normals_image(grid: _Grid, n: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(3, H, W) core normals -> (H, W, 3) float32 image, NaN where undefined."""
    n = np.where((grid.defined & (norm > 0))[None], n, np.nan)
    return grid.uncrop(n).astype(np.float32)


def height_field_normals_jacobian(depth: np.ndarray, camera: Camera,
                                  mask: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
    """Eq. 7 normals of the mask pixels and their Jacobian w.r.t. the depths.

    The unknowns are the mask pixels in raster order (``np.flatnonzero(mask)``).

    Args:
        depth: (H, W) z in mm, finite and > 0 on the mask.
        camera: the camera (image_size (W, H)).
        mask: (H, W) bool, non-empty.

    Returns:
        normals: (M, 3) float64 normals of the M mask pixels (NaN where undefined);
        J: (3 M, M) CSR: row ``3 i + c`` is d normals[i, c] / d depth in 1/mm; rows of
        undefined normals are zero.
    """
    H, W = camera.height, camera.width
    check_shape(depth, "depth", (H, W))
    check_shape(mask, "mask", (H, W))
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise FitError("the mask is empty")
    D = np.asarray(depth, np.float64)
    if not np.all(np.isfinite(D[mask]) & (D[mask] > 0)):
        raise ShapeError("depth must be finite and > 0 on the mask")
    grid = _Grid(mask, camera)
    n, norm, J = _eq7(grid, grid.crop(np.where(mask, D, 0.0)), jacobian=True)
    ok = grid.defined & (norm > 0)
    row_pix = grid.core(grid.index)
    rows, cols, vals = [], [], []
    for t, (dv, du) in enumerate(_TAPS):
        col = grid.view(grid.index, dv, du)
        sel = ok & (col >= 0)
        for c in range(3):
            rows.append(3 * row_pix[sel] + c)
            cols.append(col[sel])
            vals.append(J[t, c][sel])
    Jm = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(3 * grid.M, grid.M))
    normals = np.full((grid.M, 3), np.nan)
    normals[row_pix[ok]] = n[:, ok].T
    return normals, Jm


def solve_height_field(normals: np.ndarray, depth0: np.ndarray, mask: np.ndarray,
                       camera: Camera, config: HeightFieldConfig | None = None,
                       weights: np.ndarray | None = None) -> HeightFieldResult:
    """Recover the depth whose eq. 7 normals match target normals (paper eq. 7).

    Minimises ``1/M [sum c |N(Z) - N0|^2 + w1 |Z - Z0|^2 + w2 |Lap Z|^2]`` over the depths
    of the mask pixels (see the module docstring for the units of w1 and w2) by
    coarse-to-fine Gauss-Newton.

    Args:
        normals: (H, W, 3) target unit normals N0 in the camera frame, facing the camera
            (n_z < 0); NaN where there is none (such pixels are still solved, held by the
            prior, the Laplacian and their neighbours' normals). Non-unit vectors are
            normalised.
        depth0: (H, W) prior depth Z0 in mm (e.g. the coarse proxy); finite and > 0 on
            the mask. Also the start when ``config.init == "depth0"``.
        mask: (H, W) bool region to solve (non-empty).
        camera: the (undistorted) camera of the maps, image_size (W, H).
        config: options; default :class:`HeightFieldConfig` ().
        weights: optional (H, W) confidence c >= 0 of the normal term (default 1).

    Returns:
        :class:`HeightFieldResult`.

    Raises:
        ShapeError: wrong shapes, depth0 not finite and > 0 on the mask, bad weights.
        FitError: empty mask, no target normal, normals facing away, solver failure.
    """
    cfg = config if config is not None else HeightFieldConfig()
    t_all = time.perf_counter()
    full_mask = np.asarray(mask)
    N0, Z0, mask, C, crop_camera, (v0, u0) = _validate(normals, depth0, mask, camera, weights)
    timings = {"validate": time.perf_counter() - t_all}

    pyramid = [(N0, Z0, mask, C, crop_camera)]
    while len(pyramid) < cfg.levels:
        nxt = _downsample(*pyramid[-1])
        if nxt[2].sum() < cfg.min_level_pixels:
            break
        pyramid.append(nxt)
    Zinit, levels = None, []
    t = time.perf_counter()
    for lvl in range(len(pyramid) - 1, 0, -1):
        out = _solve_level(*pyramid[lvl], cfg, int(cfg.coarse_iterations), Zinit, {})
        g = out["grid"]
        Zinit = _upsample(g.uncrop(np.where(g.msk, out["Z"], np.nan)), pyramid[lvl - 1][2])
        levels.append(out["summary"])
        log.debug("height field level %d: %s", lvl, out["summary"])
    timings["coarse"] = time.perf_counter() - t

    out = _solve_level(*pyramid[0], cfg, int(cfg.iterations), Zinit, timings)
    levels.append(out["summary"])
    t = time.perf_counter()
    grid = out["grid"]
    H, W = camera.height, camera.width
    h, w = mask.shape
    depth = np.full((H, W), np.nan, np.float32)
    depth[v0:v0 + h, u0:u0 + w] = grid.uncrop(np.where(grid.msk, out["Z"], np.nan))
    result_normals = np.full((H, W, 3), np.nan, np.float32)
    result_normals[v0:v0 + h, u0:u0 + w] = _normals_image(grid, out["n"], out["norm"])
    timings["output"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    log.info("height field: %d px, %d levels, %d iterations, cost %.4g -> %.4g, %.2f s",
             grid.M, len(levels), out["iterations"], out["history"][0], out["history"][-1],
             timings["total"])
    return HeightFieldResult(depth=depth, normals=result_normals, mask=full_mask.copy(),
                             converged=out["converged"], iterations=out["iterations"],
                             history=out["history"], terms=out["terms"],
                             cg_iterations=out["cg"], levels=levels, timings=timings)


def depth_breaks(depth: np.ndarray, mask: np.ndarray, camera: Camera, ratio: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Depth discontinuities between 4-neighbours of a mask.

    Args:
        depth: (H, W) z in mm (finite on the mask).
        mask: (H, W) bool.
        camera: its camera (focal lengths).
        ratio: a jump counts when ``|z_p - z_q|`` exceeds ``ratio`` pixel footprints
            (``mean z / f``).

    Returns:
        (cut_u, cut_v): (H, W) bool, pixel and its right neighbour / the one below are
        both in the mask and separated by a jump.
    """
    Z = np.where(mask, np.asarray(depth, np.float64), np.nan)
    fx, fy = float(camera.K[0, 0]), float(camera.K[1, 1])
    cut_u = np.zeros(Z.shape, bool)
    cut_v = np.zeros(Z.shape, bool)
    with np.errstate(invalid="ignore"):  # NaN outside the mask: never a break
        a, b = Z[:, :-1], Z[:, 1:]
        cut_u[:, :-1] = np.abs(a - b) > ratio * 0.5 * (a + b) / fx
        a, b = Z[:-1], Z[1:]
        cut_v[:-1] = np.abs(a - b) > ratio * 0.5 * (a + b) / fy
    return cut_u, cut_v


def _solve_level(N0, Z0, mask, C, camera, cfg: HeightFieldConfig, iterations: int,
                 Zinit, timings: dict) -> dict:
    """Initialisation and Gauss-Newton on one resolution.

    Returns a dict: ``Z`` (padded depth grid), ``grid``, ``n``/``norm`` (eq. 7 normals of
    Z), ``history``, ``iterations``, ``converged``, ``terms``, ``cg`` and ``summary``.
    """
    for key in ("init", "assemble", "precondition", "solve", "line_search"):
        timings.setdefault(key, 0.0)
    t = time.perf_counter()
    breaks = depth_breaks(Z0, mask, camera, cfg.break_ratio) if cfg.break_ratio > 0 else None
    grid = _Grid(mask, camera, breaks)
    Z0g = grid.crop(np.where(mask, Z0, 1.0), fill=1.0)
    prob = _Problem(grid, grid.core(grid.crop(N0)), grid.core(grid.crop(C)), Z0g, cfg)
    solver = _LinearSolver(cfg.solver, cfg.cg_tol, int(cfg.cg_maxiter))
    cg_counts: list[int] = []

    if Zinit is not None:
        # outside the mask Z0 may be NaN (no prior there): those grid cells hold 1.0, as
        # in the other initialisations, so no NaN reaches the Jacobian through a zero weight
        Z = grid.crop(np.where(mask, np.where(np.isfinite(Zinit), Zinit, Z0), 1.0), fill=1.0)
    elif cfg.init == "linear":
        A, b = prob.linear_system()
        x, nit = solver.solve(A, b, grid.gather(Z0g))
        cg_counts.append(nit)
        if np.all(np.isfinite(x)) and np.all(x > 0):
            Z = grid.scatter(x, fill=1.0)
        else:
            log.warning("height field: the linear initialisation gave non-positive depths; "
                        "starting from depth0")
            Z = Z0g.copy()
        solver.reset()          # the Gauss-Newton matrices differ: new hierarchy
    else:
        Z = Z0g.copy()
    n, norm, _ = _eq7(grid, Z, jacobian=False)
    cost = sum(prob.terms(Z, n).values())
    timings["init"] += time.perf_counter() - t - solver.t_precond
    timings["precondition"] += solver.t_precond
    solver.t_precond = 0.0

    history = [cost]
    converged = False
    done = 0
    for it in range(1, iterations + 1):
        t = time.perf_counter()
        A, grad = prob.gauss_newton(Z)
        timings["assemble"] += time.perf_counter() - t
        t = time.perf_counter()
        dz, nit = solver.solve(A, -grad)
        timings["solve"] += time.perf_counter() - t - solver.t_precond
        timings["precondition"] += solver.t_precond
        solver.t_precond = 0.0
        cg_counts.append(nit)

        t = time.perf_counter()
        z = grid.gather(Z)
        step, accepted = 1.0, None
        for _ in range(_LINE_SEARCH_HALVINGS + 1):
            zn = z + step * dz
            if np.all(np.isfinite(zn)) and np.all(zn > 0):
                Zn = grid.scatter(zn, fill=1.0)
                nn, normn, _ = _eq7(grid, Zn, jacobian=False)
                cn = sum(prob.terms(Zn, nn).values())
                if cn <= cost:
                    accepted = (Zn, nn, normn, cn)
                    break
            step *= 0.5
        timings["line_search"] += time.perf_counter() - t
        if accepted is None:
            log.debug("height field: no decrease at iteration %d; stopping", it)
            converged = True
            break
        rel = (cost - accepted[3]) / max(cost, 1e-300)
        Z, n, norm, cost = accepted
        history.append(cost)
        done = it
        if rel < cfg.tol:
            converged = True
            break
    summary = {"pixels": int(grid.M), "iterations": done, "cost": float(cost),
               "cg_iterations": cg_counts}
    return {"Z": Z, "grid": grid, "n": n, "norm": norm, "history": history,
            "iterations": done, "converged": converged, "terms": prob.terms(Z, n),
            "cg": cg_counts, "summary": summary}


# ---------------------------------------------------------------------------- pyramid
def _downsample(N0, Z0, mask, C, camera):
    """Half resolution by 2x2 averaging over the mask pixels of each block (normals
    weighted by C and renormalised); a coarse pixel is in the mask when any of its four
    children is. Returns (N0, Z0, mask, C, camera) of the coarse level."""
    H, W = mask.shape
    H2, W2 = (H + 1) // 2, (W + 1) // 2
    cnt = block_sum_2x2(mask)
    mask2 = cnt > 0
    safe = np.maximum(cnt, 1.0)
    Z2 = np.where(mask2, block_sum_2x2(np.where(mask, Z0, 0.0)) / safe, 1.0)
    wC = np.where(mask, C, 0.0)
    # NaN (no target) times a zero weight is still NaN: zero those normals first
    Nsum = block_sum_2x2(np.where((mask & (wC > 0))[..., None], np.nan_to_num(N0), 0.0)
                     * wC[..., None])
    nn = np.linalg.norm(Nsum, axis=-1)
    C2 = block_sum_2x2(wC) / safe
    ok = mask2 & (nn > 1e-9) & (C2 > 0)
    N2 = np.where(ok[..., None], Nsum / np.where(ok, nn, 1.0)[..., None], 0.0)
    C2 = np.where(ok, C2, 0.0)
    # pixel centres: coarse u = (fine u + 0.5) / 2 - 0.5
    K = camera.K.copy()
    K[:2] *= 0.5
    K[0, 2] = (camera.K[0, 2] + 0.5) * 0.5 - 0.5
    K[1, 2] = (camera.K[1, 2] + 0.5) * 0.5 - 0.5
    return N2, Z2, mask2, C2, Camera(K, (W2, H2))


def _upsample(Zc: np.ndarray, mask_f: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of a coarse depth map (Hc, Wc) (NaN outside its mask) to the
    fine image of ``mask_f`` (coarse u = (fine u + 0.5) / 2 - 0.5), normalised over the
    finite coarse values; NaN where there is none and outside the bounding box of
    ``mask_f``."""
    Hc, Wc = Zc.shape
    H, W = mask_f.shape
    out = np.full((H, W), np.nan)
    rows, cols = np.nonzero(mask_f)
    if rows.size == 0:
        return out
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    y = (np.arange(r0, r1) + 0.5) / 2 - 0.5
    x = (np.arange(c0, c1) + 0.5) / 2 - 0.5
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = y - y0, x - x0
    valid = np.isfinite(Zc)
    Zf = np.where(valid, Zc, 0.0)
    num = np.zeros((y.size, x.size))
    den = np.zeros((y.size, x.size))
    for dy, fy in ((0, 1 - wy), (1, wy)):
        yy = np.clip(y0 + dy, 0, Hc - 1)
        for dx, fx in ((0, 1 - wx), (1, wx)):
            xx = np.clip(x0 + dx, 0, Wc - 1)
            w = fy[:, None] * fx[None, :] * valid[np.ix_(yy, xx)]
            num += w * Zf[np.ix_(yy, xx)]
            den += w
    out[r0:r1, c0:c1] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out
