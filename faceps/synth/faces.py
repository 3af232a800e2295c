"""Random synthetic faces under near point lights: identity, expression, albedo, fine
detail, pose, light rig, and the renderer that produces images with exact ground truth.

Paper section 3.3 (data augmentation). Ground truth comes from the detailed mesh (the
subdivided, displaced face; Embree for visibility and cast shadows, exact float64 hits);
the proxy normals come from the coarse model surface, rasterised by the render layer of
the learning code (:func:`faceps.core.rasterize.rasterize`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError
from faceps.core.lights import PointLights
from faceps.core.mesh import vertex_normals
from faceps.core.raycast import RayCaster
from faceps.core.rotation import pose_rotation
from faceps.core.threads import torch_threads
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.synth.detail import (
    DEFAULT_SMOOTHING,
    DetailConfig,
    DetailParams,
    detailed_mesh,
    grow_selection,
    sample_detail,
)
from faceps.synth.render import (
    SensorConfig,
    ShadedPoints,
    ShadingConfig,
    scatter_rows,
    sensor_images,
    shade_points,
)
from faceps.synth.wild import (
    WildConfig,
    WildScene,
    sample_wild_scene,
    sh_irradiance,
    shade_wild,
)

__all__ = ["LightRig", "FaceConfig", "FaceSample", "RenderedFace", "sample_face", "render_meshes",
           "expression_rms_mm", "expression_scale",
           "sample_lights", "render_face", "face_centre_model", "default_camera",
           "landmark_pixels", "ProxyRaster", "rasterize_proxy", "PROXY_RINGS"]

DEFAULT_NAMES = {1: ("front",), 2: ("left", "right"), 3: ("left", "front", "right")}
#: rings of coarse triangles subdivided around those the camera sees
PROXY_RINGS = 4


@dataclass(frozen=True)
class LightRig:
    """Where the lights are, relative to the face centre, and how they vary.

    Either angular (azimuth/elevation/distance around the face centre: azimuth about the
    camera's vertical axis, negative toward the image's left; elevation positive above
    the face) or explicit ``positions`` in the camera frame (e.g. a session's calibrated
    lights), jittered by ``position_jitter``.

    Attributes:
        names: light names (one per light).
        azimuth_deg, elevation_deg: nominal directions from the face centre.
        distance_mm: range of light distance from the face centre.
        jitter_deg: std of the direction jitter.
        positions: optional (L, 3) nominal positions (camera frame, mm).
        position_jitter: std of the position jitter (mm) for explicit positions.
        intensity_jitter: relative std of the intensity.
        tint_jitter: relative std of each colour channel (white balance / LED colour).
        anisotropy: range of LED exponent mu (LED axis aims at the face centre).
    """

    names: tuple[str, ...] = ("left", "front", "right")
    azimuth_deg: tuple[float, ...] = (-50.0, 0.0, 50.0)
    elevation_deg: tuple[float, ...] = (12.0, 25.0, 12.0)
    distance_mm: tuple[float, float] = (300.0, 400.0)
    jitter_deg: float = 6.0
    positions: tuple[tuple[float, float, float], ...] | None = None
    position_jitter: float = 15.0
    intensity_jitter: float = 0.15
    tint_jitter: float = 0.04
    anisotropy: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        L = len(self.names)
        if L == 0:
            raise ConfigError("a light rig needs at least one light")
        if self.positions is None and (len(self.azimuth_deg) != L or len(self.elevation_deg) != L):
            raise ConfigError("azimuth_deg and elevation_deg need one value per light name")
        if self.positions is not None and np.shape(self.positions) != (L, 3):
            raise ConfigError(f"positions must have shape ({L}, 3)")
        if not 0 < self.distance_mm[0] <= self.distance_mm[1]:
            raise ConfigError("distance_mm must be an increasing positive range")

    @classmethod
    def spread(cls, n: int, **kwargs) -> LightRig:
        """A rig of n lights spread from left to right (the default 3 for n = 3)."""
        if n < 1:
            raise ConfigError("the number of lights must be >= 1")
        if n in DEFAULT_NAMES:
            names = DEFAULT_NAMES[n]
            az = {1: (0.0,), 2: (-45.0, 45.0), 3: (-50.0, 0.0, 50.0)}[n]
            el = {1: (20.0,), 2: (15.0, 15.0), 3: (12.0, 25.0, 12.0)}[n]
        else:
            names = tuple(f"light{i}" for i in range(n))
            az = tuple(np.linspace(-60, 60, n).tolist())
            el = tuple((12.0 + 14.0 * (i % 2)) for i in range(n))
        return cls(names=names, azimuth_deg=az, elevation_deg=el, **kwargs)

    @classmethod
    def from_lights(cls, lights: PointLights, **kwargs) -> LightRig:
        """A rig jittering around calibrated lights (positions in the camera frame)."""
        return cls(names=lights.names, azimuth_deg=(0.0,) * len(lights),
                   elevation_deg=(0.0,) * len(lights),
                   positions=tuple(map(tuple, lights.positions.tolist())), **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FaceConfig:
    """Ranges for random faces.

    Attributes:
        id_scale, exp_scale, albedo_scale: std of the coefficients (model std units).
        exp_rms_mm: expression strength as a displacement instead of ``exp_scale``: the
            expression coefficients are drawn at the scale that moves the model's face
            region by this many mm RMS on average (:func:`expression_scale`). Models
            differ widely in what one std of expression means: the built-in model's
            components are local movements (4.5 mm RMS at the default scale 0.7), the
            Surrey model's six are whole emotions (12 mm at 0.7), so faces of another
            model are compared at equal strength with this set. None (default): ``exp_scale``
            as given, and the faces of a seed are those of earlier versions.
        neutral_prob: probability of a neutral expression (expression coefficients zero).
        yaw_deg, pitch_deg, roll_deg: uniform pose ranges (+-).
        distance_mm: range of the camera-to-face-centre distance.
        centre_jitter: face-centre offset from the optical axis, fraction of the distance
            times the half field of view.
        detail: fine-detail ranges.
        rig: the light rig.
        face_only_prob: probability that a face is rendered as its face region alone (a
            mask of forehead, cheeks and chin without the back of the head, ears and
            neck), grown by 0 to ``face_only_rings`` rings of triangles: how many
            morphable models (BFM, the Surrey model) and scans look, so that networks
            trained on the built-in heads do not rely on the head's outline. The proxy
            stays the whole model. 0 (default) draws nothing: the faces of a seed are
            those of earlier versions.
        face_only_rings: largest growth of the face region, in triangle rings.
        plain_prob: probability that a face has no fine detail (no wrinkles, folds,
            roughness or pores; bumps, when on, are kept): smooth faces such as other
            morphable models' and smoothed scans, so that networks do not learn to draw
            wrinkles where the built-in faces usually have them.
        flat_albedo_prob: probability that a face's albedo is one colour (its drawn
            albedo's mean over the face region): no brows, lips or blotches, as shape-only
            models and untextured scans are rendered.
        Both default to 0, which draws nothing: the faces of a seed stay those of earlier
        versions.
        smoothing: shape factor of the Phong tessellation that curves the subdivided coarse
            triangles through their corners' normals (:func:`faceps.synth.detail.phong_tessellate`;
            1/2 is exact on quadratic surfaces). 0 (default): the flat facets of midpoint
            subdivision, which show in the ground-truth normals wherever a coarse edge
            spans several pixels. It draws nothing; it changes the surface only where the
            mesh is subdivided (faces larger than about two pixels per coarse edge).
    """

    id_scale: float = 1.0
    exp_scale: float = 0.7
    exp_rms_mm: float | None = None
    albedo_scale: float = 1.0
    neutral_prob: float = 0.25
    yaw_deg: float = 30.0
    pitch_deg: float = 15.0
    roll_deg: float = 10.0
    distance_mm: tuple[float, float] = (500.0, 650.0)
    centre_jitter: float = 0.08
    detail: DetailConfig = field(default_factory=DetailConfig)
    rig: LightRig = field(default_factory=LightRig)
    face_only_prob: float = 0.0
    face_only_rings: int = 6
    plain_prob: float = 0.0
    flat_albedo_prob: float = 0.0
    smoothing: float = DEFAULT_SMOOTHING

    def __post_init__(self) -> None:
        for name in ("face_only_prob", "plain_prob", "flat_albedo_prob", "smoothing"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]; got {value!r}")
        if int(self.face_only_rings) < 0:
            raise ConfigError(f"face_only_rings must be >= 0; got {self.face_only_rings!r}")
        if self.exp_rms_mm is not None:
            if not (np.isfinite(float(self.exp_rms_mm)) and float(self.exp_rms_mm) >= 0):
                raise ConfigError(f"exp_rms_mm must be a finite number >= 0 (mm) or None; "
                                  f"got {self.exp_rms_mm!r}")
            object.__setattr__(self, "exp_rms_mm", float(self.exp_rms_mm))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FaceSample:
    """One random face, its pose and its lights (everything needed to render it).

    Attributes:
        coefficients: model coefficients (std units).
        angles: (3,) pitch, yaw, roll in radians; translation: (3,) mm; the pose maps the
            model frame to the camera frame, X_cam = pose_rotation(angles) X + translation.
        lights: the point lights, camera frame (intensities before exposure).
        detail: the fine-detail draw (None: no detail).
        albedo: optional (V, 3) per-vertex albedo overriding the model's albedo (e.g.
            transferred from a real reconstruction).
        face_only_rings: None: the whole model is rendered; k >= 0: only its face
            region grown by k rings of triangles (see ``FaceConfig.face_only_prob``).
        smoothing: Phong-tessellation shape factor of the subdivided surface (see
            ``FaceConfig.smoothing``).
    """

    coefficients: Coefficients
    angles: np.ndarray
    translation: np.ndarray
    lights: PointLights
    detail: DetailParams | None
    albedo: np.ndarray | None = None
    face_only_rings: int | None = None
    smoothing: float = DEFAULT_SMOOTHING

    @property
    def rotation(self) -> np.ndarray:
        return pose_rotation(self.angles)

    def pose_vector(self) -> np.ndarray:
        """(6,) float32 pitch, yaw, roll, tx, ty, tz (contract 4 ``params/pose``)."""
        return np.concatenate([self.angles, self.translation]).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "coefficients": self.coefficients.to_dict(),
            "pose": {"angles_rad": np.asarray(self.angles).tolist(),
                     "angles_order": "pitch, yaw, roll",
                     "translation_mm": np.asarray(self.translation).tolist()},
            "lights": self.lights.to_dict(),
            "detail": None if self.detail is None else self.detail.to_dict(),
            "face_only_rings": self.face_only_rings,
            "smoothing": self.smoothing,
        }


def default_camera(size: tuple[int, int] = (1600, 1200), fov_x_deg: float = 34.0) -> Camera:
    """The synthetic capture camera: centred principal point, square pixels."""
    return Camera.from_fov(size, fov_x_deg)


def face_centre_model(model: MorphableModel) -> np.ndarray:
    """A point in the middle of the face surface region, model frame (mm): the mean of the
    landmarks (or of the face-region vertices when the model has no landmarks)."""
    G = model.mean.astype(np.float64)
    lm = model.landmarks68[model.landmarks68 >= 0]
    pts = G[lm] if lm.size >= 10 else G[model.region]
    c = pts.mean(0)
    return c


def sample_lights(rng: np.random.Generator, rig: LightRig, centre: np.ndarray) -> PointLights:
    """Draw lights from a rig around a face centre (camera frame, mm)."""
    L = len(rig.names)
    if rig.positions is not None:
        P = np.asarray(rig.positions, np.float64) + rng.normal(0, rig.position_jitter, (L, 3))
    else:
        az = np.radians(np.asarray(rig.azimuth_deg) + rng.normal(0, rig.jitter_deg, L))
        el = np.radians(np.asarray(rig.elevation_deg) + rng.normal(0, rig.jitter_deg, L))
        d = rng.uniform(*rig.distance_mm, size=L)
        # azimuth about the camera's vertical axis; the face looks along camera -z
        dirs = np.stack([np.sin(az) * np.cos(el), -np.sin(el), -np.cos(az) * np.cos(el)], 1)
        P = centre[None] + d[:, None] * dirs
    dist = np.linalg.norm(P - centre[None], axis=1)
    base = dist**2 * np.exp(rng.normal(0, rig.intensity_jitter, L))
    tint = np.exp(rng.normal(0, rig.tint_jitter, (L, 3)))
    tint /= tint.mean(1, keepdims=True)
    mu = rng.uniform(*rig.anisotropy, size=L) if rig.anisotropy[1] > 0 else np.zeros(L)
    axes = centre[None] - P
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return PointLights(P, base[:, None] * tint, np.where(mu[:, None] > 0, axes, 0.0), mu,
                       rig.names)


#: draws of :func:`expression_rms_mm` (its own generator, so that the measure is a property
#: of the model alone)
_EXP_RMS_DRAWS = 200


def expression_rms_mm(model: MorphableModel, exp_scale: float = 1.0) -> float:
    """How far random expressions move a model's face: the mean over a fixed set of
    draws (:meth:`MorphableModel.sample` at ``exp_scale``, identity at the mean) of the RMS
    displacement of the face-region vertices (``model.region > 0.5``; all vertices when
    the region is empty) from the neutral face, in mm. 0 for a model without expression
    components. Linear in ``exp_scale`` (draws, truncation and the fold of one-sided
    components all scale with it); the value at 1 is cached on the model (beside its torch
    tensors: the model is immutable)."""
    cache = model._torch_cache  # type: ignore[attr-defined]
    if "expression_rms_mm" not in cache:
        if model.n_exp == 0:
            cache["expression_rms_mm"] = 0.0
        else:
            rng = np.random.default_rng(0)
            region = np.asarray(model.region, np.float64) > 0.5
            if not region.any():
                region[:] = True
            basis = (np.asarray(model.exp_basis, np.float64)
                     * np.asarray(model.exp_std, np.float64))[region]  # (R, 3, Ke)
            rms = []
            for _ in range(_EXP_RMS_DRAWS):
                exp = model.sample(rng, id_scale=0.0, exp_scale=1.0, albedo_scale=0.0).exp
                # einsum, not BLAS: the same bytes whatever the thread count, as datasets
                # must be (see MorphableModel.geometry)
                d = np.einsum("rck,k->rc", basis, exp)
                rms.append(np.sqrt(np.mean(np.sum(d * d, axis=1))))
            cache["expression_rms_mm"] = float(np.mean(rms))
    return float(exp_scale) * cache["expression_rms_mm"]


def expression_scale(model: MorphableModel, rms_mm: float) -> float:
    """The expression scale (std of the coefficients) at which random expressions of
    ``model`` move its face region by ``rms_mm`` mm RMS on average
    (:func:`expression_rms_mm`); 0 for a model without expressions."""
    per_unit = expression_rms_mm(model, 1.0)
    return float(rms_mm) / per_unit if per_unit > 0 else 0.0


def sample_face(rng: np.random.Generator, model: MorphableModel, camera: Camera,
                config: FaceConfig | None = None) -> FaceSample:
    """Draw a random face, pose and lights that frame the face in ``camera``."""
    config = config or FaceConfig()
    exp_scale = (config.exp_scale if config.exp_rms_mm is None
                 else expression_scale(model, config.exp_rms_mm))
    coef = model.sample(rng, id_scale=config.id_scale, exp_scale=exp_scale,
                        albedo_scale=config.albedo_scale)
    if rng.random() < config.neutral_prob:
        coef = Coefficients(coef.id, np.zeros_like(coef.exp), coef.albedo)
    angles = np.radians([rng.uniform(-config.pitch_deg, config.pitch_deg),
                         rng.uniform(-config.yaw_deg, config.yaw_deg),
                         rng.uniform(-config.roll_deg, config.roll_deg)])
    R = pose_rotation(angles)
    D = rng.uniform(*config.distance_mm)
    half_x = 0.5 * camera.width / camera.K[0, 0]
    half_y = 0.5 * camera.height / camera.K[1, 1]
    target = np.array([rng.normal(0, config.centre_jitter) * half_x * D,
                       rng.normal(0, config.centre_jitter) * half_y * D, D])
    c_model = face_centre_model(model)
    # principal point may be off-centre: aim at the ray through the image centre
    centre_ray = camera.rays(np.array([(camera.width - 1) / 2, (camera.height - 1) / 2]))
    target[:2] += centre_ray[:2] * D
    t = target - R @ c_model
    lights = sample_lights(rng, config.rig, target)
    detail = sample_detail(rng, config.detail) if config.detail.amplitude > 0 else None
    rings = None
    if config.face_only_prob > 0 and rng.random() < config.face_only_prob:
        rings = int(rng.integers(0, int(config.face_only_rings) + 1))
    # drawn only when asked for, so that the faces of earlier versions keep their draws
    if config.plain_prob > 0 and rng.random() < config.plain_prob and detail is not None:
        detail = replace(detail, forehead=0.0, crows_feet=0.0, under_eye=0.0,
                         nasolabial=0.0, roughness=0.0, pores=0.0)
    albedo = None
    if config.flat_albedo_prob > 0 and rng.random() < config.flat_albedo_prob:
        per_vertex = model.albedo(coef.albedo)
        region = np.asarray(model.region, np.float64) > 0.5
        tone = per_vertex[region].mean(0) if region.any() else per_vertex.mean(0)
        albedo = np.tile(tone, (model.n_vertices, 1))
    return FaceSample(coef, angles, t, lights, detail, albedo=albedo, face_only_rings=rings,
                      smoothing=float(config.smoothing))


def face_region_triangles(model: MorphableModel, rings: int = 0) -> np.ndarray:
    """(F,) bool: the model's triangles with every corner in its face region
    (``model.region > 0.5``), grown by ``rings`` rings of neighbouring triangles."""
    inside = np.asarray(model.region, np.float64) > 0.5
    keep = np.all(inside[model.triangles], axis=1)
    return grow_selection(keep, model.triangles, int(rings)) if rings > 0 else keep


@dataclass
class RenderedFace:
    """Images of a face and its exact ground truth, all at the camera's resolution.

    Attributes:
        images: (L, H, W, 3) float32 linear sensor values in [0, 1] (before quantisation).
        saturated: (L, H, W) bool clipped pixels.
        lights: the lights with intensities scaled by the exposure, so that the images
            follow eq. 1 with them (diffuse part, outside cast shadows).
        exposure: the factor applied to the radiance.
        normals: (H, W, 3) float32 ground-truth unit normals (camera frame); NaN outside.
        depth: (H, W) float32 z in mm; NaN outside.
        points: (H, W, 3) float32 positions in mm; NaN outside.
        albedo: (H, W, 3) float32 linear diffuse albedo; NaN outside.
        mask: (H, W) bool pixels that see the face mesh.
        face_mask: (H, W) bool pixels on the model's face region.
        shadow: (L, H, W) bool cast shadows; attached: (L, H, W) bool attached shadows.
        specular: (L, H, W, 3) float32 specular part of the images (times exposure).
        proxy_normals, proxy_depth, proxy_mask: the same maps of the coarse model surface.
        landmarks: (68, 2) float64 pixels of the model's landmark vertices (NaN if none).
        timings: seconds per stage.
        wild: the in-the-wild scene of an in-the-wild render (then ``lights`` is empty).
    """

    images: np.ndarray
    saturated: np.ndarray
    lights: PointLights
    exposure: float
    normals: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    albedo: np.ndarray
    mask: np.ndarray
    face_mask: np.ndarray
    shadow: np.ndarray
    attached: np.ndarray
    specular: np.ndarray
    proxy_normals: np.ndarray
    proxy_depth: np.ndarray
    proxy_mask: np.ndarray
    landmarks: np.ndarray
    timings: dict
    wild: WildScene | None = None


def landmark_pixels(model: MorphableModel, geometry: np.ndarray, R: np.ndarray, t: np.ndarray,
                    camera: Camera) -> np.ndarray:
    """(68, 2) pixel positions of the model's landmark vertices (NaN where none)."""
    P = model.landmark_points(geometry) @ R.T + t
    return camera.project(P)


