"""Fine facial detail for synthetic faces: subdivision to the pixel scale and procedural
displacement (forehead and eye wrinkles, nasolabial folds, skin roughness and pores).

The detail is a height field h (mm, positive outward) defined on the *mean shape* of the
model, placed with the mean shape's landmarks, so it stays attached to the same anatomy
whatever the identity, expression and pose. The detailed surface is ``G_sub + h * n`` with
``G_sub`` the subdivided coarse geometry (optionally curved by Phong tessellation so that
the coarse facets do not show, :func:`phong_tessellate`) and ``n`` its vertex normals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from faceps.core.errors import ConfigError
from faceps.core.mesh import vertex_normals

__all__ = ["DEFAULT_SMOOTHING", "DetailConfig", "DetailParams", "sample_detail",
           "detail_height", "subdivide", "subdivision_operator", "detailed_mesh",
           "facing_triangles", "grow_selection", "phong_tessellate"]

#: Phong-tessellation shape factor of subdivided faces by default (:func:`phong_tessellate`):
#: off, the flat facets of midpoint subdivision. 1/2 reproduces quadratic surfaces and is
#: the value to use; it is not the default because the proxy-guided light calibration
#: measured worse on the faces it renders (bench/RESULTS.md, "Flat facets")
DEFAULT_SMOOTHING = 0.0


@dataclass(frozen=True)
class DetailConfig:
    """Ranges for random fine detail. Amplitudes in mm, spacings in mm.

    Attributes:
        amplitude: global factor on every detail amplitude (0 disables detail).
        frequency: global factor on spatial frequencies (>1: finer detail).
        forehead: range of forehead-wrinkle depth.
        crows_feet: range of eye-corner wrinkle depth.
        under_eye: range of under-eye fold depth.
        nasolabial: range of nasolabial-fold depth.
        roughness: range of low-amplitude skin roughness (mid-frequency noise).
        pores: range of pore depth.
        wrinkle_spacing: range of forehead-wrinkle spacing.
        bumps: range of the amplitude of off-model shape variation: smooth bumps and dents
            6-25 mm across scattered over the face (each bump's height is this amplitude
            times a standard normal draw). They change the surface at scales a morphable
            model spans only in part, so a network trained on them cannot rely on the
            proxy for mid-frequency shape. Off by default; the global ``amplitude`` does
            not scale them.
    """

    amplitude: float = 1.0
    frequency: float = 1.0
    forehead: tuple[float, float] = (0.05, 0.45)
    crows_feet: tuple[float, float] = (0.03, 0.30)
    under_eye: tuple[float, float] = (0.05, 0.35)
    nasolabial: tuple[float, float] = (0.2, 1.2)
    roughness: tuple[float, float] = (0.01, 0.05)
    pores: tuple[float, float] = (0.01, 0.04)
    wrinkle_spacing: tuple[float, float] = (7.0, 12.0)
    bumps: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.amplitude < 0 or self.frequency <= 0:
            raise ConfigError("detail amplitude must be >= 0 and frequency > 0")
        object.__setattr__(self, "bumps", tuple(float(b) for b in self.bumps))
        if len(self.bumps) != 2 or not 0 <= self.bumps[0] <= self.bumps[1]:
            raise ConfigError(f"detail bumps must be a range 0 <= low <= high (mm); "
                              f"got {self.bumps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DetailParams:
    """One random draw of fine detail (all amplitudes in mm)."""

    forehead: float
    crows_feet: float
    under_eye: float
    nasolabial: float
    roughness: float
    pores: float
    spacing: float
    frequency: float
    seed: int
    bumps: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def sample_detail(rng: np.random.Generator, config: DetailConfig = DetailConfig()) -> DetailParams:
    """Draw detail parameters; ages vary, so wrinkle depths are correlated through one
    'age' factor in [0, 1]."""
    age = rng.beta(1.6, 1.6)

    def pick(r: tuple[float, float], corr: float = 0.7) -> float:
        u = corr * age + (1 - corr) * rng.random()
        return config.amplitude * (r[0] + (r[1] - r[0]) * u)

    return DetailParams(
        forehead=pick(config.forehead), crows_feet=pick(config.crows_feet),
        under_eye=pick(config.under_eye), nasolabial=pick(config.nasolabial, 0.5),
        roughness=pick(config.roughness, 0.2), pores=pick(config.pores, 0.1),
        spacing=float(rng.uniform(*config.wrinkle_spacing)) / config.frequency,
        frequency=config.frequency, seed=int(rng.integers(2**31 - 1)),
        # drawn only when asked for, so that faces without bumps keep their old draws
        bumps=float(rng.uniform(*config.bumps)) if config.bumps[1] > 0 else 0.0,
    )


# ----------------------------------------------------------------- subdivision
def subdivision_operator(triangles: np.ndarray, n_vertices: int, levels: int
                         ) -> tuple[sp.csr_matrix, np.ndarray]:
    """Midpoint (1-to-4) subdivision as a sparse linear map.

    Returns:
        (S, F): S (V', V) sparse so that ``S @ X`` subdivides any per-vertex quantity X;
        F (F', 3) int32 subdivided triangles (counter-clockwise order kept).
    """
    return _subdivision_operator(np.ascontiguousarray(triangles, np.int64).tobytes(),
                                 int(n_vertices), int(levels))


@lru_cache(maxsize=8)
def _subdivision_operator(tri_bytes: bytes, n_vertices: int, levels: int):
    F = np.frombuffer(tri_bytes, dtype=np.int64).reshape(-1, 3)
    S = sp.identity(n_vertices, format="csr")
    nv = n_vertices
    for _ in range(levels):
        e = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
        e.sort(axis=1)
        # unique edges through one int64 key (much faster than np.unique(axis=0))
        key = e[:, 0] * np.int64(nv) + e[:, 1]
        ukey, inv = np.unique(key, return_inverse=True)
        inv = inv.reshape(-1)
        uniq = np.stack([ukey // nv, ukey % nv], axis=1)
        ne = uniq.shape[0]
        rows = np.concatenate([np.arange(nv), np.repeat(nv + np.arange(ne), 2)])
        cols = np.concatenate([np.arange(nv), uniq.reshape(-1)])
        vals = np.concatenate([np.ones(nv), np.full(2 * ne, 0.5)])
        step = sp.csr_matrix((vals, (rows, cols)), shape=(nv + ne, nv))
        nf = F.shape[0]
        m01, m12, m20 = (nv + inv[:nf], nv + inv[nf:2 * nf], nv + inv[2 * nf:])
        F = np.concatenate([
            np.stack([F[:, 0], m01, m20], 1), np.stack([m01, F[:, 1], m12], 1),
            np.stack([m20, m12, F[:, 2]], 1), np.stack([m01, m12, m20], 1)])
        S = (step @ S).tocsr()
        nv += ne
    S.sort_indices()
    return S, F.astype(np.int32)


def subdivide(vertices: np.ndarray, triangles: np.ndarray, levels: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-subdivide a mesh ``levels`` times: (V', 3) vertices, (F', 3) triangles."""
    S, F = subdivision_operator(triangles, vertices.shape[0], levels)
    return S @ np.asarray(vertices, np.float64), F


# ------------------------------------------------------------------- detail field
@lru_cache(maxsize=64)
def _noise_tile(seed: int, size: int = 256, sigma: float = 1.0) -> np.ndarray:
    """A periodic band-limited noise tile with zero mean and unit std (cached: callers
    pick one of a small bank of tiles and shift it)."""
    rng = np.random.default_rng(seed)
    spec = np.fft.fft2(rng.standard_normal((size, size)))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    spec *= np.exp(-0.5 * (fx**2 + fy**2) * (2 * np.pi * sigma) ** 2)
    tile = np.real(np.fft.ifft2(spec))
    return (tile - tile.mean()) / max(tile.std(), 1e-12)


@lru_cache(maxsize=64)
def _wrapped_tile(seed: int, size: int = 256, sigma: float = 1.0) -> np.ndarray:
    """The tile of :func:`_noise_tile` with its first row and column repeated after the
    last, flattened: the four bilinear neighbours of cell (v, u) are at ``i = v * (n + 1) +
    u``, ``i + 1``, ``i + n + 1`` and ``i + n + 2`` (no modulo in the lookup)."""
    tile = _noise_tile(seed, size, sigma)
    return np.pad(tile, ((0, 1), (0, 1)), mode="wrap").reshape(-1)


def _sample_tile(tile: np.ndarray, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Bilinear lookup of a periodic tile at coordinates (mm) with the given period (mm).

    ``tile`` is a flattened wrapped tile of :func:`_wrapped_tile` ((n + 1)^2 values)."""
    n = int(round(np.sqrt(tile.size))) - 1
    u = x * (n / period)
    v = y * (n / period)
    u0 = np.floor(u)
    v0 = np.floor(v)
    fu = u - u0
    fv = v - v0
    ui, vi = u0.astype(np.intp), v0.astype(np.intp)
    if n & (n - 1) == 0:                 # power of two: & is the (non-negative) modulo
        ui &= n - 1
        vi &= n - 1
    else:
        ui %= n
        vi %= n
    i = vi * (n + 1) + ui
    a, b = tile[i], tile[i + 1]
    c, d = tile[i + (n + 1)], tile[i + (n + 2)]
    top = a + fu * (b - a)
    return top + fv * ((c + fu * (d - c)) - top)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _within(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float
            ) -> np.ndarray:
    """Indices of the points inside a box: wrinkle terms are evaluated only there."""
    return np.nonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))[0]


def detail_height(rest: np.ndarray, landmarks: np.ndarray, params: DetailParams,
                  region: np.ndarray | None = None, z_back: float | None = None
                  ) -> np.ndarray:
    """Procedural detail height (mm, positive outward) at rest-shape positions.

    Args:
        rest: (N, 3) positions on the model's mean shape (model frame, mm).
        landmarks: (68, 3) iBUG landmark positions on the mean shape (NaN where missing).
        params: the detail draw.
        region: optional (N,) weights in [0, 1] (e.g. the face region) multiplying wrinkles.
        z_back: z (mm, model frame) of the back of the mean shape, where the folds under
            the eyes and beside the nose have faded out (they grow over the next 40 mm);
            default: the smallest z of ``rest``. Pass the whole mean shape's value so that
            the detail does not depend on which points are evaluated.

    Returns:
        (N,) float64 heights.
    """
    x, y, z = rest[:, 0], rest[:, 1], rest[:, 2]
    lm = np.asarray(landmarks, np.float64)
    rng = np.random.default_rng(params.seed)
    h = np.zeros(rest.shape[0])

    def lmk(i: int, fallback: tuple[float, float, float]) -> np.ndarray:
        p = lm[i]
        return np.asarray(fallback, np.float64) if not np.all(np.isfinite(p)) else p

    brow_r, brow_l = lmk(19, (-30, 35, 90)), lmk(24, (30, 35, 90))
    eye_r_out, eye_l_out = lmk(36, (-45, 25, 80)), lmk(45, (45, 25, 80))
    eye_r_c = 0.5 * (lmk(37, (-35, 28, 85)) + lmk(40, (-35, 22, 85)))
    eye_l_c = 0.5 * (lmk(43, (35, 28, 85)) + lmk(46, (35, 22, 85)))
    nose_r, nose_l = lmk(31, (-15, -10, 100)), lmk(35, (15, -10, 100))
    mouth_r, mouth_l = lmk(48, (-25, -35, 90)), lmk(54, (25, -35, 90))
    brow_y = 0.5 * (brow_r[1] + brow_l[1])
    eye_span = max(abs(eye_l_out[0] - eye_r_out[0]), 1.0)
    if z_back is None:
        z_back = float(np.nanmin(z)) if z.size else 0.0
    front = _smoothstep(-10.0, 30.0, z - z_back)

    # forehead: horizontal grooves, gently curved, fading toward the temples and hairline
    if params.forehead > 0:
        s = params.spacing
        n_lines = rng.integers(2, 5)
        base = brow_y + rng.uniform(10, 14)
        curve = rng.uniform(-0.004, 0.006)
        width = rng.uniform(0.9, 1.6) / params.frequency
        xw = 0.42 * eye_span + 10
        top = base + n_lines * s + 10
        ii = _within(x, y, -2.2 * xw, 2.2 * xw, brow_y + 5, top)
        xi, yi = x[ii], y[ii]
        grooves = np.zeros(ii.size)
        for k in range(n_lines):
            yk = base + k * s * rng.uniform(0.85, 1.15)
            wobble = 0.8 * np.sin(xi / rng.uniform(9, 16) + rng.uniform(0, 6.3))
            amp = rng.uniform(0.6, 1.0)
            grooves += amp * np.exp(-(((yi - yk - curve * xi**2 - wobble) / width) ** 2))
        window = (np.exp(-((xi / xw) ** 4))
                  * _smoothstep(brow_y + 5, brow_y + 11, yi)
                  * (1 - _smoothstep(base + n_lines * s, top, yi)))
        h[ii] -= params.forehead * grooves * window

    # crow's feet: lines fanning out from the outer eye corners
    if params.crows_feet > 0:
        for corner, sign in ((eye_r_out, -1.0), (eye_l_out, 1.0)):
            ii = _within(x, y, corner[0] - 27, corner[0] + 27, corner[1] - 27, corner[1] + 27)
            dx, dy = sign * (x[ii] - corner[0]), y[ii] - corner[1]
            r = np.hypot(dx, dy)
            ang = np.arctan2(dy, dx)
            lines = np.zeros(ii.size)
            for th in rng.uniform(-0.7, 0.7, size=rng.integers(3, 6)):
                dist = r * np.sin(ang - th)
                lines += np.exp(-((dist / (0.7 / params.frequency)) ** 2)) * (np.cos(ang - th) > 0)
            window = _smoothstep(3, 7, r) * (1 - _smoothstep(16, 26, r))
            h[ii] -= params.crows_feet * lines * window

    # under-eye folds: arcs below each eye
    if params.under_eye > 0:
        for c in (eye_r_c, eye_l_c):
            rx = 0.28 * eye_span
            ii = _within(x, y, c[0] - 3 * rx, c[0] + 3 * rx, c[1] - 20, c[1] + 30)
            t = (x[ii] - c[0]) / rx
            arc_y = c[1] - rng.uniform(7, 10) + 3.0 * t**2
            h[ii] -= (params.under_eye * np.exp(-(((y[ii] - arc_y) / 1.5) ** 2))
                      * np.exp(-(t**2) * 1.3) * front[ii])

    # nasolabial folds: from beside the nose wing to beyond the mouth corner
    if params.nasolabial > 0:
        for a, b, sign in ((nose_r, mouth_r, -1.0), (nose_l, mouth_l, 1.0)):
            p0 = a + np.array([sign * 8.0, 3.0, 0.0])
            p1 = b + np.array([sign * 6.0, -8.0, 0.0])
            ii = _within(x, y, min(p0[0], p1[0]) - 16, max(p0[0], p1[0]) + 16,
                         min(p0[1], p1[1]) - 12, max(p0[1], p1[1]) + 12)
            xi, yi = x[ii], y[ii]
            seg = p1[:2] - p0[:2]
            L = max(np.linalg.norm(seg), 1e-6)
            d = np.stack([xi - p0[0], yi - p0[1]], 1)
            t = np.clip(d @ seg / L**2, 0.0, 1.0)
            bow = sign * 4.0 * np.sin(np.pi * t)  # the fold bows outward
            px = p0[0] + t * seg[0] + bow
            py = p0[1] + t * seg[1]
            dist = np.hypot(xi - px, yi - py)
            fade = np.sin(np.pi * np.clip(t, 0, 1)) ** 0.5
            h[ii] -= params.nasolabial * np.exp(-((dist / 2.8) ** 2)) * fade * front[ii]

    # off-model shape variation: smooth bumps and dents over the face (a generator of its
    # own, so the wrinkles above keep their draws)
    if params.bumps > 0:
        brng = np.random.default_rng([params.seed, 1])
        chin_y = lmk(8, (0, -70, 95))[1]
        x0, x1 = eye_r_out[0] - 15, eye_l_out[0] + 15
        y0, y1 = chin_y, brow_y + 45
        n = int(brng.integers(12, 31))
        cx, cy = brng.uniform(x0, x1, n), brng.uniform(y0, y1, n)
        radius = brng.uniform(6.0, 25.0, n)
        # smaller bumps are shallower: slopes stay within those of real faces
        amp = params.bumps * brng.standard_normal(n) * np.sqrt(radius / 25.0)
        # fade out from 30 to 60 mm behind the outer eye corners (sides and back of head)
        eye_z = 0.5 * (eye_r_out[2] + eye_l_out[2])
        ahead = _smoothstep(eye_z - 60.0, eye_z - 30.0, z)
        for k in range(n):
            ii = _within(x, y, cx[k] - 3 * radius[k], cx[k] + 3 * radius[k],
                         cy[k] - 3 * radius[k], cy[k] + 3 * radius[k])
            d2 = ((x[ii] - cx[k]) ** 2 + (y[ii] - cy[k]) ** 2) / radius[k] ** 2
            h[ii] += amp[k] * np.exp(-d2) * ahead[ii]

    if region is not None:
        h *= np.clip(region, 0.0, 1.0)

    # skin roughness and pores everywhere on the skin: one of a bank of periodic noise
    # tiles, shifted by a random offset
    bank = 16
    if params.roughness > 0:
        tile = _wrapped_tile(params.seed % bank, 256, sigma=2.0)
        per = 60.0 / params.frequency
        ox, oy = rng.uniform(0, per, 2)
        h += params.roughness * (_sample_tile(tile, x + ox, y + oy, per)
                                 + 0.5 * _sample_tile(tile, z + oy, y + 17.0 + ox, per))
    if params.pores > 0:
        tile = _wrapped_tile(bank + params.seed % bank, 256, sigma=0.8)
        per = 24.0 / params.frequency
        ox, oy = rng.uniform(0, per, 2)
        pores = _sample_tile(tile, x + ox, y + oy, per)
        h -= params.pores * np.maximum(pores - 0.8, 0.0) * 2.0
    return h


def phong_tessellate(S: sp.spmatrix, coarse: np.ndarray, normals: np.ndarray, alpha: float,
                     weight: np.ndarray | None = None) -> np.ndarray:
    """Phong tessellation (Boubekeur and Alexa 2008) of a midpoint-subdivided mesh.

    Midpoint subdivision leaves a coarse mesh's flat facets flat: rendered at a finer
    scale than its triangles (a 3-4 mm triangle of a 3448-vertex model spans several
    pixels of a 640x480 face), its shading shows every facet, which no face or usual
    renderer has. Phong tessellation curves each coarse triangle into the quadratic patch
    through its corners that follows the corners' normals: a point ``p`` with barycentric
    weights ``w_i`` moves to ``(1 - alpha) p + alpha sum_i w_i pi_i(p)``, ``pi_i`` the
    projection onto corner i's tangent plane. Patches meet along the curve their shared
    edge's two corners define, so the surface has no cracks, and the corners stay where
    they are (landmarks and the proxy's vertices are unchanged).

    With ``alpha = 1/2`` the patch is exact to second order: on a quadratic surface whose
    normals the corners carry, the sum of a point's distances to the corners' tangent
    planes is twice the linear interpolant's error there, so half of it moves the point
    onto the surface (a 80-triangle sphere: facets 6.5 mm off, 0.6 mm after).

    Args:
        S: (V', V) subdivision operator (rows: the barycentric weights of the coarse
            corners of the triangle each subdivided vertex lies in).
        coarse: (V, 3) coarse vertex positions; normals: (V, 3) their unit normals.
        alpha: shape factor (0: flat facets; 1/2 exact on quadrics; 3/4 the authors'
            visual choice).
        weight: optional (V',) share of each vertex's weights on refined coarse triangles
            (``detailed_mesh``); vertices with none lie on edges of triangles left coarse
            and stay on those straight edges, so that the T-junctions have no cracks.

    Returns:
        (V', 3) subdivided vertices (``S @ coarse`` when ``alpha`` is 0).
    """
    p = np.asarray(S @ coarse)
    if alpha == 0:
        return p
    C = S.tocoo()
    # signed distance of each subdivided vertex from each of its corners' tangent planes
    d = np.einsum("ij,ij->i", p[C.row] - coarse[C.col], normals[C.col])
    M = sp.csr_matrix((C.data * d, (C.row, C.col)), shape=S.shape)
    off = M @ normals
    if weight is not None:
        off *= (weight > 0)[:, None]
    return p - alpha * off


def detailed_mesh(geometry: np.ndarray, rest: np.ndarray, triangles: np.ndarray,
                  landmarks_rest: np.ndarray, params: DetailParams | None, levels: int,
                  region: np.ndarray | None = None, refine: np.ndarray | None = None,
                  smoothing: float = DEFAULT_SMOOTHING
                  ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Subdivide a coarse face and displace it by procedural detail.

    Args:
        geometry: (V, 3) coarse vertex positions (any frame; displacement follows its
            normals).
        rest: (V, 3) the model's mean shape (model frame) that anchors the detail.
        triangles: (F, 3) coarse triangles.
        landmarks_rest: (68, 3) landmarks of the mean shape.
        params: detail draw, or None for no displacement.
        levels: midpoint-subdivision levels (0: none).
        region: optional (V,) weights in [0, 1] where wrinkles may appear.
        refine: optional (F,) bool, the coarse triangles to subdivide (e.g. those facing
            the camera); the others stay coarse. Displacement fades to zero on the
            vertices the two parts share, so the T-junctions between them have no cracks.
        smoothing: Phong-tessellation shape factor of the subdivided triangles
            (:func:`phong_tessellate`; 0: flat facets).

    Returns:
        (vertices (V', 3), triangles (F', 3), S (V', V) subdivision operator); S maps any
        per-vertex quantity of the coarse mesh to the returned vertices.
    """
    tri = np.asarray(triangles)
    nV, nF = geometry.shape[0], tri.shape[0]
    S, F = subdivision_operator(tri, nV, levels)
    weight = None
    if refine is not None and levels > 0 and not np.all(refine):
        refine = np.asarray(refine, bool)
        # children of coarse triangle f at the finest level are f + k * nF
        keep_fine = np.tile(refine, F.shape[0] // nF)
        F = np.concatenate([F[keep_fine], tri[~refine].astype(F.dtype)])
        used = np.zeros(S.shape[0], bool)
        used[F.reshape(-1)] = True
        ids = np.nonzero(used)[0]
        remap = -np.ones(S.shape[0], np.int64)
        remap[ids] = np.arange(ids.size)
        S = S[ids]
        F = remap[F].astype(np.int32)
        outside = np.zeros(nV, bool)
        outside[tri[~refine].reshape(-1)] = True
        weight = S @ (~outside).astype(np.float64)
    coarse = np.asarray(geometry, np.float64)
    smooth = smoothing > 0 and levels > 0
    # the coarse surface's normals: for the tessellation and the displacement
    nc = vertex_normals(coarse, tri) if smooth or params is not None else None
    G = phong_tessellate(S, coarse, nc, smoothing, weight) if smooth else S @ coarse
    if params is None:
        return G, F, S
    R = S @ np.asarray(rest, np.float64)
    reg = None if region is None else S @ np.asarray(region, np.float64)
    # the whole coarse mean shape's back: the same detail whichever triangles are refined
    h = detail_height(R, landmarks_rest, params, reg, z_back=float(np.min(rest[:, 2])))
    if weight is not None:
        h *= np.clip(weight, 0.0, 1.0) == 1.0  # no displacement where coarse parts meet
    # displace along the coarse surface's normals, interpolated (smooth, and far cheaper
    # than the normals of the subdivided mesh)
    n = S @ nc
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return G + h[:, None] * n, F, S


def facing_triangles(vertices_cam: np.ndarray, triangles: np.ndarray, margin: float = 0.25,
                     rings: int = 2) -> np.ndarray:
    """(F,) bool coarse triangles that face the camera (at the origin) or lie within
    ``rings`` triangle rings of one that does; ``margin`` admits slightly back-facing
    triangles (cosine) so silhouettes and displaced detail stay covered."""
    V = np.asarray(vertices_cam, np.float64)
    F = np.asarray(triangles, np.int64)
    # column by column (contiguous gathers; several times faster than V[F] on (F, 3, 3))
    f = [np.ascontiguousarray(F[:, k]) for k in range(3)]
    cols = [np.ascontiguousarray(V[:, k]) for k in range(3)]
    p = [[c[fk] for fk in f] for c in cols]                  # p[axis][corner]
    e1 = [p[a][1] - p[a][0] for a in range(3)]
    e2 = [p[a][2] - p[a][0] for a in range(3)]
    n = [e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2],
         e1[0] * e2[1] - e1[1] * e2[0]]
    c = [(p[a][0] + p[a][1] + p[a][2]) / 3.0 for a in range(3)]
    dot = n[0] * c[0] + n[1] * c[1] + n[2] * c[2]
    norms = np.sqrt((n[0] ** 2 + n[1] ** 2 + n[2] ** 2) * (c[0] ** 2 + c[1] ** 2 + c[2] ** 2))
    sel = -dot > -margin * np.maximum(norms, 1e-12)
    return grow_selection(sel, F, rings)


def grow_selection(selected: np.ndarray, triangles: np.ndarray, rings: int) -> np.ndarray:
    """(F,) bool: the selected triangles and those within ``rings`` vertex-sharing rings
    of them.

    Args:
        selected: (F,) bool.
        triangles: (F, 3) vertex ids.
        rings: how many times to add the triangles that share a vertex with the selection.
    """
    F = np.asarray(triangles, np.int64)
    sel = np.asarray(selected, bool).copy()
    if F.size == 0:
        return sel
    f = [np.ascontiguousarray(F[:, k]) for k in range(3)]
    vmask = np.zeros(int(F.max()) + 1, bool)
    for _ in range(rings):
        vmask[:] = False
        for fk in f:
            vmask[fk[sel]] = True
        sel = vmask[f[0]] | vmask[f[1]] | vmask[f[2]]
    return sel
