"""The optimisation pipeline of section 3.2: a capture in, contract 2 out.

``reconstruct`` runs, on a working copy of the capture (optionally downscaled):

1. landmarks -> landmark proxy fit -> light calibration (unless the session gives the
   lights) -> photometric proxy refinement (:func:`faceps.optimize.fit.fit_session`);
2. the proxy's per-pixel maps (z-buffer, :func:`faceps.core.rasterize.raster_maps`) and
   the reconstructed region: pixels of the model's face region seen by the camera
   (intersected with the session mask);
3. cast shadows of the proxy toward every light (shadow rays); when the session gives the
   lights, the proxy's distance along the camera rays is corrected by the factor that best
   explains the images (:func:`faceps.optimize.distance.estimate_distance_scale`);
4. the alternating normal/albedo update of eq. 5-6
   (:func:`faceps.optimize.normal_albedo.update_normals_albedo`, pixel or triangle domain);
5. the Gauss-Newton height field of eq. 7 (:func:`faceps.optimize.heightfield.solve_height_field`)
   with the proxy depth as Z0; then (``refine_passes``, default 1) step 4 again with the
   height field's normals as the prior, at its positions, and the height field refined
   from the depth before;
6. the maps are brought back to the input resolution (bilinear, normals re-normalised).

:func:`write_reconstruction` writes contract 2 of DESIGN.md: ``normals.npy``, ``depth.npy``,
``albedo.npy`` (float32, NaN outside), ``mask.png``, ``lights.json``, ``proxy.json``,
``mesh.ply`` (the triangulated height field with per-vertex normals and sRGB colour),
``normals.png``, ``albedo.png``, ``shading.png`` and ``report.json``.

The normals written are those of the normal update (step 4), the photometric detail;
the depth and mesh are the height field of step 5, whose own normals agree with them up to
what an integrable surface can represent (reported as ``height_field.normal_gap_deg``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from faceps.capture import Capture
from faceps.core.atomic import save_json, save_npy, save_ply, save_png
from faceps.core.camera import Camera
from faceps.core.color import linear_to_srgb
from faceps.core.errors import ConfigError, FitError
from faceps.core.imageio import normals_to_rgb
from faceps.core.lights import PointLights
from faceps.core.threads import blas_threads
from faceps.model.morphable import MorphableModel
from faceps.optimize.distance import DistanceConfig, estimate_distance_scale
from faceps.optimize.fit import FitConfig, SessionFit, fit_session, proxy_maps
from faceps.optimize.heightfield import HeightFieldConfig, solve_height_field
from faceps.optimize.nearlight import angular_error_deg
from faceps.optimize.normal_albedo import (
    NormalAlbedoConfig,
    cast_shadow_mask,
    update_normals_albedo,
    update_normals_albedo_mesh,
)

log = logging.getLogger(__name__)

#: height-field weight of the proxy normal where the normal update found too few lights
_UNSOLVED_WEIGHT = 0.05
#: the normal update's noise factor from which the report warns about noisy images
_NOISY_FACTOR = 2.0
#: the share of the face region clipped in some image from which the report warns
_CLIPPED_SHARE = 0.2

__all__ = ["ReconstructConfig", "Reconstruction", "reconstruct", "write_reconstruction",
           "downscale_capture", "height_field_mesh", "albedo_preview",
           "shading_preview"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Options of :func:`reconstruct`.

    Attributes:
        fit: proxy fitting and light calibration (:class:`FitConfig`).
        normal_albedo: the eq. 6 update; its ``domain`` is ``pixel`` (default) or
            ``triangle`` (the paper's per-triangle solve, transferred to pixels).
        height_field: the eq. 7 solve.
        max_size: work on a copy whose longer side is at most this many pixels (None: the
            input resolution); results are upsampled to the input resolution.
        refine_passes: extra rounds of normal update -> height field (pixel domain): the
            update is solved again with the refined height field's normals as the prior
            (instead of the proxy's) at its positions, then the height field is refined
            from the depth before. The rig's lights lie nearly in one plane, so the data
            fix the normals' vertical tilt about ten times more weakly than the rest and
            the prior sets it; the height field's normals are integrable, which ties that
            tilt to the well-measured horizontal one. See bench/RESULTS.md for the
            measured default.

            A pass that another follows mainly supplies that prior: its normal update runs
            ``lead_refine_iterations`` outer iterations at the levels finer than the
            coarsest, and its height field one full-size Gauss-Newton iteration; the
            height field of a refinement pass refines the depth before in one more.
        refine_pass_iterations: outer iterations of the normal update's coarsest level in
            a refinement pass.
        lead_refine_iterations: ``refine_iterations`` of the normal update in a pass that
            a refinement pass follows (0: the finer levels keep the coarser level's albedo
            and only update the normals).
        refine_pass_mu1: the prior weight ``mu1`` of a refinement pass (None: that of
            ``normal_albedo``); its prior, the height field's normals, is closer to the
            truth than the proxy's, so it is trusted more (0.2 against 0.1).
        region: ``face`` (the model's face region seen by the camera) or ``visible`` (every
            front-facing proxy pixel, e.g. with ears and neck).
        erode_px: pixels removed from the border of the region (at the working size),
            where the proxy silhouette is least reliable.
        distance: ``auto`` (default: when the session gives the lights), ``search`` or
            ``off``: scale the proxy about the camera centre by the factor that best
            explains the images (:func:`faceps.optimize.distance.estimate_distance_scale`)
            before the normal update; the landmark fit leaves the distance uncertain by
            up to about 3 %. Calibrated lights were fitted to the proxy where it is, so
            ``auto`` does not search with them.
        distance_search: options of that search.
    """

    fit: FitConfig = field(default_factory=FitConfig)
    normal_albedo: NormalAlbedoConfig = field(default_factory=NormalAlbedoConfig)
    height_field: HeightFieldConfig = field(default_factory=HeightFieldConfig)
    max_size: int | None = None
    refine_passes: int = 1
    refine_pass_iterations: int = 8
    lead_refine_iterations: int = 0
    refine_pass_mu1: float | None = 0.2
    region: str = "face"
    erode_px: int = 0
    distance: str = "auto"
    distance_search: DistanceConfig = field(default_factory=DistanceConfig)

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 64:
            raise ConfigError(f"max_size must be >= 64 pixels; got {self.max_size}")
        if self.refine_passes < 0:
            raise ConfigError(f"refine_passes must be >= 0; got {self.refine_passes}")
        if self.refine_pass_mu1 is not None and not (np.isfinite(self.refine_pass_mu1)
                                                     and self.refine_pass_mu1 >= 0):
            raise ConfigError(f"refine_pass_mu1 must be >= 0 or None; got "
                              f"{self.refine_pass_mu1}")
        if self.refine_pass_iterations < 1:
            raise ConfigError(f"refine_pass_iterations must be >= 1; got "
                              f"{self.refine_pass_iterations}")
        if self.lead_refine_iterations < 0:
            raise ConfigError(f"lead_refine_iterations must be >= 0; got "
                              f"{self.lead_refine_iterations}")
        if self.region not in ("face", "visible"):
            raise ConfigError(f"region must be 'face' or 'visible'; got {self.region!r}")
        if self.distance not in ("auto", "search", "off"):
            raise ConfigError(f"distance must be 'auto', 'search' or 'off'; got "
                              f"{self.distance!r}")
        if self.erode_px < 0:
            raise ConfigError(f"erode_px must be >= 0; got {self.erode_px}")
        if self.normal_albedo.domain not in ("pixel", "triangle"):
            raise ConfigError(f"unknown normal/albedo domain {self.normal_albedo.domain!r}")