def auto_levels(model_geometry_cam: np.ndarray, triangles: np.ndarray, camera: Camera,
                target_px: float = 2.0, max_levels: int = 3) -> int:
    """Subdivision levels that bring the median edge to about ``target_px`` pixels."""
    e = model_geometry_cam[triangles[:, 1]] - model_geometry_cam[triangles[:, 0]]
    z = model_geometry_cam[triangles[:, 0], 2]
    edge_px = np.median(np.linalg.norm(e, axis=1) * camera.K[0, 0] / np.maximum(z, 1e-6))
    if edge_px <= target_px:
        return 0
    return int(min(max_levels, np.ceil(np.log2(edge_px / target_px))))


def render_face(model: MorphableModel, sample: FaceSample, camera: Camera, *,
                shading: ShadingConfig | None = None, sensor: SensorConfig | None = None,
                rng: np.random.Generator | None = None, levels: int | None = None,
                with_proxy: bool = True, geometry: np.ndarray | None = None,
                wild: WildConfig | None = None, n_wild: int = 1) -> RenderedFace:
    """Render a face sample under its lights with exact ground truth.

    With ``wild`` the face is lit in the wild instead of by its point lights
    (:mod:`faceps.synth.wild`): ``n_wild`` images, each under its own random environment
    (and maybe a distant light), over a procedural background, maybe behind hair- and
    glasses-like occluders; the scene is drawn from ``rng`` (required then) before the
    sensor noise, and the result's ``lights`` is empty and its ``wild`` the scene.

    Args:
        model: the morphable model.
        sample: the face, pose and lights.
        camera: the camera (no distortion is applied).
        shading, sensor: image formation options.
        rng: generator for sensor noise (required when the sensor adds noise).
        levels: subdivision levels (default: automatic, edges of about 2 pixels, at most 3).
        with_proxy: also render the coarse proxy's normals and depth.
        geometry: the sample's coarse geometry (V, 3) in the model frame, when the caller
            already has it (default: ``model.geometry`` of the sample's coefficients).
        wild, n_wild: in-the-wild lighting ranges and the number of images.

    Returns:
        :class:`RenderedFace`.
    """
    shading = shading or ShadingConfig()
    if wild is not None and rng is None:
        raise ConfigError("an in-the-wild render draws its scene from rng: give one")
    if wild is not None and int(n_wild) < 1:
        raise ConfigError(f"n_wild (in-the-wild images) must be >= 1; got {n_wild!r}")
    sensor = sensor or SensorConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    R, t = sample.rotation, np.asarray(sample.translation, np.float64)
    coarse = (model.geometry(sample.coefficients.id, sample.coefficients.exp)
              if geometry is None else np.asarray(geometry, np.float64))
    coarse_cam = coarse @ R.T + t
    albedo_v = (model.albedo(sample.coefficients.albedo) if sample.albedo is None
                else np.asarray(sample.albedo, np.float64))
    if levels is None:
        levels = auto_levels(coarse_cam, model.triangles, camera)
    rest = model.mean.astype(np.float64)
    lm_rest = model.landmark_points(rest)
    region = model.region.astype(np.float64)
    t_detail = time.perf_counter() - t0
    proxy = None
    if with_proxy or levels > 0:
        t0 = time.perf_counter()
        proxy = rasterize_proxy(coarse_cam, model.triangles, camera)
        timings["proxy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # subdivide the coarse triangles the camera sees (a pixel centre in the proxy's raster)
    # and PROXY_RINGS rings around them; the rest stays coarse (it still casts shadows)
    refine = (grow_selection(proxy.seen, model.triangles, PROXY_RINGS)
              if proxy is not None and levels > 0 else None)
    tris = model.triangles
    if sample.face_only_rings is not None:
        keep = face_region_triangles(model, sample.face_only_rings)
        tris = tris[keep]
        refine = None if refine is None else refine[keep]
    V, F, S = detailed_mesh(coarse_cam, rest, tris, lm_rest, sample.detail, levels,
                            region, refine=refine, smoothing=sample.smoothing)
    timings["detail"] = t_detail + time.perf_counter() - t0

    landmarks = landmark_pixels(model, coarse, R, t, camera)
    scene = None
    if wild is not None:
        if proxy is None:
            proxy = rasterize_proxy(coarse_cam, model.triangles, camera)
        scene = wild_scene_for(rng, wild, n_wild, proxy, camera, landmarks)
    return render_meshes(V, F, S @ albedo_v, S @ region, coarse_cam, model.triangles,
                         landmarks, sample.lights, camera,
                         shading=shading, sensor=sensor, rng=rng, with_proxy=with_proxy,
                         timings=timings, proxy=proxy if with_proxy else None, wild=scene)


def wild_scene_for(rng: np.random.Generator, wild: WildConfig, n_wild: int,
                   proxy: ProxyRaster, camera: Camera, landmarks: np.ndarray) -> WildScene:
    """Draw the in-the-wild scene of a render (``n_wild`` lightings, background, occluders
    placed by the landmarks and the proxy's head silhouette)."""
    if rng is None:
        raise ConfigError("an in-the-wild render draws its scene from rng: give one")
    if int(n_wild) < 1:
        raise ConfigError(f"n_wild (in-the-wild images) must be >= 1; got {n_wild!r}")
    head = np.zeros(camera.height * camera.width, bool)
    head[proxy.pixels] = True
    return sample_wild_scene(rng, int(n_wild), camera.image_size, landmarks,
                             head.reshape(camera.height, camera.width), wild)


def render_meshes(vertices_cam: np.ndarray, triangles: np.ndarray, albedo: np.ndarray,
                  region: np.ndarray, proxy_cam: np.ndarray, proxy_triangles: np.ndarray,
                  landmarks: np.ndarray, lights: PointLights, camera: Camera, *,
                  shading: ShadingConfig | None = None, sensor: SensorConfig | None = None,
                  rng: np.random.Generator | None = None, with_proxy: bool = True,
                  timings: dict | None = None, proxy: ProxyRaster | None = None,
                  wild: WildScene | None = None) -> RenderedFace:
    """Render a ground-truth mesh under near lights (or in the wild), plus the maps of a
    proxy mesh.

    The core of :func:`render_face`, shared with registered scans.

    Primary visibility: one Embree ray per pixel centre of the box the mesh projects to
    (the scene is built anyway for the shadow rays), then the exact float64
    perspective-correct weights and depth of the hit triangles; everything after works
    on the M visible pixels only and is scattered into the full-size maps at the end. The
    coarse proxy is rasterised (:func:`rasterize_proxy`).

    Args:
        vertices_cam: (N, 3) ground-truth mesh in the camera frame (mm).
        triangles: (M, 3) its triangles.
        albedo: (N, 3) per-vertex linear albedo.
        region: (N,) per-vertex face-region weight (>0.5: face).
        proxy_cam, proxy_triangles: the coarse proxy mesh in the camera frame.
        landmarks: (68, 2) pixels to report.
        lights, camera, shading, sensor, rng, with_proxy: as in :func:`render_face`.
        timings: a dict to add stage timings to.
        proxy: the proxy already rasterised for this camera (:func:`rasterize_proxy`);
            default: rasterised here when ``with_proxy``.
        wild: an in-the-wild scene (:class:`faceps.synth.wild.WildScene`) to render with
            instead of ``lights``: one image per lighting, the face's radiance over the
            background (scaled to ``background_level`` times the face's median), the
            occluders over both (lit by the environment as a surface facing the camera);
            the ground-truth maps leave out pixels the occluders cover by half or more.

    Returns:
        :class:`RenderedFace`.
    """
    shading = shading or ShadingConfig()
    sensor = sensor or SensorConfig()
    timings = {} if timings is None else timings
    V = np.asarray(vertices_cam, np.float64)
    F = np.ascontiguousarray(triangles, np.int64)   # int64 ids: no conversion per gather
    H, W = camera.height, camera.width
    # primary rays only inside the box of the image the mesh projects to
    box = _projected_box(camera, V)
    x0, y0, bw, bh = box
    cam_box = camera.cropped(x0, y0, bw, bh)

    t0 = time.perf_counter()
    caster = RayCaster(V, F)
    surf = _visible_surface(caster, V, F, cam_box,
                            np.concatenate([np.asarray(albedo, np.float64).reshape(-1, 3),
                                            np.asarray(region, np.float64).reshape(-1, 1)], 1))
    pix = _box_to_image(surf.pixels, box, W)        # flat ids into the full image
    timings["raycast"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if wild is None:
        shaded = shade_points(surf.points, surf.normals, surf.attrs[:, :3], lights, shading,
                              caster)
        radiance, pixels_lit = shaded.radiance, pix
    else:
        shaded, radiance = _shade_wild_scene(surf, caster, wild, pix, camera, shading)
        pixels_lit = np.arange(H * W, dtype=np.int64)
        lights = lights.select([])
    timings["shading"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images, exposure, saturated = sensor_images(radiance, pixels_lit, camera, sensor, rng)
    timings["sensor"] = time.perf_counter() - t0
    scaled = PointLights(lights.positions, lights.intensities * exposure, lights.directions,
                         lights.anisotropy, lights.names)

    def full(values: np.ndarray, fill, dtype, pixels: np.ndarray = pix, lead: int = 0
             ) -> np.ndarray:
        """Scatter (lead..., M, C...) values at ``pixels`` into (lead..., H, W, C...)."""
        shape = values.shape[:lead] + (H * W,) + values.shape[lead + 1:]
        out = np.full(shape, fill, dtype=dtype)
        flat = out.reshape((-1,) + shape[lead:])
        scatter_rows(flat, pixels, values.astype(dtype, copy=False).reshape(
            (-1,) + values.shape[lead:]))
        return out.reshape(values.shape[:lead] + (H, W) + values.shape[lead + 1:])

    mask = full(np.ones(pix.size, bool), False, bool)
    proxy_n = np.full((H, W, 3), np.nan, np.float32)
    proxy_d = np.full((H, W), np.nan, np.float32)
    proxy_m = np.zeros((H, W), bool)
    if with_proxy:
        t0 = time.perf_counter()
        if proxy is None:
            proxy = rasterize_proxy(proxy_cam, proxy_triangles, camera)
        proxy_m = full(np.ones(proxy.pixels.size, bool), False, bool, proxy.pixels)
        proxy_n = full(proxy.normals, np.nan, np.float32, proxy.pixels)
        proxy_d = full(proxy.depth, np.nan, np.float32, proxy.pixels)
        timings["proxy"] = timings.get("proxy", 0.0) + time.perf_counter() - t0

    out = RenderedFace(
        images=images, saturated=saturated, lights=scaled, exposure=exposure,
        normals=full(surf.normals, np.nan, np.float32), depth=full(surf.depth, np.nan, np.float32),
        points=full(surf.points, np.nan, np.float32),
        albedo=full(surf.attrs[:, :3], np.nan, np.float32), mask=mask,
        face_mask=full(surf.attrs[:, 3] > 0.5, False, bool),
        shadow=full(shaded.shadow, False, bool, lead=1),
        attached=full(shaded.attached, False, bool, lead=1),
        specular=full(shaded.specular * np.float32(exposure), 0.0, np.float32, lead=1),
        proxy_normals=proxy_n, proxy_depth=proxy_d, proxy_mask=proxy_m,
        landmarks=np.asarray(landmarks, np.float64), timings=timings, wild=wild,
    )
    if wild is not None:
        # what the occluders cover is not face in the images: out of the ground truth
        hidden = wild.occluder_alpha >= 0.5
        for name in ("normals", "depth", "points", "albedo"):
            getattr(out, name)[hidden] = np.nan
        for name in ("mask", "face_mask"):
            getattr(out, name)[hidden] = False
        out.shadow[:, hidden] = False
        out.attached[:, hidden] = False
    return out


def _shade_wild_scene(surf: _Surface, caster: RayCaster, wild: WildScene, pix: np.ndarray,
                      camera: Camera, shading: ShadingConfig
                      ) -> tuple[ShadedPoints, np.ndarray]:
    """The radiance of every pixel (L, H*W, 3) of an in-the-wild scene, and the face
    pixels' shading record (diffuse, no specular, the distant lights' shadows)."""
    H, W = camera.height, camera.width
    albedo = surf.attrs[:, :3]
    face, shadow, attached = zip(*(
        shade_wild(surf.points, surf.normals, albedo, lighting,
                   caster if shading.cast_shadows else None, shading.shadow_bias)
        for lighting in wild.lightings))
    face_r = np.stack(face)                                   # (L, M, 3)
    bg = wild.background.reshape(-1, 3).astype(np.float32)
    bg *= np.float32(wild.background_level / max(float(bg.mean()), 1e-6))
    alpha = wild.occluder_alpha.reshape(-1, 1).astype(np.float32)
    occ = wild.occluder_colour.reshape(-1, 3).astype(np.float32)
    toward = np.array([[0.0, 0.0, -1.0]])
    radiance = np.empty((len(face), H * W, 3), np.float32)
    for j, lighting in enumerate(wild.lightings):
        # the background's mean at background_level times the face's median brightness
        lum = face_r[j].max(axis=1)
        level = float(np.median(lum[lum > 0])) if np.any(lum > 0) else 1.0
        radiance[j] = bg * np.float32(level)
        radiance[j, pix] = face_r[j]
        # occluders lit by the environment as a surface facing the camera
        e = np.maximum(sh_irradiance(toward, lighting.sh), 0.0)[0] / np.pi
        radiance[j] = radiance[j] * (1 - alpha) + alpha * occ * e.astype(np.float32)[None]
    shaded = ShadedPoints(diffuse=face_r, specular=np.zeros_like(face_r),
                          shadow=np.stack(shadow), attached=np.stack(attached))
    return shaded, radiance


@dataclass
class _Surface:
    """The front-facing surface seen by M pixels of a camera (packed).

    Attributes:
        pixels: (M,) flat pixel ids (row-major) of the camera's image, ascending.
        depth: (M,) float64 z (mm); points: (M, 3) float64 hit points (mm).
        normals: (M, 3) float64 unit shading normals (interpolated vertex normals).
        attrs: (M, C) float64 interpolated per-vertex attributes (None: C = 0).
    """

    pixels: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    normals: np.ndarray
    attrs: np.ndarray


def _visible_surface(caster: RayCaster, V: np.ndarray, F: np.ndarray, camera: Camera,
                     attrs: np.ndarray | None = None) -> _Surface:
    """Front-facing surface seen by the camera's pixel centres.

    Embree finds the first triangle along each pixel's ray (float32); the hit itself is
    recomputed exactly in float64: the perspective-correct barycentric weights of that
    triangle at the pixel centre (the numpy twin of the recomputation in
    :func:`faceps.core.rasterize.rasterize`; cheaper than :meth:`RayCaster.cast`'s
    general ray-triangle refinement). Pixels that see the back of a triangle are left out
    (they are not surface). ``F`` is int64.
    """
    W = camera.width
    rays = camera.rays().reshape(-1, 3)
    ids = caster.first_hit_ids(np.zeros_like(rays), rays)
    hit = np.nonzero(ids >= 0)[0]
    corner = F[ids[hit]]                                   # (M, 3)
    K = camera.K
    z = np.ascontiguousarray(V[:, 2])
    u = (K[0, 0] * V[:, 0] + K[0, 1] * V[:, 1]) / z + K[0, 2]
    v = K[1, 1] * V[:, 1] / z + K[1, 2]
    py, px = np.divmod(hit, W)
    cols = [np.ascontiguousarray(corner[:, k]) for k in range(3)]
    du = [u[c] - px for c in cols]                         # corners relative to the pixel
    dv = [v[c] - py for c in cols]
    lam = [du[(k + 1) % 3] * dv[(k + 2) % 3] - du[(k + 2) % 3] * dv[(k + 1) % 3]
           for k in range(3)]
    area = lam[0] + lam[1] + lam[2]                        # signed projected area (x2)
    front = np.nonzero(area < 0)[0]                         # clockwise on screen (y down)
    wz = np.stack([lam[k][front] / (area[front] * z[cols[k][front]]) for k in range(3)], 1)
    inv_z = wz.sum(1)
    w = wz / inv_z[:, None]                                 # (M, 3) weights of the corners
    depth = 1.0 / inv_z
    pixels = hit[front]
    corner = corner[front]
    vals = np.concatenate([vertex_normals(V, F)]
                          + ([] if attrs is None else [attrs.reshape(V.shape[0], -1)]), 1)
    interp = np.einsum("mk,mkc->mc", w, vals[corner])
    n = interp[:, :3]
    n /= np.maximum(np.sqrt(np.einsum("ij,ij->i", n, n)), 1e-300)[:, None]
    points = rays[pixels] * depth[:, None]
    return _Surface(pixels=pixels, depth=depth, points=points, normals=n, attrs=interp[:, 3:])


@dataclass
class ProxyRaster:
    """The coarse proxy seen by a camera (packed over the pixels that see its front).

    Attributes:
        pixels: (M,) flat pixel ids (row-major) of the camera's image, ascending.
        normals: (M, 3) float32 unit normals (interpolated vertex normals, camera frame).
        depth: (M,) float32 z in mm.
        seen: (F,) bool, the proxy triangles that cover at least one pixel centre (front
            or back).
    """

    pixels: np.ndarray
    normals: np.ndarray
    depth: np.ndarray
    seen: np.ndarray


def rasterize_proxy(proxy_cam: np.ndarray, proxy_triangles: np.ndarray, camera: Camera
                    ) -> ProxyRaster:
    """Rasterise the coarse proxy with :func:`faceps.core.rasterize.rasterize` in float32:
    the render layer of the learning code, so the stored proxy normals are what it
    computes (they are stored as float16/float32; depth within about 1 um of float64).

    Args:
        proxy_cam: (V, 3) proxy vertices in the camera frame (mm).
        proxy_triangles: (F, 3) its triangles.
        camera: the camera (no distortion).

    Returns:
        :class:`ProxyRaster`; pixels that see the back of a triangle are left out.
    """
    import torch

    from faceps.core.rasterize import interpolate, rasterize

    Vp = np.asarray(proxy_cam, np.float64)
    Fp = np.ascontiguousarray(proxy_triangles, np.int64)
    with torch_threads(1):
        frags = rasterize(torch.from_numpy(Vp.astype(np.float32)), torch.from_numpy(Fp),
                          torch.from_numpy(camera.K.astype(np.float32)), camera.image_size)
        vn = torch.from_numpy(vertex_normals(Vp, Fp).astype(np.float32))
        n = torch.nn.functional.normalize(interpolate(vn, frags, packed=True), dim=-1)
    seen = np.zeros(Fp.shape[0], bool)
    seen[frags.triangle_ids.numpy()] = True
    front = ~frags.back.numpy()
    return ProxyRaster(pixels=frags.pixels.numpy()[front], normals=n.numpy()[front],
                       depth=frags.zbuf.numpy()[front], seen=seen)


def _box_to_image(pixels: np.ndarray, box: tuple[int, int, int, int], width: int
                  ) -> np.ndarray:
    """Flat pixel ids of a box's image -> flat ids of the full image (width ``width``)."""
    x0, y0, bw, _ = box
    r, c = np.divmod(np.asarray(pixels, np.int64), bw)
    return (r + y0) * width + (c + x0)


def _projected_box(camera: Camera, *meshes: np.ndarray | None, margin: int = 2
                   ) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the image box the vertices project to (the whole image
    when a vertex is at or behind the camera plane)."""
    pts = [m for m in meshes if m is not None and len(m)]
    W, H = camera.width, camera.height
    if not pts:
        return 0, 0, W, H
    P = np.concatenate(pts)
    if np.any(P[:, 2] <= 1e-6):
        return 0, 0, W, H
    uv = camera.project(P)
    x0 = int(np.clip(np.floor(uv[:, 0].min()) - margin, 0, W - 1))
    y0 = int(np.clip(np.floor(uv[:, 1].min()) - margin, 0, H - 1))
    x1 = int(np.clip(np.ceil(uv[:, 0].max()) + margin, x0, W - 1))
    y1 = int(np.clip(np.ceil(uv[:, 1].max()) + margin, y0, H - 1))
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1
