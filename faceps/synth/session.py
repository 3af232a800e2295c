"""Synthetic capture sessions with ground truth (DESIGN contracts 1 and 3).

``synth_session`` renders a random face of a morphable model under near point lights at
capture resolution and writes a capture session that the regular reader ingests, plus a
``ground_truth/`` folder: ``normals.npy``, ``depth.npy``, ``albedo.npy``, ``mask.png``,
``lights.json``, ``params.json``, ``landmarks.json`` (contract 3), and ``proxy_normals.npy``,
``proxy_depth.npy``, ``face_mask.png`` (the coarse model surface and the face region).

The folder is assembled under a temporary name and renamed when complete, so a session
folder under its final name is always whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from faceps import __version__
from faceps.capture.session import write_session
from faceps.core.atomic import save_json, save_npy, save_png
from faceps.core.errors import ConfigError
from faceps.model.morphable import MorphableModel
from faceps.synth.faces import (
    FaceConfig,
    LightRig,
    RenderedFace,
    default_camera,
    render_face,
    sample_face,
)
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.wild import WildConfig

log = logging.getLogger(__name__)

__all__ = ["SessionSynthConfig", "SynthSession", "synth_session", "render_session"]

#: threads writing a session's files (images and ground truth side by side)
WRITE_THREADS = 2


@dataclass(frozen=True)
class SessionSynthConfig:
    """Options of a synthetic capture session.

    Attributes:
        size: (W, H) capture resolution.
        n_lights: number of lights (3: left, front, right).
        fov_x_deg: horizontal field of view of the camera.
        encoding, bit_depth: how images are stored (8-bit sRGB or 16-bit linear).
        landmark_noise_px: std of Gaussian noise added to the written landmarks.
        include_lights: write the calibrated lights into ``session.json`` (they are always
            in ``ground_truth/lights.json``).
        include_landmarks: write the landmarks into the session.
        face: ranges of the random face, pose, detail and lights.
        shading, sensor: image formation.
        wild: render in the wild instead (:mod:`faceps.synth.wild`): ``n_lights`` images
            named ``wild0``, ``wild1``, ..., each under its own random environment over a
            procedural background, and no lights in ``session.json``
            (``ground_truth/lights.json`` holds the scene instead).
    """

    size: tuple[int, int] = (1600, 1200)
    n_lights: int = 3
    fov_x_deg: float = 34.0
    encoding: str = "srgb"
    bit_depth: int = 8
    landmark_noise_px: float = 0.0
    include_lights: bool = True
    include_landmarks: bool = True
    face: FaceConfig = field(default_factory=FaceConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    sensor: SensorConfig = field(default_factory=SensorConfig)
    wild: WildConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.wild, dict):
            object.__setattr__(self, "wild", WildConfig(**self.wild))
        if self.size[0] < 32 or self.size[1] < 32:
            raise ConfigError(f"size must be at least 32x32; got {self.size}")
        if self.n_lights < 1:
            raise ConfigError("n_lights must be >= 1")
        if self.landmark_noise_px < 0:
            raise ConfigError("landmark_noise_px must be >= 0")
        if self.face.rig.positions is None and len(self.face.rig.names) != self.n_lights:
            object.__setattr__(self, "face", FaceConfig(**{
                **{k: getattr(self.face, k) for k in self.face.__dataclass_fields__},
                "rig": LightRig.spread(self.n_lights)}))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SynthSession:
    """What :func:`synth_session` wrote and measured.

    Attributes:
        path: the session folder.
        rendered: the rendered face with its ground truth (in memory).
        landmarks: (68, 2) landmarks written to the session (with noise).
        timings: seconds per stage (render stages, writing, total).
    """

    path: Path
    rendered: RenderedFace
    landmarks: np.ndarray
    timings: dict


def render_session(model: MorphableModel, seed: int, config: SessionSynthConfig | None = None
                   ) -> tuple[RenderedFace, dict, np.ndarray]:
    """Render one random face for a session without writing anything.

    Returns:
        (rendered face, params dict for ``params.json``, noisy landmarks (68, 2)).
    """
    config = config or SessionSynthConfig()
    rng = np.random.default_rng(seed)
    camera = default_camera(config.size, config.fov_x_deg)
    sample = sample_face(rng, model, camera, config.face)
    rendered = render_face(model, sample, camera, shading=config.shading, sensor=config.sensor,
                           rng=rng, wild=config.wild, n_wild=config.n_lights)
    lm = rendered.landmarks.copy()
    if config.landmark_noise_px > 0:
        lm = lm + rng.normal(0, config.landmark_noise_px, lm.shape)
    params = {
        "model": model.name,
        "seed": int(seed),
        **sample.to_dict(),
        "lights_after_exposure": rendered.lights.to_dict(),
        "exposure": rendered.exposure,
        "camera": camera.to_dict(),
        "generator": {"faceps": __version__, "config": config.to_dict()},
    }
    return rendered, params, lm


def _mask_png(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def synth_session(out_dir: str | os.PathLike, seed: int = 0, model: MorphableModel | None = None,
                  config: SessionSynthConfig | None = None, *, overwrite: bool = False
                  ) -> SynthSession:
    """Render a random face and write a capture session with its ground truth.

    Args:
        out_dir: the session folder to create.
        seed: random seed (the same seed gives the same session).
        model: the morphable model (default: the built-in model).
        config: session options.
        overwrite: replace an existing folder (only after the new one is complete).

    Returns:
        :class:`SynthSession`.

    Raises:
        ConfigError: when ``out_dir`` exists and is not empty (without ``overwrite``).
    """
    from faceps.model import load_model

    t_start = time.perf_counter()
    config = config or SessionSynthConfig()
    model = load_model(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty (use --force to replace it)")
    rendered, params, lm = render_session(model, seed, config)
    if config.include_landmarks and not np.all(np.isfinite(lm)):
        log.warning("model %s lacks some of the 68 landmarks: the session gets none",
                    model.name)
    t_rendered = time.perf_counter()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        camera = default_camera(config.size, config.fov_x_deg)
        names = (rendered.lights.names if rendered.wild is None
                 else [f"wild{j}" for j in range(rendered.images.shape[0])])
        gt = tmp / "ground_truth"
        files = [(save_npy, gt / "normals.npy", rendered.normals),
                 (save_npy, gt / "depth.npy", rendered.depth),
                 (save_npy, gt / "albedo.npy", rendered.albedo),
                 (save_png, gt / "mask.png", _mask_png(rendered.mask)),
                 (save_png, gt / "face_mask.png", _mask_png(rendered.face_mask)),
                 (save_npy, gt / "proxy_normals.npy", rendered.proxy_normals),
                 (save_npy, gt / "proxy_depth.npy", rendered.proxy_depth),
                 (save_json, gt / "lights.json",
                  {"lights": rendered.lights.to_dict()} if rendered.wild is None
                  else {"lights": rendered.lights.to_dict(), "wild": rendered.wild.to_dict()}),
                 (save_json, gt / "params.json", params),
                 (save_json, gt / "landmarks.json", rendered.landmarks.tolist())]
        # the images (sRGB encoding, PNG) and the ground truth are written side by side:
        # encoding, compression and file writes release the GIL
        with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
            jobs = [pool.submit(
                write_session, tmp, rendered.images, camera, light_names=names,
                encoding=config.encoding, bit_depth=config.bit_depth,
                lights=rendered.lights if config.include_lights and rendered.wild is None
                else None,
                landmarks=lm if config.include_landmarks and np.all(np.isfinite(lm)) else None,
                subject=f"synthetic-{seed:06d}", expression="random")]
            jobs += [pool.submit(save, path, value) for save, path, value in files]
            for job in jobs:
                job.result()
        if out.exists():
            if overwrite:
                shutil.rmtree(out)
            else:
                out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t_end = time.perf_counter()
    timings = {**rendered.timings, "render_total": t_rendered - t_start,
               "write": t_end - t_rendered, "total": t_end - t_start}
    log.info("synthetic session %s written in %.2f s", out, timings["total"])
    return SynthSession(out, rendered, lm, timings)
