"""``faceps fit``: the coarse proxy and the lights of a capture session.

ingest (the session reader) -> landmarks (session or detector) -> landmark fit of the
proxy -> near-light calibration from the proxy (unless the session gives its lights) ->
photometric refinement of the proxy with those lights -> (when calibrating) one more
calibration from the refined proxy, the joint refinement of proxy and lights, and a last
photometric refinement of the proxy with the joint refinement's lights. Outputs:
``proxy.json``, ``lights.json``, a preview of the proxy over the image,
``fit_report.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from faceps.capture import CalibrationConfig, Capture, calibrate_from_proxy
from faceps.core.atomic import save_json, save_png
from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FitError
from faceps.core.imageio import normals_to_rgb
from faceps.core.lights import PointLights
from faceps.core.rasterize import raster_maps
from faceps.core.viz import grid, label, tonemap
from faceps.model.morphable import MorphableModel
from faceps.optimize.photometric_proxy import (
    PhotometricConfig,
    refine_joint,
    refine_photometric,
)
from faceps.optimize.proxy import ProxyFit, ProxyFitConfig, fit_landmarks

log = logging.getLogger(__name__)

__all__ = ["FitConfig", "SessionFit", "fit_session", "proxy_maps", "write_fit"]


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit_session`.

    Attributes:
        landmarks: ``auto`` (session landmarks, else the detector), ``session`` or ``dlib``.
        calibrate: ``auto`` (only when the session has no lights), ``always`` or ``never``.
        photometric: run the photometric refinement.
        calibration_rounds: when calibrating, how many times calibration from the current
            proxy and photometric refinement with those lights alternate (>= 1).
        joint: when calibrating, finish with the joint refinement of proxy and lights
            (:func:`faceps.optimize.photometric_proxy.refine_joint`). On six 1600x1200
            sessions it moved the median calibration errors from 3.24 deg / 34.9 mm / 8.9 %
            to 2.81 deg / 30.9 mm / 7.5 % and the worst from 4.96 deg / 81.5 mm / 20.8 % to
            3.43 deg / 74.6 mm / 17.8 %, for about 1.1 s (bench/RESULTS.md).
        last_photometric: when calibrating with ``joint``, where the last round's
            photometric refinement runs: ``before`` the joint refinement, ``after`` it
            (with the joint refinement's lights) or ``skip`` (the joint refinement
            refines the proxy too). ``after`` (default) starts the joint refinement from
            the proxy refined with the first calibration's lights: on six 1600x1200
            sessions the worst light direction went from 3.43 to 2.99 deg, the medians
            from 2.81 deg / 30.9 mm / 7.5 % to 2.13 deg / 30.4 mm / 7.0 %, at the same cost
            (bench/RESULTS.md).
        landmark_fit, photometric_fit, calibration: the stages' options.
    """

    landmarks: str = "auto"
    calibrate: str = "auto"
    photometric: bool = True
    calibration_rounds: int = 2
    joint: bool = True
    last_photometric: str = "after"
    landmark_fit: ProxyFitConfig = field(default_factory=ProxyFitConfig)
    photometric_fit: PhotometricConfig = field(default_factory=PhotometricConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.last_photometric not in ("before", "after", "skip"):
            raise ConfigError(f"last_photometric must be before, after or skip; got "
                              f"{self.last_photometric!r}")
        if int(self.calibration_rounds) < 1:
            raise ConfigError(f"calibration_rounds must be >= 1; got {self.calibration_rounds!r}")


@dataclass
class SessionFit:
    """Proxy and lights of a session, with how they were obtained.

    Attributes:
        proxy: the fitted proxy.
        lights: the lights (given by the session or calibrated).
        lights_source: ``session`` or ``calibrated``.
        landmarks: (68, 2) landmarks used; landmark_source: where they came from.
        calibration: the calibration result (None when the session gave the lights).
        timings: seconds per stage.
    """

    proxy: ProxyFit
    lights: PointLights
    lights_source: str
    landmarks: np.ndarray
    landmark_source: str
    calibration: object | None
    timings: dict


def proxy_maps(model: MorphableModel, proxy: ProxyFit, capture: Capture,
               camera: Camera | None = None) -> dict:
    """Per-pixel maps of the proxy seen by the capture's camera, or by ``camera`` (see
    :func:`faceps.core.raycast.render_maps`): ``mask``, ``depth``, ``points``, ``normals``.

    Rendered by the z-buffer (:func:`faceps.core.rasterize.raster_maps`), which samples the
    same pixel centres as ray casting and, for a proxy of some thousand triangles, needs
    no BVH: 0.4 s instead of 0.75-1.0 s at 1600x1200 here, the same masks, depth within
    3e-6 mm and normals within 1e-5 deg (two sessions; a few pixels on shared edges take
    the neighbouring triangle)."""
    maps = raster_maps(proxy.geometry(model), model.triangles,
                       capture.camera if camera is None else camera)
    maps["mask"] = maps["mask"] & ~maps["backface"]
    return maps


#: the calibration samples a few thousand pixels (``CalibrationConfig.n_samples``), so it
#: reads the proxy and the images on every k-th pixel of every k-th row, k chosen to keep
#: about this many pixels in the frame (1600x1200: k = 2, a quarter of the ray casting)
_CALIBRATION_FRAME_PIXELS = 480_000


def calibration_stride(width: int, height: int) -> int:
    """Pixel stride of the calibration's proxy maps for a ``width`` x ``height`` capture."""
    return max(1, int(np.sqrt(width * height / _CALIBRATION_FRAME_PIXELS)))


def fit_session(capture: Capture, model: MorphableModel, config: FitConfig | None = None
                ) -> SessionFit:
    """Fit the proxy (and calibrate the lights when needed) for one capture."""
    config = config or FitConfig()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if config.landmarks not in ("auto", "session", "dlib"):
        raise ConfigError(f"unknown landmark source '{config.landmarks}'")
    if config.landmarks == "session" or (config.landmarks == "auto"
                                         and capture.landmarks is not None):
        if capture.landmarks is None:
            raise FitError(f"{capture.root}: the session has no landmarks")
        points, source = capture.landmarks, "session"
    else:
        from faceps.capture import get_landmarks

        lmr = get_landmarks(capture, "dlib")
        points, source = lmr.points, lmr.source
    timings["landmarks"] = time.perf_counter() - t
    t = time.perf_counter()
    lm_config = config.landmark_fit
    if source != "session" and not lm_config.contour:
        # a detector's jaw points lie on the silhouette
        lm_config = replace(lm_config, contour=True)
    fit = fit_landmarks(model, points, capture.camera, lm_config)
    timings["landmark_fit"] = time.perf_counter() - t
    calibrate = (config.calibrate == "always"
                 or (config.calibrate == "auto" and capture.lights is None))
    lights, calib = capture.lights, None
    rounds = int(config.calibration_rounds) if calibrate else 1
    for r in range(rounds):
        if calibrate:
            t = time.perf_counter()
            k = calibration_stride(capture.width, capture.height)
            maps = proxy_maps(model, fit, capture, capture.camera.strided(k))
            valid = maps["mask"] & np.isin(maps["triangle"], np.nonzero(
                model.region[model.triangles].all(1))[0])
            calib = calibrate_from_proxy(capture.images[:, ::k, ::k], maps["points"],
                                         maps["normals"], valid,
                                         saturated=(capture.saturated
                                                    if capture.saturated_channels is None
                                                    else capture.saturated_channels
                                                    )[:, ::k, ::k],
                                         names=capture.light_names,
                                         init=lights if r > 0 else None,
                                         config=config.calibration)
            lights = calib.lights
            timings[f"calibration_{r}"] = time.perf_counter() - t
        skip = (calibrate and config.joint and config.last_photometric != "before"
                and r == rounds - 1)
        if config.photometric and lights is not None and not skip:
            t = time.perf_counter()
            fit = refine_photometric(model, capture, fit, lights, config.photometric_fit,
                                     landmarks=points)
            timings[f"photometric_{r}"] = time.perf_counter() - t
    if lights is None:
        raise FitError(f"{capture.root}: the session has no lights and calibration is off")
    if calibrate and config.joint:
        t = time.perf_counter()
        fit, lights = refine_joint(model, capture, fit, lights, config.photometric_fit,
                                   landmarks=points)
        timings["joint"] = time.perf_counter() - t
        if config.photometric and config.last_photometric == "after":
            t = time.perf_counter()
            fit = refine_photometric(model, capture, fit, lights, config.photometric_fit,
                                     landmarks=points)
            timings["photometric_final"] = time.perf_counter() - t
    return SessionFit(fit, lights, "calibrated" if calibrate else "session", points, source,
                      calib, timings)


def write_fit(out_dir: str | Path, result: SessionFit, model: MorphableModel,
              capture: Capture) -> dict[str, Path]:
    """Write ``proxy.json``, ``lights.json``, ``proxy_preview.png`` and ``fit_report.json``."""
    import cv2

    out = Path(out_dir)
    files = {"proxy": save_json(out / "proxy.json", result.proxy.to_dict()),
             "lights": save_json(out / "lights.json", {"lights": result.lights.to_dict()})}
    maps = proxy_maps(model, result.proxy, capture)
    base = tonemap(capture.image_sum())
    over = base.copy()
    nrm = normals_to_rgb(maps["normals"])
    m = maps["mask"]
    over[m] = (0.45 * base[m] + 0.55 * nrm[m]).astype(np.uint8)
    fitted = capture.camera.project(result.proxy.geometry(model)[
        np.maximum(model.landmarks68, 0)])
    for pts, colour in ((result.landmarks, (40, 220, 40)), (fitted, (230, 40, 40))):
        for u, v in pts[np.all(np.isfinite(pts), axis=1)]:
            cv2.circle(over, (int(round(u)), int(round(v))), max(2, base.shape[0] // 300),
                       colour, -1, cv2.LINE_AA)
    H = min(480, base.shape[0])
    files["preview"] = save_png(out / "proxy_preview.png", grid(
        [[label(base, "input (sum of lights)"),
          label(over, "proxy; landmarks: green given, red fitted")]], H))
    calib = result.calibration
    report = {"landmark_source": result.landmark_source, "lights_source": result.lights_source,
              "landmark_rmse_px": result.proxy.landmark_rmse_px, "timings": result.timings,
              "history": result.proxy.history}
    if calib is not None:
        report["calibration"] = {k: v for k, v in asdict(calib).items() if k != "lights"}
    files["report"] = save_json(out / "fit_report.json", report)
    return files
