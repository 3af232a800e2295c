"""Random synthetic faces under near point lights: identity, expression, albedo, fine
detail, pose, light rig, and the renderer that produces images with exact ground truth.

Paper section 3.3 (data augmentation). Ground truth comes from the detailed mesh (the
subdivided, displaced face); the proxy normals come from the coarse model surface.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError
from faceps.core.lights import PointLights
from faceps.core.mesh import vertex_normals
from faceps.core.raycast import RayCaster
from faceps.core.rotation import pose_rotation
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.synth.detail import (
    DetailConfig,
    DetailParams,
    detailed_mesh,
    facing_triangles,
    sample_detail,
)
from faceps.synth.render import SensorConfig, ShadingConfig, apply_sensor, shade_maps

__all__ = ["LightRig", "FaceConfig", "FaceSample", "RenderedFace", "sample_face", "render_meshes",
           "sample_lights", "render_face", "face_centre_model", "default_camera",
           "landmark_pixels"]

DEFAULT_NAMES = {1: ("front",), 2: ("left", "right"), 3: ("left", "front", "right")}


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
        neutral_prob: probability of a neutral expression (expression coefficients zero).
        yaw_deg, pitch_deg, roll_deg: uniform pose ranges (+-).
        distance_mm: range of the camera-to-face-centre distance.
        centre_jitter: face-centre offset from the optical axis, fraction of the distance
            times the half field of view.
        detail: fine-detail ranges.
        rig: the light rig.
    """

    id_scale: float = 1.0
    exp_scale: float = 0.7
    albedo_scale: float = 1.0
    neutral_prob: float = 0.25
    yaw_deg: float = 30.0
    pitch_deg: float = 15.0
    roll_deg: float = 10.0
    distance_mm: tuple[float, float] = (500.0, 650.0)
    centre_jitter: float = 0.08
    detail: DetailConfig = field(default_factory=DetailConfig)
    rig: LightRig = field(default_factory=LightRig)

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
    """

    coefficients: Coefficients
    angles: np.ndarray
    translation: np.ndarray
    lights: PointLights
    detail: DetailParams | None
    albedo: np.ndarray | None = None

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


def sample_face(rng: np.random.Generator, model: MorphableModel, camera: Camera,
                config: FaceConfig | None = None) -> FaceSample:
    """Draw a random face, pose and lights that frame the face in ``camera``."""
    config = config or FaceConfig()
    coef = model.sample(rng, id_scale=config.id_scale, exp_scale=config.exp_scale,
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
    return FaceSample(coef, angles, t, lights, detail)


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
                with_proxy: bool = True) -> RenderedFace:
    """Render a face sample under its lights with exact ground truth.

    Args:
        model: the morphable model.
        sample: the face, pose and lights.
        camera: the camera (no distortion is applied).
        shading, sensor: image formation options.
        rng: generator for sensor noise (required when the sensor adds noise).
        levels: subdivision levels (default: automatic, edges of about 2 pixels, at most 3).
        with_proxy: also render the coarse proxy's normals and depth.

    Returns:
        :class:`RenderedFace`.
    """
    shading = shading or ShadingConfig()
    sensor = sensor or SensorConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    R, t = sample.rotation, np.asarray(sample.translation, np.float64)
    coarse = model.geometry(sample.coefficients.id, sample.coefficients.exp)
    coarse_cam = coarse @ R.T + t
    albedo_v = (model.albedo(sample.coefficients.albedo) if sample.albedo is None
                else np.asarray(sample.albedo, np.float64))
    if levels is None:
        levels = auto_levels(coarse_cam, model.triangles, camera)
    rest = model.mean.astype(np.float64)
    lm_rest = model.landmark_points(rest)
    region = model.region.astype(np.float64)
    # subdivide what the camera can see; back-facing parts stay coarse (they still cast
    # shadows)
    refine = facing_triangles(coarse_cam, model.triangles) if levels > 0 else None
    V, F, S = detailed_mesh(coarse_cam, rest, model.triangles, lm_rest, sample.detail, levels,
                            region, refine=refine)
    timings["detail"] = time.perf_counter() - t0

    return render_meshes(V, F, S @ albedo_v, S @ region, coarse_cam, model.triangles,
                         landmark_pixels(model, coarse, R, t, camera), sample.lights, camera,
                         shading=shading, sensor=sensor, rng=rng, with_proxy=with_proxy,
                         timings=timings)


def render_meshes(vertices_cam: np.ndarray, triangles: np.ndarray, albedo: np.ndarray,
                  region: np.ndarray, proxy_cam: np.ndarray, proxy_triangles: np.ndarray,
                  landmarks: np.ndarray, lights: PointLights, camera: Camera, *,
                  shading: ShadingConfig | None = None, sensor: SensorConfig | None = None,
                  rng: np.random.Generator | None = None, with_proxy: bool = True,
                  timings: dict | None = None) -> RenderedFace:
    """Render a ground-truth mesh under near lights, plus the maps of a proxy mesh.

    The core of :func:`render_face`, shared with registered scans.

    Args:
        vertices_cam: (N, 3) ground-truth mesh in the camera frame (mm).
        triangles: (M, 3) its triangles.
        albedo: (N, 3) per-vertex linear albedo.
        region: (N,) per-vertex face-region weight (>0.5: face).
        proxy_cam, proxy_triangles: the coarse proxy mesh in the camera frame.
        landmarks: (68, 2) pixels to report.
        lights, camera, shading, sensor, rng, with_proxy: as in :func:`render_face`.
        timings: a dict to add stage timings to.

    Returns:
        :class:`RenderedFace`.
    """
    shading = shading or ShadingConfig()
    sensor = sensor or SensorConfig()
    timings = {} if timings is None else timings
    V, F = vertices_cam, triangles
    full_camera = camera
    # work inside the box of the image the meshes project to; pad at the end
    box = _projected_box(camera, V, proxy_cam if with_proxy else None)
    x0, y0, bw, bh = box
    camera = full_camera.cropped(x0, y0, bw, bh)
    t0 = time.perf_counter()
    caster = RayCaster(V, F)
    maps = caster.render(camera, vertex_normals(V, F), {"albedo": albedo, "region": region})
    timings["raycast"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mask = maps["mask"] & ~maps["backface"]
    zeros3 = np.zeros(mask.shape + (3,))
    pts = np.where(mask[..., None], maps["points"], zeros3)
    nrm = np.where(mask[..., None], maps["normals"], zeros3)
    alb = np.where(mask[..., None], maps["albedo"], zeros3)
    shaded = shade_maps(pts, nrm, alb, mask, lights, shading, caster)
    timings["shading"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pad = _Padder(full_camera, box)
    mask_full = pad(mask, False)
    images, exposure, saturated = apply_sensor(pad(shaded.radiance, 0.0, lead=1), full_camera,
                                               mask_full, sensor, rng)
    timings["sensor"] = time.perf_counter() - t0
    scaled = PointLights(lights.positions, lights.intensities * exposure, lights.directions,
                         lights.anisotropy, lights.names)

    def nan_out(a: np.ndarray, m: np.ndarray) -> np.ndarray:
        out = a.astype(np.float32)
        out[~m] = np.nan
        return pad(out, np.nan)

    H, W = full_camera.height, full_camera.width
    proxy_n = np.full((H, W, 3), np.nan, np.float32)
    proxy_d = np.full((H, W), np.nan, np.float32)
    proxy_m = np.zeros((H, W), bool)
    if with_proxy:
        t0 = time.perf_counter()
        pm = RayCaster(proxy_cam, proxy_triangles).render(camera)
        pmask = pm["mask"] & ~pm["backface"]
        proxy_m = pad(pmask, False)
        proxy_n = nan_out(pm["normals"], pmask)
        proxy_d = nan_out(pm["depth"], pmask)
        timings["proxy"] = time.perf_counter() - t0

    return RenderedFace(
        images=images, saturated=saturated & mask_full[None], lights=scaled,
        exposure=exposure, normals=nan_out(maps["normals"], mask),
        depth=nan_out(maps["depth"], mask), points=nan_out(maps["points"], mask),
        albedo=nan_out(maps["albedo"], mask), mask=mask_full,
        face_mask=pad(mask & (np.nan_to_num(maps["region"]) > 0.5), False),
        shadow=pad(shaded.shadow, False, lead=1), attached=pad(shaded.attached, False, lead=1),
        specular=pad((shaded.specular * exposure).astype(np.float32), 0.0, lead=1),
        proxy_normals=proxy_n, proxy_depth=proxy_d, proxy_mask=proxy_m,
        landmarks=np.asarray(landmarks, np.float64), timings=timings,
    )


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


class _Padder:
    """Pastes arrays of a box of the image into full-size arrays."""

    def __init__(self, camera: Camera, box: tuple[int, int, int, int]) -> None:
        self.H, self.W = camera.height, camera.width
        self.x0, self.y0, self.w, self.h = box

    def __call__(self, a: np.ndarray, fill, lead: int = 0) -> np.ndarray:
        if (self.w, self.h) == (self.W, self.H):
            return a
        shape = a.shape[:lead] + (self.H, self.W) + a.shape[lead + 2:]
        out = np.full(shape, fill, dtype=a.dtype)
        idx = (slice(None),) * lead + (slice(self.y0, self.y0 + self.h),
                                       slice(self.x0, self.x0 + self.w))
        out[idx] = a
        return out