@dataclass
class Reconstruction:
    """A reconstructed capture at the input resolution, camera frame of the session.

    Attributes:
        normals: (H, W, 3) float32 unit normals (n_z < 0 facing the camera); NaN outside.
        depth: (H, W) float32 z in mm; NaN outside.
        albedo: (H, W, 3) float32 linear albedo in the scale of ``lights``; NaN outside.
        mask: (H, W) bool reconstructed region (finite normals, depth and albedo).
        lights: the lights used (given by the session or calibrated).
        fit: the proxy fit and how the lights were obtained.
        camera: the camera of the maps (the input resolution).
        report: per-stage timings (s), residual histories, iteration counts, warnings.
    """

    normals: np.ndarray
    depth: np.ndarray
    albedo: np.ndarray
    mask: np.ndarray
    lights: PointLights
    fit: SessionFit
    camera: Camera
    report: dict


# ------------------------------------------------------------------------ resampling
def downscale_capture(capture: Capture, max_size: int) -> Capture:
    """A copy of the capture whose longer side is at most ``max_size`` pixels.

    Images are area-averaged; a pixel is saturated (per channel too, or in the mask) when
    any of the pixels it averages is saturated (when at least half of them are in the mask);
    landmarks and K follow the pixel-centre convention of :meth:`Camera.scaled`.
    Returns the capture itself when it is already small enough.
    """
    import cv2

    W, H = capture.width, capture.height
    s = max_size / max(W, H)
    if s >= 1:
        return capture
    w, h = max(1, round(W * s)), max(1, round(H * s))
    images = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)
                       for im in capture.images])
    sat = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
                    for m in capture.saturated])
    channels = None
    if capture.saturated_channels is not None:
        channels = np.stack([cv2.resize(m.astype(np.float32), (w, h),
                                        interpolation=cv2.INTER_AREA) > 0
                             for m in capture.saturated_channels])
    mask = None
    if capture.mask is not None:
        mask = cv2.resize(capture.mask.astype(np.float32), (w, h),
                          interpolation=cv2.INTER_AREA) >= 0.5
    lm = None
    if capture.landmarks is not None:
        lm = (capture.landmarks + 0.5) * np.array([w / W, h / H]) - 0.5
    return replace(capture, camera=capture.camera.scaled((w, h)), images=images,
                   saturated=sat, mask=mask, landmarks=lm, saturated_channels=channels)


