"""In-the-wild lighting for synthetic faces: environment light as second-order spherical
harmonics, an optional distant light with hard shadows, procedural backgrounds and
hair- and accessory-like occluders.

The near point lights of the capture rig are one way to light a face; the single-image
normal methods (Cas-FNE, exemplar-modulated, cross-modal; ``../shared/papers``) are
trained and tested on photographs lit by whatever surrounds the subject. This module draws
such lighting and shades the visible surface under it; :func:`faceps.synth.faces.render_face`
renders with it when given a :class:`WildScene`.

Conventions. Directions are in the OpenCV camera frame (x right, y down, z forward), so
"from above" is ``-y`` and the camera's side of the face is ``-z``. The environment is a
radiance function L(w) over incoming directions w (from the surface toward the light),
stored as 9 real spherical-harmonic coefficients per colour (:data:`SH_ORDER`: bands
l = 0, 1, 2 in the order Y00, Y1-1, Y10, Y11, Y2-2, Y2-1, Y20, Y21, Y22 of Ramamoorthi and
Hanrahan 2001). A Lambertian surface of albedo a and normal n then has radiance
``a E(n) / pi`` with the irradiance ``E(n) = sum_l A_l sum_m L_lm Y_lm(n)``, A = (pi, 2pi/3,
pi/4), exact for an environment limited to these bands, which ours are by construction:
every environment is a sum of non-negative lobes ``c (1 + w.d)^2 / 4`` (band-limited to
l <= 2), so L(w) >= 0 everywhere. A distant light of colour I and direction d (toward the
light) adds ``a I max(0, n.d)`` where a shadow ray toward d is free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from faceps.core.errors import ConfigError, check_shape

__all__ = ["WildConfig", "WildLighting", "WildScene", "sh_basis", "sh_irradiance",
           "sh_project", "lobe_sh", "sample_wild_lighting", "shade_wild",
           "procedural_background", "draw_occluders", "sample_wild_scene", "BACKGROUND_KINDS"]

#: number of spherical-harmonic coefficients per colour (bands 0-2)
SH_ORDER = 9
#: A_l of the clamped-cosine convolution per coefficient (Ramamoorthi and Hanrahan 2001)
_SH_A = np.array([np.pi] + [2 * np.pi / 3] * 3 + [np.pi / 4] * 5)
#: the kinds of procedural background
BACKGROUND_KINDS = ("noise", "gradient", "stripes", "blobs")


def sh_basis(directions: np.ndarray) -> np.ndarray:
    """Real orthonormal SH basis of bands 0-2 at unit ``directions`` (..., 3) -> (..., 9)."""
    d = np.asarray(directions, np.float64)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    return np.stack([
        np.full_like(x, 0.282094791773878),
        0.488602511902920 * y, 0.488602511902920 * z, 0.488602511902920 * x,
        1.092548430592079 * x * y, 1.092548430592079 * y * z,
        0.315391565252520 * (3 * z * z - 1), 1.092548430592079 * x * z,
        0.546274215296040 * (x * x - y * y)], axis=-1)


def sh_irradiance(normals: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Irradiance E(n) (..., 3) of an environment with SH radiance ``coeffs`` (9, 3) at unit
    ``normals`` (..., 3): the integral of L(w) max(0, n.w) over the sphere."""
    c = np.asarray(coeffs, np.float64)
    if c.shape != (SH_ORDER, 3):
        raise ConfigError(f"SH coefficients must have shape (9, 3); got {c.shape}")
    return sh_basis(normals) @ (_SH_A[:, None] * c)


def _sphere_points(n: int) -> np.ndarray:
    """(n, 3) nearly uniform unit vectors (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    r = np.sqrt(np.maximum(0.0, 1 - z * z))
    phi = np.pi * (3 - np.sqrt(5)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


#: quadrature of :func:`sh_project` (exact to far below float32 for band-limited input)
_QUAD = _sphere_points(4096)
_QUAD_Y = sh_basis(_QUAD)


def sh_project(radiance_fn) -> np.ndarray:
    """SH coefficients (9, C) of a radiance function ``radiance_fn(w (N, 3)) -> (N, C)``,
    by quadrature over a Fibonacci sphere (4096 points)."""
    vals = np.asarray(radiance_fn(_QUAD), np.float64)
    return (4 * np.pi / len(_QUAD)) * (_QUAD_Y.T @ vals.reshape(len(_QUAD), -1))


def lobe_sh(direction: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """SH coefficients (9, 3) of the lobe ``colour (1 + w.d)^2 / 4``: brightest (colour) from
    ``d``, zero from the opposite side, non-negative and band-limited to l <= 2, so its
    coefficients are exact. For a function g(w.d) of the angle to ``d`` (Funk-Hecke) they
    are ``2 pi c_l Y_lm(d)`` with the Legendre moments ``c_l = int_-1^1 g(t) P_l(t) dt``,
    here (2/3, 1/3, 1/15)."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    g = 2 * np.pi * np.array([2 / 3, 1 / 3, 1 / 15])
    per = np.repeat(g, [1, 3, 5])
    return (per * sh_basis(d))[:, None] * np.asarray(colour, np.float64)[None, :]


