"""Preview renders of morphable models: random faces and expression sheets.

Faces are ray cast (:mod:`faceps.core.raycast`) with a pinhole camera, shaded Lambertian
with their albedo under three near point lights (paper eq. 1,
:func:`faceps.core.lights.shade_point`) with cast shadows and a little ambient light,
tone-mapped to sRGB and composed into PNG sheets. Works for any contract-5 model: the
framing follows the model's face region.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from faceps.core.atomic import save_png
from faceps.core.camera import Camera
from faceps.core.color import linear_to_srgb
from faceps.core.errors import ConfigError
from faceps.core.lights import PointLights, shade_point
from faceps.core.mesh import vertex_normals
from faceps.core.raycast import RayCaster
from faceps.core.rotation import pose_rotation
from faceps.model.morphable import Coefficients, MorphableModel

__all__ = ["render_face", "render_tile", "preview_grid", "render_expressions", "preview_pose",
           "preview_lights"]

#: camera distance to the face (mm)
VIEW_DISTANCE = 700.0
#: background grey (sRGB code value in [0, 1])
BACKGROUND = 0.80
#: fraction of the tile the face region's larger side fills
FILL = 0.88
#: ambient light as a fraction of the albedo
AMBIENT = 0.16
_SUPERSAMPLE = 2
#: radius of the light discs for soft shadows (mm)
LIGHT_RADIUS = 60.0
#: shadow rays ignore occluders closer than this (mm)
SHADOW_SKIP = 2.5
# sample offsets on the unit disc (centre and a ring), for soft shadows
_SHADOW_SAMPLES = np.concatenate([[[0.0, 0.0]], np.stack(
    [np.cos(np.arange(3) * 2 * np.pi / 3), np.sin(np.arange(3) * 2 * np.pi / 3)], 1)])


def preview_lights() -> PointLights:
    """Key (upper left), fill (right) and top lights in the camera frame, placed for a
    face at :data:`VIEW_DISTANCE`; intensities give a key irradiance near 0.7."""
    pos = np.array([[-380.0, -320.0, 60.0], [420.0, -60.0, 120.0], [40.0, -520.0, 380.0]])
    face = np.array([0.0, 0.0, VIEW_DISTANCE])
    d2 = np.sum((pos - face) ** 2, axis=1)
    gain = np.array([0.72, 0.30, 0.22])
    return PointLights(pos, (gain * d2)[:, None] * np.ones(3), names=("key", "fill", "top"))


def preview_pose(model: MorphableModel, geometry: np.ndarray, yaw_deg: float = 0.0,
                 pitch_deg: float = 0.0, size: int = 256) -> tuple[np.ndarray, np.ndarray, Camera]:
    """Pose and camera that frame a face for :func:`render_face`.

    The face region's bounding-box centre is placed on the optical axis at
    :data:`VIEW_DISTANCE`, turned by (pitch, yaw) about that centre; the field of view
    makes the region's larger side fill :data:`FILL` of the tile.

    Args:
        model: the model (for its face region); geometry: (V, 3) model-frame vertices.

    Returns:
        (R (3, 3), t (3,), camera) with ``X_cam = R X + t``.
    """
    G = np.asarray(geometry, dtype=np.float64)
    face = G[model.region] if model.region.any() else G
    lo, hi = face.min(axis=0), face.max(axis=0)
    centre = 0.5 * (lo + hi)
    extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    R = pose_rotation(np.radians([pitch_deg, yaw_deg, 0.0]))
    t = np.array([0.0, 0.0, VIEW_DISTANCE]) - R @ centre
    half = 0.5 * extent / FILL
    fov = 2.0 * np.degrees(np.arctan(half / (VIEW_DISTANCE - 0.5 * (hi[2] - lo[2]))))
    return R, t, Camera.from_fov((size, size), fov)


def _visibility(caster: RayCaster, points: np.ndarray, normals: np.ndarray,
                lights: PointLights, radius: float = LIGHT_RADIUS) -> np.ndarray:
    """Fraction (L, M) of each light's disc (``radius`` mm, facing the points) seen from
    each point: soft cast shadows from :data:`_SHADOW_SAMPLES` rays per light.

    Shadow rays start a little off the surface and ignore the first
    :data:`SHADOW_SKIP` mm, so the coarse tessellation does not shadow itself near the
    terminator.
    """
    M = points.shape[0]
    vis = np.zeros((len(lights), M))
    for j in range(len(lights)):
        centre = lights.positions[j]
        axis = centre - points.mean(axis=0)
        axis /= np.linalg.norm(axis)
        e1 = np.cross(axis, [0.0, 1.0, 0.0] if abs(axis[1]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(axis, e1)
        facing = np.einsum("mk,mk->m", normals, centre - points) > 0
        idx = np.nonzero(facing)[0]
        if idx.size == 0:
            continue
        for a in _SHADOW_SAMPLES:
            target = centre + radius * (a[0] * e1 + a[1] * e2)
            d = target - points[idx]
            length = np.linalg.norm(d, axis=1, keepdims=True)
            u = d / length
            origin = points[idx] + 0.2 * normals[idx] + SHADOW_SKIP * u
            blocked = caster.occluded(origin, target - origin, 1.0)
            vis[j, idx] += ~blocked
        vis[j] /= len(_SHADOW_SAMPLES)
    return vis


def render_tile(vertices_cam: np.ndarray, triangles: np.ndarray, albedo: np.ndarray,
                camera: Camera, lights: PointLights | None = None, shadows: bool = True,
                ambient: float = AMBIENT, background: float = BACKGROUND) -> np.ndarray:
    """Shade a mesh given in the camera frame; return an sRGB float image.

    Args:
        vertices_cam: (V, 3) mm, camera frame; triangles: (F, 3) counter-clockwise.
        albedo: (V, 3) linear RGB per vertex.
        camera: the pinhole camera; lights: near point lights in the camera frame
            (default: :func:`preview_lights`).
        shadows: soft cast shadows (a few shadow rays per pixel and light).
        ambient: ambient light as a fraction of the albedo.
        background: grey level (sRGB code value) where no surface is seen.

    Returns:
        (H, W, 3) float32 sRGB code values in [0, 1].
    """
    lights = preview_lights() if lights is None else lights
    caster = RayCaster(vertices_cam, triangles)
    normals = vertex_normals(vertices_cam, triangles)
    maps = caster.render(camera, vertex_normals=normals, vertex_attrs={"albedo": albedo})
    mask = maps["mask"]
    H, W = mask.shape
    out = np.full((H, W, 3), background, np.float32)
    if not mask.any():
        return out
    P = maps["points"][mask]
    N = maps["normals"][mask]
    A = np.clip(maps["albedo"][mask], 0.0, 1.0)
    lit = shade_point(P, N, A, lights).astype(np.float64)         # (L, M, 3)
    if shadows:
        lit *= _visibility(caster, P, N, lights)[..., None]
    sky = 0.75 + 0.25 * np.clip(-N[:, 1], -1.0, 1.0)               # more ambient from above
    rgb = lit.sum(axis=0) + ambient * A * sky[:, None]
    # gentle highlight compression, then sRGB encoding
    rgb = rgb / (1.0 + 0.25 * np.maximum(rgb - 0.6, 0.0))
    out[mask] = np.clip(linear_to_srgb(rgb.astype(np.float32)), 0.0, 1.0)
    return out


def render_face(model: MorphableModel, coefficients: Coefficients | None = None,
                yaw_deg: float = 0.0, size: int = 256, *, pitch_deg: float = 0.0,
                shadows: bool = True) -> np.ndarray:
    """Render one face of ``model`` as an 8-bit RGB tile.

    Args:
        model: any contract-5 model.
        coefficients: identity, expression and albedo coefficients (default: the mean).
        yaw_deg: head yaw in degrees (positive turns the face toward the image's right);
            pitch_deg: head pitch (positive looks down).
        size: tile side in pixels.
        shadows: cast shadows of the lights.

    Returns:
        (size, size, 3) uint8 sRGB image.
    """
    import cv2

    if size < 16:
        raise ConfigError(f"tile size must be at least 16 pixels; got {size}")
    c = coefficients or Coefficients(np.zeros(0), np.zeros(0), np.zeros(0))
    G = model.geometry(c.id, c.exp)
    albedo = model.albedo(c.albedo if c.albedo.size else None)
    s = size * _SUPERSAMPLE
    R, t, cam = preview_pose(model, G, yaw_deg=yaw_deg, pitch_deg=pitch_deg, size=s)
    img = render_tile(G @ R.T + t, model.triangles, albedo, cam, shadows=shadows)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _fold_one_sided(model: MorphableModel, exp: np.ndarray) -> np.ndarray:
    """Expression coefficients with the built-in model's one-sided modes clipped at 0."""
    if not model.exp_names:
        return exp
    from faceps.model.builtin import ONE_SIDED_EXPRESSIONS

    out = np.array(exp, dtype=np.float64)
    for k, name in enumerate(model.exp_names):
        if name in ONE_SIDED_EXPRESSIONS and k < out.size:
            out[k] = max(out[k], 0.0)
    return out


def preview_grid(model: MorphableModel, out_png: str | os.PathLike, n: int = 8, seed: int = 0,
                 size: int = 256, per_row: int = 4, exp_scale: float = 0.45,
                 yaws: Sequence[float] = (0.0, 45.0)) -> Path:
    """Render ``n`` random faces, each frontal and at 45 degrees yaw, into one PNG.

    Faces are drawn with ``model.sample`` from ``numpy.random.default_rng(seed)``
    (identity and albedo at one standard deviation, expression at ``exp_scale``; the
    mouth-opening expressions of :data:`faceps.model.builtin.ONE_SIDED_EXPRESSIONS` are
    clipped at 0). Each face is a horizontal group of ``len(yaws)`` tiles (default frontal
    and 45 degrees yaw); ``per_row`` faces per row.

    Returns:
        the written path; the image is ``min(n, per_row) * len(yaws) * size`` wide and
        ``ceil(n / per_row) * size`` high.
    """
    if n < 1 or per_row < 1:
        raise ConfigError(f"n and per_row must be >= 1; got n={n}, per_row={per_row}")
    rng = np.random.default_rng(seed)
    cols = min(n, per_row)
    rows = -(-n // per_row)
    k = len(yaws)
    sheet = np.full((rows * size, cols * k * size, 3), round(BACKGROUND * 255), np.uint8)
    for i in range(n):
        c = model.sample(rng, exp_scale=exp_scale)
        c = Coefficients(c.id, _fold_one_sided(model, c.exp), c.albedo)
        r0, c0 = (i // per_row) * size, (i % per_row) * k * size
        for j, yaw in enumerate(yaws):
            sheet[r0:r0 + size, c0 + j * size:c0 + (j + 1) * size] = render_face(
                model, c, yaw_deg=yaw, size=size)
    return save_png(out_png, sheet)


def render_expressions(model: MorphableModel, out_png: str | os.PathLike, alpha: float = 1.5,
                       size: int = 192, per_row: int = 7, yaw_deg: float = 20.0) -> Path:
    """Sheet of the neutral face and each expression component at ``alpha`` std devs,
    labelled with its name (or index), mean identity and albedo.

    Returns:
        the written path.
    """
    import cv2

    names = list(model.exp_names or [f"exp {k}" for k in range(model.n_exp)])
    tiles = [("neutral", np.zeros(model.n_exp))]
    for k, name in enumerate(names):
        e = np.zeros(model.n_exp)
        e[k] = alpha
        tiles.append((f"{name} {alpha:g}", e))
    cols = min(len(tiles), per_row)
    rows = -(-len(tiles) // per_row)
    sheet = np.full((rows * size, cols * size, 3), round(BACKGROUND * 255), np.uint8)
    scale = size / 256.0
    for i, (label, e) in enumerate(tiles):
        img = render_face(model, Coefficients(np.zeros(model.n_id), e, np.zeros(model.n_albedo)),
                          yaw_deg=yaw_deg, size=size)
        img = np.ascontiguousarray(img)
        cv2.putText(img, label, (int(6 * scale), size - int(10 * scale)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (20, 20, 20), 1, cv2.LINE_AA)
        r0, c0 = (i // per_row) * size, (i % per_row) * size
        sheet[r0:r0 + size, c0:c0 + size] = img
    return save_png(out_png, sheet)
