"""Near-light image formation on top of ray-cast geometry.

The geometry is the surface seen by the pixels: per-pixel maps (:func:`shade_maps`, e.g.
from :func:`faceps.core.raycast.render_maps`) or, packed, only the M pixels that see the
surface (:func:`shade_points`; what the synthetic renderer uses). This module turns it
into the radiance of each light by the imaging model of the method (eq. 1, with the LED
factor), adds cast shadows by shadow rays (Embree), an optional specular sheen, then
simulates the sensor (:func:`apply_sensor` on full images, :func:`sensor_images` from the
packed radiance, with the same random draws): exposure, vignetting, shot and read noise,
clipping at saturation, and quantisation to 8-bit sRGB or 16-bit linear.

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

__all__ = ["ShadingConfig", "SensorConfig", "ShadedImages", "ShadedPoints", "shade_maps",
           "shade_points", "apply_sensor", "sensor_images", "scatter_rows", "quantise"]


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


@dataclass
class ShadedPoints:
    """Radiance of each light at M surface points (the packed form of
    :class:`ShadedImages`).

    Attributes:
        diffuse: (L, M, 3) float32 eq. 1 with cast shadows.
        specular: (L, M, 3) float32 specular sheen (zeros in Lambertian mode).
        shadow: (L, M) bool, True where the light is blocked by other geometry.
        attached: (L, M) bool, True where n . (P - V) <= 0 (attached shadow).
    """

    diffuse: np.ndarray
    specular: np.ndarray
    shadow: np.ndarray
    attached: np.ndarray

    @property
    def radiance(self) -> np.ndarray:
        return self.diffuse + self.specular


def _norm3(a: np.ndarray) -> np.ndarray:
    """(M,) lengths of (M, 3) vectors. numpy reductions over a last axis of length 3 are
    several times slower than column arithmetic (and ``max``/``any`` over it dozens of
    times): the hot paths here use columns."""
    return np.sqrt(a[:, 0] * a[:, 0] + a[:, 1] * a[:, 1] + a[:, 2] * a[:, 2])


def _max3(a: np.ndarray) -> np.ndarray:
    """``a.max(axis=-1)`` for a last axis of length 3, by columns."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def scatter_rows(out: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``out[:, index] = values`` for arrays (L, N, C...) and (L, M, C...), in place.

    Rows of C... values are moved as single opaque items (a void view), about twice as
    fast as numpy's fancy assignment of (M, 3) rows.
    """
    row = int(np.prod(out.shape[2:], dtype=np.int64)) * out.itemsize
    if (out.ndim > 2 and out.flags.c_contiguous and values.dtype == out.dtype
            and values.shape[2:] == out.shape[2:] and row > 0):
        v = np.ascontiguousarray(values)
        void = np.dtype((np.void, row))
        out.view(void).reshape(out.shape[:2])[:, index] = v.view(void).reshape(v.shape[:2])
    else:
        out[:, index] = values


def shade_points(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray,
                 lights: PointLights, config: ShadingConfig = ShadingConfig(),
                 caster=None) -> ShadedPoints:
    """Shade surface points under near point lights (eq. 1, cast shadows, sheen).

    Args:
        points: (M, 3) camera-frame positions, mm.
        normals: (M, 3) unit shading normals (n_z < 0 facing the camera).
        albedo: (M, 3) linear diffuse albedo.
        lights: L point lights.
        config: shading options.
        caster: a :class:`faceps.core.raycast.RayCaster` of the scene in the camera frame;
            needed for cast shadows (one shadow ray per lit point and light, from the point
            offset by ``config.shadow_bias`` along the normal to 1 um before the light).

    Returns:
        :class:`ShadedPoints`.

    The geometry (:func:`faceps.core.lights.point_irradiance`, shadow rays, half vectors)
    is evaluated in float64, the colours in float32.
    """
    dims = check_shape(points, "points", ("M", 3))
    M = dims["M"]
    check_shape(normals, "normals", (M, 3))
    check_shape(albedo, "albedo", (M, 3))
    L = len(lights)
    P = np.asarray(points, np.float64)
    N = np.asarray(normals, np.float64)
    E = point_irradiance(P, N, lights)               # (L, M) eq. 1 geometry, LED factor
    attached = E <= 0
    shadow = np.zeros((L, M), bool)
    if config.cast_shadows and caster is not None and M:
        # one query for all lights: segments from the point offset along its normal to
        # 1 um before the light (column by column: contiguous arrays)
        oc = [P[:, k] + config.shadow_bias * N[:, k] for k in range(3)]
        sel, origins, segs = [], [], []
        for j in range(L):
            lit = np.nonzero(~attached[j])[0]
            o = [c[lit] for c in oc]
            d = [lights.positions[j, k] - o[k] for k in range(3)]
            length = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            live = length > 1e-3                     # an empty segment is never blocked
            if not live.all():
                lit, length = lit[live], length[live]
                o = [c[live] for c in o]
                d = [c[live] for c in d]
            scale = 1.0 - 1e-3 / length
            sel.append(lit)
            origins.append(np.stack(o, 1))
            segs.append(np.stack([c * scale for c in d], 1))
        counts = [s_.size for s_ in sel]
        if sum(counts):
            blocked = caster.occluded(np.concatenate(origins), np.concatenate(segs), 1.0)
            for j, part in enumerate(np.split(blocked, np.cumsum(counts)[:-1])):
                shadow[j, sel[j]] = part
    lit_e = np.where(shadow, 0.0, E).astype(np.float32)          # (L, M)
    A = np.asarray(albedo, np.float32)
    beta = lights.intensities.astype(np.float32)                  # (L, 3)
    diffuse = A[None] * beta[:, None, :] * lit_e[..., None]
    spec = np.zeros_like(diffuse)
    if not config.lambertian and config.specular > 0:
        Pc = [np.ascontiguousarray(P[:, k]) for k in range(3)]
        Nc = [np.ascontiguousarray(N[:, k]) for k in range(3)]
        inv = 1.0 / np.sqrt(Pc[0] ** 2 + Pc[1] ** 2 + Pc[2] ** 2)
        view = [-c * inv for c in Pc]
        scale = config.specular * (config.shininess + 8) / 8
        for j in range(L):
            on = np.nonzero(lit_e[j] > 0)[0]        # the lobe is zero where E is
            d = [lights.positions[j, k] - Pc[k][on] for k in range(3)]
            inv = 1.0 / np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
            h = [d[k] * inv + view[k][on] for k in range(3)]
            hn = np.maximum(np.sqrt(h[0] ** 2 + h[1] ** 2 + h[2] ** 2), 1e-12)
            ndoth = np.clip((Nc[0][on] * h[0] + Nc[1][on] * h[1] + Nc[2][on] * h[2]) / hn,
                            0.0, 1.0)
            # E already holds n.l / d^2 (and the LED factor); the lobe is energy-normalised
            lobe = (scale * ndoth ** config.shininess).astype(np.float32)
            spec[j, on] = beta[j][None, :] * (lit_e[j, on] * lobe)[:, None]
    return ShadedPoints(diffuse=diffuse, specular=spec, shadow=shadow, attached=attached)


def shade_maps(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray, mask: np.ndarray,
               lights: PointLights, config: ShadingConfig = ShadingConfig(),
               caster=None) -> ShadedImages:
    """Shade per-pixel geometry under near point lights (:func:`shade_points` on the
    pixels of ``mask``).

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
    shaded = shade_points(points.reshape(-1, 3)[idx], normals.reshape(-1, 3)[idx],
                          albedo.reshape(-1, 3)[idx], lights, config, caster)

    def scatter(vals: np.ndarray, fill) -> np.ndarray:
        out = np.full((L, H * W) + vals.shape[2:], fill, dtype=vals.dtype)
        out[:, idx] = vals
        return out.reshape((L, H, W) + vals.shape[2:])

    return ShadedImages(
        diffuse=scatter(shaded.diffuse, 0.0),
        specular=scatter(shaded.specular, 0.0),
        shadow=scatter(shaded.shadow, False),
        attached=scatter(shaded.attached, False),
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


def sensor_images(radiance: np.ndarray, pixels: np.ndarray, camera: Camera,
                  config: SensorConfig = SensorConfig(),
                  rng: np.random.Generator | None = None
                  ) -> tuple[np.ndarray, float, np.ndarray]:
    """:func:`apply_sensor` for radiance given only at the surface pixels.

    The same images, exposure and random draws as ``apply_sensor(full, camera, mask,
    config, rng)`` with ``full`` the radiance scattered into a zero image and ``mask`` the
    pixels, without full-image passes over the (zero) background: there the value is the
    read noise alone.

    Args:
        radiance: (L, M, 3) linear radiance at the pixels.
        pixels: (M,) flat pixel ids (row-major) into the camera's H x W image, no repeats.
        camera: the camera (image size, vignetting).
        config: sensor options.
        rng: noise generator (required when any noise is on).

    Returns:
        (images, exposure, saturated): (L, H, W, 3) float32 linear sensor values clipped to
        [0, saturation]; the exposure used; (L, H, W) bool pixels at saturation (only the
        given pixels can be True).
    """
    check_shape(radiance, "radiance", (None, "M", 3))
    pix = np.asarray(pixels, np.int64).reshape(-1)
    check_shape(pix, "pixels", (radiance.shape[1],))
    H, W = camera.height, camera.width
    L = radiance.shape[0]
    if pix.size and (pix.min() < 0 or pix.max() >= H * W):
        raise ConfigError(f"pixels outside the {W}x{H} image")
    if config.exposure is None:
        vals = _max3(radiance)
        ref = float(np.percentile(vals, config.auto_percentile)) if vals.size else 0.0
        exposure = config.auto_target / ref if ref > 0 else 1.0
    else:
        exposure = float(config.exposure)
    fg = radiance.astype(np.float32) * np.float32(exposure)          # (L, M, 3)
    if config.vignetting > 0 and pix.size:
        gain = vignetting_map(camera, config.vignetting).reshape(-1)[pix]
        fg *= gain[None, :, None]
    sat = config.saturation
    if config.full_well > 0 or config.read_noise > 0:
        if rng is None:
            raise ConfigError("a random generator is needed for sensor noise")
        # the same draw as apply_sensor; the background is 0 + read_noise * z
        img = rng.standard_normal((L, H, W, 3), dtype=np.float32)
        flat = img.reshape(L, H * W, 3)
        z = np.take(flat, pix, axis=1)
        std = np.zeros_like(fg)
        if config.full_well > 0:
            std += np.maximum(fg, 0.0) / np.float32(config.full_well)
        if config.read_noise > 0:
            rn2 = np.float32(config.read_noise) ** 2
            std += rn2
            img *= np.sqrt(rn2)
        else:
            img.fill(0.0)
        np.sqrt(std, out=std)
        fg += std * z
        np.maximum(img, 0.0, out=img)
        np.minimum(img, np.float32(sat), out=img)
    else:
        img = np.zeros((L, H, W, 3), np.float32)
        flat = img.reshape(L, H * W, 3)
    saturated = np.zeros((L, H * W), bool)
    saturated[:, pix] = _max3(fg) >= sat
    np.clip(fg, 0.0, sat, out=fg)
    scatter_rows(flat, pix, fg)
    return img, exposure, saturated.reshape(L, H, W)


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