@dataclass(frozen=True)
class WildConfig:
    """Ranges for random in-the-wild lighting, backgrounds and occluders.

    Attributes:
        key_elevation_deg: elevation range of the main environment lobe above the horizon
            (camera horizontal plane; positive: from above).
        key_azimuth_deg: its azimuth range about the camera's viewing axis (0: from the
            camera's side, +-90: from the side of the face).
        key_share: range of the main lobe's share of the environment's brightness (the rest
            is a uniform ambient and a dimmer fill lobe from anywhere).
        colour_jitter: std of the log colour of each lobe and of the ambient (0: white).
        distant_prob: probability of one distant light with hard shadows.
        distant_ratio: range of the distant light's brightness over the environment's
            (the irradiance it gives a surface facing it, over the environment's mean).
        distant_elevation_deg, distant_azimuth_deg: its direction ranges, as for the key.
        background: the background kinds to draw from (:data:`BACKGROUND_KINDS`).
        background_level: range of the background's mean brightness relative to the
            face's median (linear).
        hair_prob: probability of hair-like strands over the upper face.
        hair_strands: range of the number of strands.
        glasses_prob: probability of glasses-like frames around the eyes (needs the eye
            landmarks).
    """

    key_elevation_deg: tuple[float, float] = (5.0, 75.0)
    key_azimuth_deg: tuple[float, float] = (-80.0, 80.0)
    key_share: tuple[float, float] = (0.3, 0.8)
    colour_jitter: float = 0.12
    distant_prob: float = 0.5
    distant_ratio: tuple[float, float] = (0.5, 3.0)
    distant_elevation_deg: tuple[float, float] = (0.0, 70.0)
    distant_azimuth_deg: tuple[float, float] = (-75.0, 75.0)
    background: tuple[str, ...] = BACKGROUND_KINDS
    background_level: tuple[float, float] = (0.2, 1.5)
    hair_prob: float = 0.3
    hair_strands: tuple[int, int] = (20, 120)
    glasses_prob: float = 0.15

    def __post_init__(self) -> None:
        for name in ("key_elevation_deg", "key_azimuth_deg", "key_share", "distant_ratio",
                     "distant_elevation_deg", "distant_azimuth_deg", "background_level",
                     "hair_strands"):
            lo, hi = getattr(self, name)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ConfigError(f"wild {name} must be a range low <= high; got "
                                  f"{getattr(self, name)}")
        if not 0 <= self.key_share[0] <= self.key_share[1] <= 1:
            raise ConfigError(f"wild key_share must lie in [0, 1]; got {self.key_share}")
        for name in ("distant_prob", "hair_prob", "glasses_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"wild {name} must be a probability in [0, 1]; got "
                                  f"{getattr(self, name)}")
        if self.colour_jitter < 0 or self.distant_ratio[0] < 0 or self.background_level[0] < 0:
            raise ConfigError("wild colour_jitter, distant_ratio and background_level must "
                              "be >= 0")
        if self.hair_strands[0] < 0:
            raise ConfigError(f"wild hair_strands must be >= 0; got {self.hair_strands}")
        bad = [k for k in self.background if k not in BACKGROUND_KINDS]
        if bad or not self.background:
            raise ConfigError(f"wild background kinds must be some of {BACKGROUND_KINDS}; "
                              f"got {self.background}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WildLighting:
    """One in-the-wild lighting (camera frame).

    Attributes:
        sh: (9, 3) SH coefficients of the environment radiance (non-negative by
            construction).
        distant_direction: (3,) unit direction toward the distant light, or None.
        distant_intensity: (3,) its colour (irradiance on a surface facing it).
    """

    sh: np.ndarray
    distant_direction: np.ndarray | None = None
    distant_intensity: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"sh": np.asarray(self.sh).tolist(),
                "distant": None if self.distant_direction is None else {
                    "direction": np.asarray(self.distant_direction).tolist(),
                    "intensity": np.asarray(self.distant_intensity).tolist()}}

    def row(self) -> np.ndarray:
        """(34,) float32: the 27 SH coefficients (row-major (9, 3)), the distant light's
        direction and colour, and a flag 1 when it has one (the dataset's ``wild_lighting``
        rows)."""
        out = np.zeros(34, np.float32)
        out[:27] = np.asarray(self.sh, np.float32).reshape(-1)
        if self.distant_direction is not None:
            out[27:30] = self.distant_direction
            out[30:33] = self.distant_intensity
            out[33] = 1.0
        return out