def _upsample(values: np.ndarray, valid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a map with holes: values at NaN pixels are filled from the
    nearest valid pixel first, so no NaN bleeds into the result."""
    import cv2
    from scipy import ndimage

    W, H = size
    v = values.astype(np.float32)
    if not valid.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
        v = v[iy, ix]
    return cv2.resize(v, (W, H), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------ pipeline
def _region(model: MorphableModel, maps: dict, capture: Capture, config: ReconstructConfig
            ) -> np.ndarray:
    from scipy import ndimage

    region = maps["mask"].copy()
    if config.region == "face":
        face_tris = np.nonzero(model.region[model.triangles].all(1))[0]
        region &= np.isin(maps["triangle"], face_tris)
    if capture.mask is not None:
        region &= capture.mask
    if config.erode_px > 0:
        region = ndimage.binary_erosion(region, iterations=config.erode_px)
    # eq. 7 needs two consecutive neighbours per pixel: drop one-pixel strips and specks
    # (e.g. slivers of the face region between the nose and the cheek), keep the largest
    # connected part
    region = ndimage.binary_opening(region, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(region)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        region = labels == int(np.argmax(sizes))
    if region.sum() < 100:
        raise FitError(f"{capture.root}: the proxy covers only {int(region.sum())} pixels of "
                       "the face; nothing to reconstruct")
    return region


@blas_threads(1)  # its own threads over row blocks; a BLAS pool only oversubscribes
def reconstruct(capture: Capture, model: MorphableModel,
                config: ReconstructConfig | None = None, *,
                progress: object | None = None) -> Reconstruction:
    """Reconstruct normals, albedo and depth of a capture (see the module docstring).

    Args:
        capture: the ingested session (:func:`faceps.capture.load_session`).
        model: the morphable model of the proxy.
        config: options.
        progress: optional callable ``progress(stage_name)`` called as stages start.

    Returns:
        :class:`Reconstruction` at the capture's resolution.

    Raises:
        FitError: no landmarks/face, no lit pixels, or a solver failure (one clear line).
    """
    config = config or ReconstructConfig()
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []

    def stage(name: str) -> float:
        if progress is not None:
            progress(name)
        return time.perf_counter()

    t = stage("ingest")
    work = capture if config.max_size is None else downscale_capture(capture, config.max_size)
    if not np.any(work.images > 0):
        raise FitError(f"{capture.root}: every image is black after the ambient subtraction")
    timings["downscale"] = time.perf_counter() - t

    t = stage("proxy and lights")
    fit = fit_session(work, model, config.fit)
    timings["fit"] = time.perf_counter() - t
    timings.update({f"fit.{k}": v for k, v in fit.timings.items()})
    if fit.calibration is not None:
        warnings += list(getattr(fit.calibration, "warnings", []))
    lights = fit.lights

    t = stage("proxy maps")
    cam = work.camera
    Gc = fit.proxy.geometry(model)
    maps = proxy_maps(model, fit.proxy, work)
    region = _region(model, maps, work, config)
    proxy_depth = np.where(maps["mask"], maps["depth"], np.nan)
    proxy_normals = maps["normals"]
    timings["proxy_maps"] = time.perf_counter() - t
    # the pixel-domain update keeps a sample's unclipped channels when they are known
    clipped_channels = (work.saturated if work.saturated_channels is None
                        else work.saturated_channels)
    clipped = float(np.any(work.saturated, axis=0)[region].mean()) if region.any() else 0.0
    if clipped >= _CLIPPED_SHARE:
        warnings.append(
            f"{100 * clipped:.0f} % of the face is clipped in at least one image; clipped "
            "channels are not used, so those pixels rest on fewer measurements and the "
            "proxy: a shorter exposure or weaker lights help")

    na_cfg = config.normal_albedo
    points = cam.backproject(proxy_depth)
    distance = shadow = None
    if config.distance == "search" or (config.distance == "auto"
                                        and fit.lights_source == "session"):
        t = stage("distance")
        shadow = cast_shadow_mask(points, lights, Gc, model.triangles,
                                  normals=proxy_normals) if na_cfg.shadow_test else None
        distance = estimate_distance_scale(
            work.images, points, proxy_normals, region, lights,
            replace(na_cfg, domain="pixel"), config.distance_search,
            saturated=work.saturated, shadow=shadow)
        # the proxy scaled about the camera centre: same pixels, same normals (the cast
        # shadows of a proxy scaled by a few per cent are kept for the first pass)
        proxy_depth = proxy_depth * distance.scale
        Gc = Gc * distance.scale
        points = cam.backproject(proxy_depth)
        timings["distance"] = time.perf_counter() - t
    history: list[dict] = []
    na = hf = None
    # the triangle domain solves at the proxy's centroids: extra passes with refined
    # positions only exist in the pixel domain
    passes = 1 if na_cfg.domain == "triangle" else config.refine_passes + 1
    for p in range(passes):
        t = stage("normals and albedo")
        if na_cfg.domain == "triangle":
            region_tris = model.region[model.triangles].all(1) if config.region == "face" \
                else None
            na = update_normals_albedo_mesh(work.images, cam, Gc, model.triangles, lights,
                                            na_cfg, saturated=work.saturated,
                                            region=region_tris)
            na_mask = na.mask & region
        else:
            # a refinement pass solves again with the refined height field's (integrable)
            # normals as the prior, at its positions; the cast shadows of the first pass
            # are kept (the surfaces differ by about a millimetre)
            prior, pass_cfg = proxy_normals, replace(na_cfg, domain="pixel")
            if p > 0:
                has = np.all(np.isfinite(hf.normals), -1)
                prior = np.where(has[..., None], hf.normals, proxy_normals)
                pass_cfg = replace(pass_cfg, iterations=int(config.refine_pass_iterations))
                if config.refine_pass_mu1 is not None:
                    pass_cfg = replace(pass_cfg, mu1=float(config.refine_pass_mu1))
            if p < passes - 1:
                pass_cfg = replace(pass_cfg,
                                   refine_iterations=int(config.lead_refine_iterations))
            if not na_cfg.shadow_test:
                shadow = None
            elif shadow is None:
                shadow = cast_shadow_mask(points, lights, Gc, model.triangles,
                                          normals=proxy_normals)
            na = update_normals_albedo(work.images, points, prior, region, lights, pass_cfg,
                                       saturated=clipped_channels, shadow=shadow)
            na_mask = na.mask
        timings[f"normal_albedo_{p}"] = time.perf_counter() - t
        if na_mask.sum() < 100:
            raise FitError(f"{capture.root}: fewer than 100 pixels are lit well enough to "
                           "solve (images too dark or saturated?)")
        t = stage("height field")
        # pixels of the region without an updated normal (too few lights) keep the
        # proxy's, with a small weight: held mostly by the prior and their neighbours
        solved = na_mask & np.all(np.isfinite(na.normals), -1)
        normals_in = np.where(solved[..., None], na.normals, proxy_normals)
        weights = np.where(solved, 1.0, _UNSOLVED_WEIGHT)
        depth0 = np.where(region, proxy_depth, np.nan)
        hf_cfg = config.height_field
        if p < passes - 1:
            # a refinement pass follows and refines this depth: one full-size Gauss-Newton
            # iteration here (six 1600x1200 sessions: normals and depth within 0.03 deg
            # and 0.02 mm of two, 1.2 s less)
            hf_cfg = replace(hf_cfg, iterations=1)
        if p > 0:
            # from the depth of the pass before: one Gauss-Newton iteration at full size
            depth0 = np.where(region & np.isfinite(hf.depth), hf.depth, depth0)
            hf_cfg = replace(hf_cfg, init="depth0", levels=1, iterations=1)
        try:
            hf = solve_height_field(normals_in, depth0, region, cam, hf_cfg, weights=weights)
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
            raise FitError(f"{capture.root}: the height-field solve failed ({exc})") from exc
        timings[f"height_field_{p}"] = time.perf_counter() - t
        history.append({"pass": p, "normal_albedo": {
            "iterations": na.iterations, "converged": na.converged,
            "residual_history": [float(r) for r in na.residual_history],
            "pixels": int(na_mask.sum()), "noise": na.noise,
            "noise_factor": float(na.noise_factor)},
            "height_field": {"iterations": hf.iterations, "converged": hf.converged,
                             "history": [float(c) for c in hf.history],
                             "cg_iterations": list(hf.cg_iterations)}})
        # with refinement passes every height field is capped at one Gauss-Newton
        # iteration on purpose and not expected to meet the convergence test
        if not hf.converged and passes == 1:
            warnings.append(f"pass {p}: the height field did not converge in "
                            f"{hf.iterations} iterations")
        points = cam.backproject(np.where(region, hf.depth, np.nan))

    # (an over-exposed capture's few unclipped samples are dim and read as noisy: the
    # clipping warning above says what to change there)
    if na.noise_factor >= _NOISY_FACTOR and clipped < _CLIPPED_SHARE:
        warnings.append(
            f"the images are noisy ({100 * na.noise:.1f} % of the face's level, "
            f"{na.noise_factor:.1f}x what the defaults were tuned for): the normals lean "
            "on the proxy more; a longer exposure (short of clipping) or an average of "
            "several frames helps")
    mask_w = (na_mask & np.isfinite(hf.depth) & np.all(np.isfinite(na.albedo), -1)
              & np.all(np.isfinite(na.normals), -1))
    gap = angular_error_deg(hf.normals[mask_w], na.normals[mask_w])
    gap = gap[np.isfinite(gap)]
    t = stage("resample")
    normals, depth, albedo, mask = (na.normals, hf.depth, na.albedo, mask_w)
    if (work.width, work.height) != (capture.width, capture.height):
        import cv2

        size = (capture.width, capture.height)
        mask = cv2.resize(mask_w.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        n = np.stack([_upsample(np.where(mask_w, normals[..., k], 0), mask_w, size)
                      for k in range(3)], -1)
        normals = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        depth = _upsample(np.where(mask_w, depth, 0), mask_w, size)
        albedo = np.stack([_upsample(np.where(mask_w, albedo[..., k], 0), mask_w, size)
                           for k in range(3)], -1)
    nan = np.float32(np.nan)
    normals = np.where(mask[..., None], normals, nan).astype(np.float32)
    depth = np.where(mask, depth, nan).astype(np.float32)
    albedo = np.where(mask[..., None], albedo, nan).astype(np.float32)
    timings["resample"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    report = {
        "input_size": [capture.width, capture.height],
        "working_size": [work.width, work.height],
        "pixels": int(mask.sum()),
        "timings": timings,
        "landmarks": {"source": fit.landmark_source,
                      "rmse_px": float(fit.proxy.landmark_rmse_px)},
        "lights_source": fit.lights_source,
        "proxy_history": fit.proxy.history,
        "distance": None if distance is None else distance.to_dict(),
        "passes": history,
        "height_field": {"normal_gap_deg": {
            "mean": float(np.mean(gap)) if gap.size else None,
            "median": float(np.median(gap)) if gap.size else None}},
        "warnings": warnings,
        "config": asdict(config),
    }
    if fit.calibration is not None:
        c = fit.calibration
        report["calibration"] = {"rms": c.rms, "condition": c.condition,
                                 "converged": c.converged, "iterations": c.iterations}
    log.info("reconstruction: %d pixels in %.2f s", int(mask.sum()), timings["total"])
    return Reconstruction(normals, depth, albedo, mask, lights, fit, capture.camera, report)


# ------------------------------------------------------------------------ outputs
def height_field_mesh(depth: np.ndarray, camera: Camera, normals: np.ndarray | None = None,
                      colors: np.ndarray | None = None):
    """Triangulate a depth map: one vertex per finite pixel, two triangles per 2x2 block
    (one where only three corners are finite), counter-clockwise seen from the camera.

    Args:
        depth: (H, W) z in mm, NaN outside.
        camera: camera of the map.
        normals: optional (H, W, 3) per-vertex normals.
        colors: optional (H, W, 3) uint8 per-vertex colours.

    Returns:
        a ``trimesh.Trimesh`` in the camera frame (mm).
    """
    import trimesh

    H, W = depth.shape
    valid = np.isfinite(depth)
    index = -np.ones((H, W), np.int64)
    index[valid] = np.arange(int(valid.sum()))
    V = camera.backproject(np.where(valid, depth, 0.0))[valid]
    a, b = index[:-1, :-1], index[:-1, 1:]          # top-left, top-right
    c, d = index[1:, :-1], index[1:, 1:]            # bottom-left, bottom-right
    # with y down and the camera looking along +z, (a, c, b) is counter-clockwise seen
    # from the camera, i.e. from outside the face
    quads = (a >= 0) & (b >= 0) & (c >= 0) & (d >= 0)
    tris = [np.stack([a[quads], c[quads], b[quads]], 1),
            np.stack([b[quads], c[quads], d[quads]], 1)]
    for t0, t1, t2, other in ((a, c, b, d), (b, c, d, a), (a, c, d, b), (a, d, b, c)):
        only3 = (t0 >= 0) & (t1 >= 0) & (t2 >= 0) & (other < 0)
        tris.append(np.stack([t0[only3], t1[only3], t2[only3]], 1))
    F = np.concatenate(tris, 0)
    kwargs = {}
    if normals is not None:
        kwargs["vertex_normals"] = np.nan_to_num(normals[valid]).astype(np.float64)
    if colors is not None:
        rgb = colors[valid]
        kwargs["vertex_colors"] = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)],
                                                 1)
    return trimesh.Trimesh(V, F, process=False, **kwargs)


def albedo_preview(albedo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """8-bit sRGB preview of a linear albedo map (99th percentile at 0.9; black where
    unknown)."""
    known = mask & np.all(np.isfinite(albedo), -1)
    a = albedo[known]                       # the sRGB curve on the known pixels only
    top = float(np.percentile(a.mean(-1), 99)) if known.any() else 1.0
    img = np.zeros(albedo.shape, np.uint8)
    img[known] = (np.clip(linear_to_srgb(np.clip(a / max(top, 1e-12) * 0.9, 0, 1)), 0, 1)
                  * 255).round().astype(np.uint8)
    return img


def shading_preview(normals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey Lambertian shading under a light above-left of the camera (8-bit RGB)."""
    light = np.array([-0.4, -0.5, -1.0])
    light /= np.linalg.norm(light)
    s = np.clip(np.nan_to_num(normals[mask]) @ light, 0, 1)
    img = np.zeros(mask.shape, np.uint8)
    img[mask] = (np.clip(linear_to_srgb(0.08 + 0.85 * s), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(img[..., None], 3, -1)


def write_reconstruction(out_dir: str | Path, rec: Reconstruction, model: MorphableModel
                         ) -> dict[str, Path]:
    """Write contract 2 of DESIGN.md under ``out_dir`` (each file written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "normals": save_npy(out / "normals.npy", rec.normals),
        "depth": save_npy(out / "depth.npy", rec.depth),
        "albedo": save_npy(out / "albedo.npy", rec.albedo),
        "mask": save_png(out / "mask.png", rec.mask.astype(np.uint8) * 255),
        "lights": save_json(out / "lights.json", {"lights": rec.lights.to_dict()}),
        "proxy": save_json(out / "proxy.json", rec.fit.proxy.to_dict()),
    }
    albedo_png = albedo_preview(rec.albedo, rec.mask)

    def write_mesh() -> tuple:
        t = time.perf_counter()
        mesh = height_field_mesh(rec.depth, rec.camera, rec.normals, albedo_png)
        return mesh, save_ply(out / "mesh.ply", mesh), time.perf_counter() - t

    # the mesh (numpy and trimesh) is built beside the previews' encoding
    with ThreadPoolExecutor(1) as pool:
        meshing = pool.submit(write_mesh)
        files["normals_png"] = save_png(out / "normals.png", normals_to_rgb(rec.normals))
        files["albedo_png"] = save_png(out / "albedo.png", albedo_png)
        files["shading_png"] = save_png(out / "shading.png",
                                        shading_preview(rec.normals, rec.mask))
        mesh, files["mesh"], t_mesh = meshing.result()
    report = dict(rec.report)
    report["timings"] = {**report["timings"], "write_mesh": t_mesh}
    report["mesh"] = {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
    report["model"] = model.name
    files["report"] = save_json(out / "report.json", report)
    return files
