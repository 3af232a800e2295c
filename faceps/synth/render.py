"""Near-light image formation on top of ray-cast geometry maps.

The geometry comes from :func:`faceps.core.raycast.render_maps` (per-pixel mask, points,
shading normals, albedo). This module turns it into the radiance of each light by the
imaging model of the method (eq. 1, with the LED factor), adds cast shadows by shadow rays,
an optional specular sheen, then simulates the sensor: exposure, vignetting, shot and read
noise, clipping at saturation, and quantisation to 8-bit sRGB or 16-bit linear.

The ground truth is exact for what is rendered: the diffuse part of every image equals
eq. 1 evaluated with the ground-truth normals, positions, albedo and lights, times the
exposure, wherever the pixel is not in a cast shadow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from faceps.core.camera import Camera
from faceps.core.color import encode
from faceps.core.errors import ConfigError, check_shape
from faceps.core.lights import PointLights, point_irradiance

__all__ = ["ShadingConfig", "SensorConfig", "ShadedImages", "shade_maps", "apply_sensor",
           "quantise"]


@dataclass(frozen=True)
class ShadingConfig:
    """How light leaves the surface.

    Attributes:
        lambertian: when True, diffuse reflection only (eq. 1) and no specular lobe.
        cast_shadows: trace a shadow ray per pixel and light.
        specular: weight of a white Blinn-Phong lobe relative to the diffuse term of a
            unit albedo (skin sheen); ignored when ``lambertian``.
        shininess: Blinn-Phong exponent (larger: tighter highlights).
        shadow_bias: shadow-ray start offset along the normal, mm.
    """

    lambertian: bool = False
    cast_shadows: bool = True
    specular: float = 0.03
    shininess: float = 40.0
    shadow_bias: float = 0.05

    def __post_init__(self) -> None:
        if self.specular < 0 or self.shininess <= 0 or self.shadow_bias < 0:
            raise ConfigError("specular and shadow_bias must be >= 0 and shininess > 0")


@dataclass(frozen=True)
class SensorConfig:
    """The camera sensor.

    Attributes:
        exposure: factor from radiance to sensor units (full scale = 1); None: automatic,
            so that the ``auto_percentile`` of the brightest image's face pixels lands at
            ``auto_target``.
        auto_target, auto_percentile: the automatic exposure rule.
        full_well: photo-electrons at full scale (shot-noise variance = value / full_well);
            0 disables shot noise.
        read_noise: standard deviation of additive Gaussian read noise (full scale = 1).
        vignetting: relative light loss at the image corner (0: none), smooth cos^4-like
            radial falloff.
        saturation: clipping level (full scale = 1).
    """

    exposure: float | None = None
    auto_target: float = 0.8
    auto_percentile: float = 99.0
    full_well: float = 20000.0
    read_noise: float = 0.002
    vignetting: float = 0.0
    saturation: float = 1.0

    def __post_init__(self) -> None:
        if self.exposure is not None and self.exposure <= 0:
            raise ConfigError("exposure must be > 0")
        if not 0 <= self.vignetting < 1:
            raise ConfigError("vignetting must be in [0, 1)")
        if self.full_well < 0 or self.read_noise < 0 or self.saturation <= 0:
            raise ConfigError("full_well and read_noise must be >= 0, saturation > 0")


@dataclass
class ShadedImages:
    """Radiance of each light before the sensor.

    Attributes:
        diffuse: (L, H, W, 3) float32 eq. 1 with cast shadows (zero outside the mask).
        specular: (L, H, W, 3) float32 specular sheen (zeros in Lambertian mode).
        shadow: (L, H, W) bool, True where the light is blocked by other geometry.
        attached: (L, H, W) bool, True where n . (P - V) <= 0 (attached shadow).
    """

    diffuse: np.ndarray
    specular: np.ndarray
    shadow: np.ndarray
    attached: np.ndarray

    @property
    def radiance(self) -> np.ndarray:
        return self.diffuse + self.specular


def shade_maps(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray, mask: np.ndarray,
               lights: PointLights, config: ShadingConfig = ShadingConfig(),
               caster=None) -> ShadedImages:
    """Shade per-pixel geometry under near point lights.

    Args:
        points: (H, W, 3) camera-frame positions, mm (anything outside ``mask``).
        normals: (H, W, 3) unit shading normals (n_z < 0 facing the camera).
        albedo: (H, W, 3) linear diffuse albedo.
        mask: (H, W) bool, pixels that see the surface.
        lights: L point lights.
        config: shading options.
        caster: a :class:`faceps.core.raycast.RayCaster` of the scene in the camera frame;
            needed for cast shadows.

    Returns:
        :class:`ShadedImages`.
    """
    dims = check_shape(points, "points", ("H", "W", 3))
    H, W = dims["H"], dims["W"]
    check_shape(normals, "normals", (H, W, 3))
    check_shape(albedo, "albedo", (H, W, 3))
    check_shape(mask, "mask", (H, W))
    L = len(lights)
    idx = np.nonzero(mask.reshape(-1))[0]
    V = points.reshape(-1, 3)[idx].astype(np.float64)
    N = normals.reshape(-1, 3)[idx].astype(np.float64)
    A = albedo.reshape(-1, 3)[idx].astype(np.float64)
    E = point_irradiance(V, N, lights)  # (L, M)
    attached = E <= 0
    shadow = np.zeros((L, idx.size), bool)
    if config.cast_shadows and caster is not None and idx.size:
        origins = V + config.shadow_bias * N
        for j in range(L):
            lit = ~attached[j]
            to_light = lights.positions[j] - origins[lit]
            dist = np.linalg.norm(to_light, axis=1)
            dirs = to_light / dist[:, None]
            shadow[j, lit] = caster.occluded(origins[lit], dirs, dist - 1e-3)
    vis = (~shadow).astype(np.float64)
    diffuse = (A[None] * lights.intensities[:, None, :] * (E * vis)[..., None])
    spec = np.zeros_like(diffuse)
    if not config.lambertian and config.specular > 0:
        view = -V / np.linalg.norm(V, axis=1, keepdims=True)
        for j in range(L):
            to_light = lights.positions[j] - V
            d = np.linalg.norm(to_light, axis=1)
            l = to_light / d[:, None]
            h = l + view
            h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
            ndoth = np.clip(np.einsum("ij,ij->i", N, h), 0.0, 1.0)
            # E already holds n.l / d^2 (and the LED factor); the lobe is energy-normalised
            lobe = config.specular * (config.shininess + 8) / 8 * ndoth**config.shininess
            spec[j] = (lights.intensities[j][None, :] * (E[j] * vis[j] * lobe)[:, None])

    def scatter(vals: np.ndarray, fill) -> np.ndarray:
        out = np.full((L, H * W) + vals.shape[2:], fill, dtype=vals.dtype)
        out[:, idx] = vals
        return out.reshape((L, H, W) + vals.shape[2:])

    return ShadedImages(
        diffuse=scatter(diffuse.astype(np.float32), 0.0),
        specular=scatter(spec.astype(np.float32), 0.0),
        shadow=scatter(shadow, False),
        attached=scatter(attached, False),
    )


def vignetting_map(camera: Camera, strength: float) -> np.ndarray:
    """(H, W) float32 gain, 1 at the principal point and 1 - strength at the far corner."""
    if strength <= 0:
        return np.ones((camera.height, camera.width), np.float32)
    r = camera.rays()
    cos = 1.0 / np.linalg.norm(r, axis=-1)
    c4 = cos**4
    c4_min = c4.min()
    gain = 1.0 - strength * (1.0 - c4) / max(1.0 - c4_min, 1e-12)
    return gain.astype(np.float32)


def apply_sensor(radiance: np.ndarray, camera: Camera, mask: np.ndarray,
                 config: SensorConfig = SensorConfig(),
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """Simulate the sensor on per-light radiance.

    Args:
        radiance: (L, H, W, 3) linear radiance.
        camera: the camera (for vignetting).
        mask: (H, W) bool face pixels (for automatic exposure).
        config: sensor options.
        rng: noise generator (required when any noise is on).

    Returns:
        (images, exposure, saturated): (L, H, W, 3) float32 linear sensor values clipped to
        [0, saturation]; the exposure used; (L, H, W) bool pixels at saturation.
    """
    check_shape(radiance, "radiance", (None, camera.height, camera.width, 3))
    if config.exposure is None:
        vals = radiance[:, mask].max(axis=-1) if mask.any() else radiance.max(axis=-1)
        ref = float(np.percentile(vals, config.auto_percentile)) if vals.size else 0.0
        exposure = config.auto_target / ref if ref > 0 else 1.0
    else:
        exposure = float(config.exposure)
    img = radiance.astype(np.float32) * np.float32(exposure)
    if config.vignetting > 0:
        img *= vignetting_map(camera, config.vignetting)[None, :, :, None]
    if config.full_well > 0 or config.read_noise > 0:
        if rng is None:
            raise ConfigError("a random generator is needed for sensor noise")
        # Shot noise: Poisson(value * full_well) / full_well. At the thousands of
        # electrons of a lit face the Gaussian approximation with the same variance is
        # exact to well under a percent, and an order of magnitude faster.
        std = np.zeros_like(img)
        if config.full_well > 0:
            std += np.maximum(img, 0.0) / np.float32(config.full_well)
        if config.read_noise > 0:
            std += np.float32(config.read_noise) ** 2
        np.sqrt(std, out=std)
        img += std * rng.standard_normal(img.shape, dtype=np.float32)
    saturated = np.any(img >= config.saturation, axis=-1)
    img = np.clip(img, 0.0, config.saturation).astype(np.float32)
    return img, exposure, saturated


def quantise(images: np.ndarray, encoding: str = "srgb", bit_depth: int = 8) -> np.ndarray:
    """Linear [0, 1] values -> integer code values of a file.

    Args:
        images: (..., 3) linear values (clipped to [0, 1]).
        encoding: ``srgb``, ``linear`` or ``gamma:<g>``.
        bit_depth: 8 or 16.

    Returns:
        uint8 or uint16 array of the same shape.
    """
    if bit_depth not in (8, 16):
        raise ConfigError(f"bit_depth must be 8 or 16; got {bit_depth}")
    full = 255 if bit_depth == 8 else 65535
    code = encode(np.clip(images, 0.0, 1.0), encoding)
    return np.round(np.clip(code, 0.0, 1.0) * full).astype(np.uint8 if bit_depth == 8
                                                           else np.uint16)


def config_dict(shading: ShadingConfig, sensor: SensorConfig) -> dict:
    """Both configs as one JSON-ready dict."""
    return {"shading": asdict(shading), "sensor": asdict(sensor)}
