"""Classic per-pixel photometric stereo under near point lights (no prior).

For a pixel at position V with normal n and RGB albedo rho, eq. 1 gives for light j and
channel c: ``I_jc / beta_jc = rho_c * (n . g_j)`` with ``g_j = (P_j - V) / |P_j - V|^3``
(times the LED factor). Averaging over channels, ``y_j = b . g_j`` with ``b = rho_mean n``:
a linear least-squares problem per pixel over the lights that are usable there (not
saturated, not dark). With three or more usable lights the normal is ``b / |b|``; the
per-channel albedo follows in closed form.

This is the near-light baseline of the reconstruction benchmarks and the consistency check
of synthetic captures; the method's own update (eq. 6) adds the proxy prior and albedo
smoothness (:mod:`faceps.optimize.photometric`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from faceps.core.errors import FitError, check_shape
from faceps.core.lights import PointLights

__all__ = ["NearLightResult", "nearlight_least_squares", "distant_light_least_squares",
           "angular_error_deg", "normal_stats"]


@dataclass
class NearLightResult:
    """Per-pixel estimates.

    Attributes:
        normals: (H, W, 3) float32 unit normals; NaN where not solved.
        albedo: (H, W, 3) float32 linear albedo (scale of the lights); NaN where not solved.
        n_lights: (H, W) int number of usable lights per pixel.
        valid: (H, W) bool pixels solved (>= ``min_lights`` usable lights).
        residual: (H, W) float32 RMS of the channel-averaged fit (NaN where not solved).
    """

    normals: np.ndarray
    albedo: np.ndarray
    n_lights: np.ndarray
    valid: np.ndarray
    residual: np.ndarray


def nearlight_least_squares(images: np.ndarray, points: np.ndarray, lights: PointLights,
                            mask: np.ndarray, *, saturated: np.ndarray | None = None,
                            dark: float = 0.004, min_lights: int = 3) -> NearLightResult:
    """Solve near-light photometric stereo independently per pixel.

    Args:
        images: (L, H, W, 3) linear images, one per light.
        points: (H, W, 3) surface positions in mm (camera frame), e.g. from a proxy depth.
        lights: L calibrated point lights in the images' order.
        mask: (H, W) bool pixels to solve.
        saturated: optional (L, H, W) bool clipped pixels (not used).
        dark: pixels darker than this (channel mean, image units) count as shadowed.
        min_lights: lights needed to solve a pixel (3 for a unique normal).

    Returns:
        :class:`NearLightResult`.
    """
    dims = check_shape(images, "images", ("L", "H", "W", 3))
    L, H, W = dims["L"], dims["H"], dims["W"]
    check_shape(points, "points", (H, W, 3))
    check_shape(mask, "mask", (H, W))
    if len(lights) != L:
        raise FitError(f"{L} images but {len(lights)} lights")
    if min_lights < 3:
        raise FitError("min_lights must be >= 3 for a unique normal")
    m = mask & np.all(np.isfinite(points), axis=-1)
    idx = np.nonzero(m.reshape(-1))[0]
    V = points.reshape(-1, 3)[idx].astype(np.float64)
    I = images.reshape(L, -1, 3)[:, idx].astype(np.float64)            # (L, M, 3)
    d = lights.positions[:, None, :] - V[None]                          # (L, M, 3)
    dist = np.linalg.norm(d, axis=-1)
    g = d / dist[..., None] ** 3
    if np.any(lights.anisotropy > 0):
        cos = np.maximum(np.einsum("lmk,lk->lm", -d, lights.directions) / dist, 0.0)
        g = g * np.where(lights.anisotropy[:, None] > 0,
                         cos ** lights.anisotropy[:, None], 1.0)[..., None]
    y_c = I / lights.intensities[:, None, :]                            # (L, M, 3)
    y = y_c.mean(-1)
    usable = I.mean(-1) > dark
    if saturated is not None:
        check_shape(saturated, "saturated", (L, H, W))
        usable &= ~saturated.reshape(L, -1)[:, idx]
    w = usable.astype(np.float64)
    A = np.einsum("lm,lmi,lmj->mij", w, g, g)
    rhs = np.einsum("lm,lmi,lm->mi", w, g, y)
    count = usable.sum(0)
    ok = count >= min_lights
    b = np.zeros((idx.size, 3))
    if ok.any():
        # regularise the 3x3 systems a hair for near-degenerate light layouts
        Aok = A[ok] + 1e-12 * np.trace(A[ok], axis1=1, axis2=2)[:, None, None] * np.eye(3)
        b[ok] = np.linalg.solve(Aok, rhs[ok][..., None])[..., 0]
    norm = np.linalg.norm(b, axis=1)
    ok &= norm > 0
    n = np.where(ok[:, None], b / np.maximum(norm, 1e-300)[:, None], np.nan)
    shade = np.einsum("lmk,mk->lm", g, np.nan_to_num(n))                # (L, M)
    sw = w * (shade > 0)
    den = np.einsum("lm,lm->m", sw, shade**2)
    rho = np.einsum("lm,lm,lmc->mc", sw, shade, y_c) / np.maximum(den, 1e-300)[:, None]
    res = np.sqrt(np.einsum("lm,lm->m", w, (y - norm[None] * shade) ** 2)
                  / np.maximum(count, 1))
    scale = np.where(ok, 1.0, np.nan)

    def full(vals: np.ndarray, fill=np.nan, dtype=np.float32) -> np.ndarray:
        out = np.full((H * W,) + vals.shape[1:], fill, dtype=dtype)
        out[idx] = vals
        return out.reshape((H, W) + vals.shape[1:])

    return NearLightResult(
        normals=full(n), albedo=full(rho * scale[:, None]), n_lights=full(count, 0, np.int32),
        valid=full(ok, False, bool), residual=full(res * scale))


def distant_light_least_squares(images: np.ndarray, centre: np.ndarray, lights: PointLights,
                                mask: np.ndarray, *, saturated: np.ndarray | None = None,
                                dark: float = 0.004, min_lights: int = 3) -> NearLightResult:
    """Classic distant-light photometric stereo (Woodham 1980) with near lights treated as
    distant: every pixel sees light j from the direction ``(P_j - C) / |P_j - C|`` with the
    irradiance it has at one point ``C`` (the face centre), ``beta_j / |P_j - C|^2`` times
    the LED factor there. The baseline a near-light method is measured against.

    This is :func:`nearlight_least_squares` with every pixel placed at ``C``: then
    ``g_j = (P_j - C) / |P_j - C|^3`` is exactly that direction and irradiance.

    Args:
        images: (L, H, W, 3) linear images.
        centre: (3,) the point C, mm, camera frame (e.g. the median proxy position over
            the face).
        lights, mask, saturated, dark, min_lights: as :func:`nearlight_least_squares`.

    Returns:
        :class:`NearLightResult`.
    """
    dims = check_shape(images, "images", ("L", "H", "W", 3))
    c = np.asarray(centre, dtype=np.float64)
    check_shape(c, "centre", (3,))
    if not np.all(np.isfinite(c)):
        raise FitError("distant_light_least_squares: the centre is not finite")
    points = np.broadcast_to(c, (dims["H"], dims["W"], 3))
    return nearlight_least_squares(images, points, lights, mask, saturated=saturated,
                                   dark=dark, min_lights=min_lights)


def angular_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between unit vectors (..., 3); NaN where either is NaN."""
    dot = np.clip(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1),
                  -1.0, 1.0)
    return np.degrees(np.arccos(dot))


def normal_stats(err_deg: np.ndarray) -> dict:
    """Mean, median and % below 11.25/20/25/30 degrees of finite angular errors."""
    e = np.asarray(err_deg, np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        return {"count": 0}
    return {"count": int(e.size), "mean": float(e.mean()), "median": float(np.median(e)),
            **{f"below_{t:g}": float(100.0 * np.mean(e < t)) for t in (11.25, 20, 25, 30)}}