@dataclass
class WildScene:
    """What an in-the-wild render needs besides the face: one lighting per image, the
    background (H, W, 3) linear and the occluders (colour (H, W, 3), alpha (H, W))."""

    lightings: list[WildLighting]
    background: np.ndarray
    occluder_colour: np.ndarray
    occluder_alpha: np.ndarray
    background_level: float = 1.0
    kinds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"lightings": [lt.to_dict() for lt in self.lightings],
                "background_level": float(self.background_level), **self.kinds}


def _direction(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """Unit direction toward a light at ``elevation`` above the camera's horizontal plane
    and ``azimuth`` about the viewing axis from the camera's side (camera frame)."""
    el, az = np.radians(elevation_deg), np.radians(azimuth_deg)
    return np.array([np.sin(az) * np.cos(el), -np.sin(el), -np.cos(az) * np.cos(el)])


def _tint(rng: np.random.Generator, jitter: float) -> np.ndarray:
    c = np.exp(rng.normal(0, jitter, 3))
    return c / c.mean()


def sample_wild_lighting(rng: np.random.Generator, config: WildConfig | None = None
                         ) -> WildLighting:
    """Draw a plausible environment: a uniform ambient, a main lobe mostly from above and
    in front, a dimmer fill lobe from anywhere, each with its own colour; total mean
    radiance 1. With ``config.distant_prob`` also a distant light (hard shadows)."""
    config = config or WildConfig()
    share = rng.uniform(*config.key_share)
    fill = rng.uniform(0.0, 1.0 - share)
    ambient = 1.0 - share - fill
    key_dir = _direction(rng.uniform(*config.key_elevation_deg),
                         rng.uniform(*config.key_azimuth_deg))
    fill_dir = rng.normal(size=3)
    fill_dir /= np.linalg.norm(fill_dir)
    # a lobe c (1 + w.d)^2 / 4 has mean radiance c / 3 over the sphere
    sh = (lobe_sh(key_dir, 3 * share * _tint(rng, config.colour_jitter))
          + lobe_sh(fill_dir, 3 * fill * _tint(rng, config.colour_jitter)))
    sh[0] += ambient * _tint(rng, config.colour_jitter) / 0.282094791773878
    direction = intensity = None
    if config.distant_prob > 0 and rng.random() < config.distant_prob:
        direction = _direction(rng.uniform(*config.distant_elevation_deg),
                               rng.uniform(*config.distant_azimuth_deg))
        # the environment's irradiance on a surface facing it is pi x its mean radiance
        intensity = np.pi * rng.uniform(*config.distant_ratio) * _tint(rng,
                                                                       config.colour_jitter)
    return WildLighting(sh, direction, intensity)


def shade_wild(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray,
               lighting: WildLighting, caster=None, shadow_bias: float = 0.05
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lambertian radiance of surface points under an in-the-wild lighting.

    Args:
        points: (M, 3) camera-frame positions, mm; normals: (M, 3) unit normals.
        albedo: (M, 3) linear albedo.
        lighting: the environment and optional distant light.
        caster: a :class:`faceps.core.raycast.RayCaster` of the scene for the distant
            light's shadow rays (None: no cast shadows).
        shadow_bias: offset of the shadow rays' origins along the normal, mm.

    Returns:
        (radiance (M, 3) float32, shadow (M,) bool: cast shadow of the distant light,
        attached (M,) bool: facing away from it); the environment casts no shadows.
    """
    M = check_shape(points, "points", ("M", 3))["M"]
    check_shape(normals, "normals", (M, 3))
    check_shape(albedo, "albedo", (M, 3))
    N = np.asarray(normals, np.float64)
    E = np.maximum(sh_irradiance(N, lighting.sh), 0.0)              # (M, 3)
    shadow = np.zeros(M, bool)
    attached = np.zeros(M, bool)
    if lighting.distant_direction is not None:
        d = np.asarray(lighting.distant_direction, np.float64)
        cos = N @ d
        attached = cos <= 0
        lit = np.nonzero(~attached)[0]
        if caster is not None and lit.size:
            P = np.asarray(points, np.float64)[lit] + shadow_bias * N[lit]
            shadow[lit] = caster.occluded(P, np.broadcast_to(d, P.shape).copy(), np.inf)
        on = np.where(attached | shadow, 0.0, cos)
        E = E + on[:, None] * np.asarray(lighting.distant_intensity, np.float64)[None]
    return (np.asarray(albedo, np.float32) * (E / np.pi).astype(np.float32), shadow, attached)


def _value_noise(rng: np.random.Generator, H: int, W: int, cells: int) -> np.ndarray:
    import cv2

    g = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(g, (W, H), interpolation=cv2.INTER_CUBIC)


def procedural_background(rng: np.random.Generator, size: tuple[int, int],
                          kind: str | None = None, kinds: tuple[str, ...] = BACKGROUND_KINDS
                          ) -> tuple[np.ndarray, str]:
    """A random background (H, W, 3) float32 linear in [0, 1] with mean about 0.5: smooth
    multi-octave noise, a two-colour gradient, blurred stripes or soft blobs, each in
    random colours (no files). Returns (image, kind)."""
    import cv2

    W, H = int(size[0]), int(size[1])
    kind = kind or str(kinds[int(rng.integers(len(kinds)))])
    if kind not in BACKGROUND_KINDS:
        raise ConfigError(f"background kind must be one of {BACKGROUND_KINDS}; got {kind!r}")
    c0, c1 = rng.uniform(0.05, 1.0, 3), rng.uniform(0.05, 1.0, 3)
    if kind == "noise":
        t = sum(_value_noise(rng, H, W, 2 ** k) * 0.5 ** k for k in range(1, 6))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        v, u = np.mgrid[0:H, 0:W].astype(np.float32)
        t = (np.cos(a) * u / W + np.sin(a) * v / H)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.03, 0.25) * max(H, W)
        v, u = np.mgrid[0:H, 0:W].astype(np.float32)
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (np.cos(a) * u + np.sin(a) * v) / period))
        k = 2 * int(rng.integers(0, 4)) + 1
        t = cv2.GaussianBlur(t.astype(np.float32), (0, 0), k)
    else:  # blobs
        t = np.zeros((H, W), np.float32)
        for _ in range(int(rng.integers(3, 12))):
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
            r = rng.uniform(0.05, 0.3) * max(H, W)
            cv2.circle(t, (int(cx), int(cy)), int(r), float(rng.uniform(0.3, 1.0)), -1)
        t = cv2.GaussianBlur(t, (0, 0), max(1.0, 0.02 * max(H, W)))
        t = t / max(float(t.max()), 1e-6)
    t = t.astype(np.float32)[..., None]
    img = (1 - t) * c0[None, None].astype(np.float32) + t * c1[None, None].astype(np.float32)
    img *= np.float32(0.5 / max(float(img.mean()), 1e-6))
    return np.clip(img, 0.0, 1.0).astype(np.float32), kind


def draw_occluders(rng: np.random.Generator, size: tuple[int, int], landmarks: np.ndarray,
                   face_mask: np.ndarray, config: WildConfig | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Hair-like strands over the upper face and glasses-like frames around the eyes.

    Args:
        size: (W, H).
        landmarks: (68, 2) pixels (NaN rows where the model has none).
        face_mask: (H, W) bool pixels of the face (the strands start above its top).
        config: probabilities and counts.

    Returns:
        (colour (H, W, 3) float32 linear albedo of the occluders, alpha (H, W) float32 in
        [0, 1] (anti-aliased coverage), kinds {"hair": n strands, "glasses": bool}).
    """
    import cv2

    config = config or WildConfig()
    W, H = int(size[0]), int(size[1])
    S = 4                                   # supersampling of the strokes
    alpha = np.zeros((H * S, W * S), np.float32)
    colour = np.zeros((H, W, 3), np.float32)
    kinds = {"hair": 0, "glasses": False}
    ys, xs = np.nonzero(face_mask)
    if ys.size == 0:
        return colour, np.zeros((H, W), np.float32), kinds
    top, bottom = ys.min(), ys.max()
    left, right = xs.min(), xs.max()
    fh, fw = bottom - top + 1, right - left + 1
    layers = []
    if config.hair_prob > 0 and rng.random() < config.hair_prob:
        n = int(rng.integers(config.hair_strands[0], config.hair_strands[1] + 1))
        hair = np.exp(rng.normal(np.log([0.08, 0.05, 0.03]), 0.6)).clip(0.005, 0.8)
        width = max(1, int(round(rng.uniform(0.002, 0.006) * fw * S)))
        a = np.zeros_like(alpha)
        for _ in range(n):
            x0 = rng.uniform(left, right)
            y0 = top - rng.uniform(0.0, 0.1) * fh
            length = rng.uniform(0.1, 0.45) * fh
            bend = rng.normal(0, 0.15) * fw
            t = np.linspace(0, 1, 16)[:, None]
            p0 = np.array([x0, y0])
            p2 = p0 + np.array([rng.normal(0, 0.1) * fw, length])
            p1 = 0.5 * (p0 + p2) + np.array([bend, 0.0])
            pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2) * S
            cv2.polylines(a, [pts.astype(np.int32)], False, 1.0, width, cv2.LINE_AA)
        layers.append((a, hair))
        kinds["hair"] = n
    lm = np.asarray(landmarks, np.float64).reshape(-1, 2)
    eyes = [lm[36:42], lm[42:48]] if lm.shape[0] == 68 else []
    if (config.glasses_prob > 0 and eyes and all(np.all(np.isfinite(e)) for e in eyes)
            and rng.random() < config.glasses_prob):
        frame = rng.uniform(0.01, 0.25, 3)
        a = np.zeros_like(alpha)
        width = max(1, int(round(rng.uniform(0.01, 0.025) * fw * S)))
        scale = rng.uniform(1.6, 2.2)
        centres = []
        for e in eyes:
            c = e.mean(0)
            half = 0.5 * np.ptp(e[:, 0]) * scale
            centres.append(c)
            cv2.ellipse(a, (int(c[0] * S), int(c[1] * S)),
                        (int(half * S), int(half * rng.uniform(0.6, 0.85) * S)),
                        0.0, 0.0, 360.0, 1.0, width, cv2.LINE_AA)
        c0, c1 = centres
        gap = 0.5 * np.ptp(eyes[0][:, 0]) * scale
        d = (c1 - c0) / max(np.linalg.norm(c1 - c0), 1e-6)
        p, q = c0 + d * gap, c1 - d * gap
        cv2.line(a, (int(p[0] * S), int(p[1] * S)), (int(q[0] * S), int(q[1] * S)), 1.0,
                 width, cv2.LINE_AA)
        layers.append((a, frame))
        kinds["glasses"] = True
    for a, col in layers:
        cov = cv2.resize(a, (W, H), interpolation=cv2.INTER_AREA)
        colour = colour * (1 - cov[..., None]) + cov[..., None] * col.astype(np.float32)
        alpha = np.maximum(alpha, a)
    out_alpha = cv2.resize(alpha, (W, H), interpolation=cv2.INTER_AREA).clip(0, 1)
    # colour is premultiplied by coverage: un-premultiply where covered
    colour = np.where(out_alpha[..., None] > 1e-6, colour / np.maximum(out_alpha, 1e-6)[..., None],
                      0.0).astype(np.float32)
    return colour, out_alpha.astype(np.float32), kinds


def sample_wild_scene(rng: np.random.Generator, n_images: int, size: tuple[int, int],
                      landmarks: np.ndarray, face_mask: np.ndarray,
                      config: WildConfig | None = None) -> WildScene:
    """Draw ``n_images`` lightings, a background and occluders for one face."""
    config = config or WildConfig()
    lightings = [sample_wild_lighting(rng, config) for _ in range(int(n_images))]
    background, kind = procedural_background(rng, size, kinds=config.background)
    level = float(rng.uniform(*config.background_level))
    colour, alpha, occ = draw_occluders(rng, size, landmarks, face_mask, config)
    return WildScene(lightings, background, colour, alpha, level, {"background": kind, **occ})
