"""Real-capture datasets: every capture session under a folder, reconstructed, as contract-4
samples of source ``real``.

Usage::

    faceps build-dataset ROOT --out real.h5 [--workers W] [--size 256] [--max-size PX]
        [--model M] [--lights 3] [--shard-size 20] [--no-photometric] [--passes 1]
        [--force] [--no-progress] [--executor local|ray] [--ray-address ADDR]

reconstructs every session under ROOT and writes ``real.h5`` (an index over shards
``real-00000.h5``, ...), ``real.index.json`` and ``real.failures.jsonl``; run the same
command again to resume (finished sessions are skipped, failed ones are tried again).
Exit status: 0 when every session has a sample, 1 when some failed (they are listed in
the failure log; the build still completes), 2 on a bad invocation (one line on stderr).
From Python: ``build_real_dataset(root, out, config=ReconstructConfig(...), workers=W)``.

``faceps reconstruct-batch ROOT --out OUTDIR [--workers W] [--executor local|ray]``
(:func:`reconstruct_sessions`) reconstructs the same sessions into contract-2 folders
``OUTDIR/<session path>/`` instead, skipping those already done, with the failure log
``OUTDIR/failures.jsonl`` and the same exit codes.

ROOT holds capture sessions (contract 1), typically as ``ROOT/SUBJECT/EXPRESSION/`` folders.
Every folder under ROOT (at any depth, hidden folders skipped) that holds a
``session.json`` is a session; it is keyed by its path relative to ROOT (POSIX form). The
**subject id** of a sample is the first component of that path (``s001`` for
``s001/smile``), so sessions of one person must sit under one top-level folder; a session
in ROOT itself takes the ``subject`` of its ``session.json``, else ROOT's folder name.

Each session is ingested (:func:`faceps.capture.load_session`) and reconstructed
(:func:`faceps.optimize.reconstruct.reconstruct`, options of ``ReconstructConfig``); the
sample is a square crop around the face with the synthetic builder's convention
(:func:`faceps.datasets.build.face_crop_box` around the fitted proxy's projected landmarks,
side ``crop_scale`` times their box, no jitter; K of the crop is
``camera.cropped(x0, y0, side, side).scaled((size, size))``), so real and synthetic
samples look alike. The crop of the capture is resampled to ``size`` x ``size`` (area
averaging when shrinking, bilinear when enlarging; parts of the crop outside the frame are
zero images and unknown maps). What each contract-4 dataset holds for a real sample:

==================  ==========================================================================
``images``          the capture's linear, ambient-free, undistorted images, cropped
``lights``          the lights the reconstruction used (the session's, or calibrated); rows
                    past the session's image count are padding (valid flag 0, zero images)
``normals``         the reconstruction's normals (the photometric detail) as ground truth
``albedo``          its albedo; ``depth`` its height-field depth (mm)
``mask``            1 where the reconstruction has values after resampling (at least half of
                    the pixel's footprint reconstructed): exactly where ``normals``,
                    ``albedo`` and ``depth`` are finite
``face_mask``       (extra) the same as ``mask``: the reconstructed region is the face region
``proxy_normals``   the fitted proxy rasterised with the crop's camera (the synthetic
                    builder's rasteriser); NaN where the proxy is not seen
``K``               intrinsics of the crop
``landmarks``       the 68 landmarks the proxy was fitted to (the session's file or the
                    detector), in crop pixels
``params/*``        the fitted proxy: identity and expression coefficients, pose; albedo
                    coefficients as the proxy fit left them (zeros when not fitted)
``subject``         see above; ``source`` is ``real``
==================  ==========================================================================

The synthetic extras ``shadow``, ``exposure`` and ``sample_index`` have no meaning for a
real capture and are not written (contract 4 makes them optional). When the albedo is far
from unit scale (the session's lights in other units), albedo and light intensities are
rescaled together so the median albedo is 0.5 (eq. 1 still holds with the stored lights
and images; float16 keeps its precision).

Layout of a build into ``out = DIR/NAME.h5`` (as :mod:`faceps.datasets.build`):

- ``DIR/NAME-00000.h5``, ...: shards of up to ``shard_size`` samples in the order the
  sessions were processed, each a complete contract-4 file written under a temporary name
  and renamed when complete; root attributes ``config_hash``, ``shard_index`` and
  ``sessions`` (JSON list: the session key of every row);
- ``DIR/NAME.h5``: the index of virtual datasets over all shards, written at the end of a
  run (not written when no session succeeded);
- ``DIR/NAME.index.json``: shards, their rows and sessions, the configuration, ROOT;
- ``DIR/NAME.failures.jsonl``: one JSON object per line for every session that failed in
  the latest run: ``session`` (key), ``path``, ``stage`` (``load``, ``reconstruct``,
  ``sample`` or ``worker``), ``error`` (exception type), ``message``, ``seconds``, ``time``.
  Rewritten (atomically) after each failure and at the end of a run.

Resumption: a run skips every session that a complete shard of the same configuration
already holds and processes the rest, so a killed build loses at most the samples of the
shard it was filling. Failed sessions are not written, so a run tries them again (fix a
session and run the same command). The configuration hash covers the output size, lights
per sample, crop scale, compression, the reconstruction options, the model and the faceps
version (not ROOT, the shard size or the worker count): a run with other options over an
existing build raises :class:`ConfigError` naming what differs, unless ``force`` (then the
old files are removed and everything is rebuilt). Samples of sessions that have since
disappeared from ROOT stay in the dataset.

A session that cannot be read, has no face, has more images than ``n_lights``, or makes a
solver fail never stops the build: any exception of one session (the
:class:`~faceps.core.errors.FacepsError` family and others) is logged with it and the
build goes on. With ``workers`` > 1, sessions run in spawned processes with one BLAS /
OpenMP / torch thread each, or as Ray tasks with ``executor="ray"`` (a local Ray instance,
or a cluster whose nodes see ROOT at the same path; see :mod:`faceps.core.executor`);
results are written in session order, so the data do not depend on the worker count (with
Ray, one native thread per task can change the last bit of a few values). A worker
process that dies (e.g. out of memory) is replaced; the session it was waiting for is
logged as failed (stage ``worker``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from faceps.core.errors import ConfigError, DatasetError, FacepsError
from faceps.core.executor import add_arguments as add_executor_arguments
from faceps.core.executor import check_executor

if TYPE_CHECKING:
    import argparse

    from faceps.capture import Capture
    from faceps.model.morphable import MorphableModel
    from faceps.optimize.reconstruct import ReconstructConfig, Reconstruction

log = logging.getLogger(__name__)

__all__ = [
    "SOURCE",
    "DEFAULT_SHARD_SIZE",
    "FAILURES_SUFFIX",
    "EXTRAS",
    "SessionFailure",
    "RealBuildResult",
    "discover_sessions",
    "subject_of",
    "sample_from_reconstruction",
    "build_real_dataset",
    "failures_path",
    "add_arguments",
    "run_from_args",
    "BatchResult",
    "reconstruct_sessions",
    "add_batch_arguments",
    "run_batch_from_args",
]

SOURCE = "real"
#: samples per shard by default: a killed build loses at most the reconstructions of one
#: unfinished shard
DEFAULT_SHARD_SIZE = 20
#: the failure log is ``DIR/NAME`` + this suffix for ``out = DIR/NAME.h5``
FAILURES_SUFFIX = ".failures.jsonl"
#: the optional contract-4 datasets a real build writes
EXTRAS = ("face_mask",)
#: sessions each worker may have queued ahead of the writer
AHEAD_PER_WORKER = 2
#: the albedo is rescaled (with the light intensities) when its median leaves this range
ALBEDO_RANGE = (1e-3, 1e2)
#: median albedo after such a rescale
ALBEDO_TARGET = 0.5
SESSION_FILE = "session.json"
#: exit codes of :func:`run_from_args`
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------ results
@dataclass
class SessionFailure:
    """A session that produced no sample.

    Attributes:
        session: its key (path relative to ROOT, POSIX form; ``.`` for ROOT itself).
        path: the session folder.
        stage: ``load``, ``reconstruct``, ``sample`` or ``worker``.
        error: the exception type name; message: its text.
        seconds: time spent on the session.
    """

    session: str
    path: str
    stage: str
    error: str
    message: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        from faceps.datasets.schema import now_iso

        return {**asdict(self), "time": now_iso()}


@dataclass
class RealBuildResult:
    """What :func:`build_real_dataset` found, wrote and measured.

    Attributes:
        path: the index file, or None when no sample exists (every session failed).
        index_json: ``NAME.index.json`` (None with ``path``).
        failures_path: the failure log of this run.
        shards: the shard files, in row order.
        n: samples in the dataset (all shards).
        sessions: sessions found under ROOT.
        skipped: sessions already in complete shards (not processed again).
        written: samples written by this run.
        reconstructed: reconstructions this run started.
        failures: the sessions of this run that failed.
        config_hash: hash of the configuration (stored in every shard).
        seconds: wall time of the run.
        timings: seconds summed over this run's sessions: ``load``, ``reconstruct``,
            ``sample``, ``compress`` (in whichever process ran them), ``write`` and
            ``index`` (main process).
    """

    path: Path | None
    index_json: Path | None
    failures_path: Path
    shards: list[Path]
    n: int
    sessions: int
    skipped: int
    written: int
    reconstructed: int
    failures: list[SessionFailure]
    config_hash: str
    seconds: float
    timings: dict = field(default_factory=dict)

    @property
    def sessions_per_second(self) -> float:
        """Sessions processed (written or failed) per second of wall time."""
        done = self.written + len(self.failures)
        return done / self.seconds if done and self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for people."""
        where = self.path if self.path is not None else "no dataset written"
        text = (f"{where}: {self.n} samples in {len(self.shards)} shards; {self.sessions} "
                f"sessions: {self.skipped} already built, {self.written} written, "
                f"{len(self.failures)} failed in {self.seconds:.1f} s")
        if self.reconstructed:
            text += f" ({self.sessions_per_second:.3f} sessions/s)"
        if self.failures:
            text += f"; failures: {self.failures_path}"
        return text


# ------------------------------------------------------------------ discovery
def discover_sessions(root: str | os.PathLike) -> list[str]:
    """The session keys under ``root``: every folder holding a ``session.json``, at any
    depth (ROOT itself included; folders whose name starts with ``.`` are skipped, as are
    the temporaries of the atomic writers), as POSIX paths relative to ``root`` (``.`` for
    ROOT itself), sorted.

    Raises:
        ConfigError: when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder of capture sessions")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if SESSION_FILE in files:
            found.append(Path(folder).relative_to(root).as_posix())
    return sorted(found)


def _require_sessions(root: Path) -> list[str]:
    """:func:`discover_sessions`, refusing a ROOT without sessions before any output."""
    keys = discover_sessions(root)
    if not keys:
        raise ConfigError(f"{root}: no capture sessions (no {SESSION_FILE} in the folder or "
                          f"below it)")
    return keys


def subject_of(key: str, root: str | os.PathLike, capture: Capture | None = None) -> str:
    """The subject id of the session ``key`` under ``root``: the first component of the
    key; for ROOT itself (``.``) the capture's ``subject`` field, else ROOT's name."""
    if key in ("", "."):
        if capture is not None and capture.subject:
            return str(capture.subject)
        return Path(root).resolve().name
    return key.split("/", 1)[0]


def failures_path(out: str | os.PathLike) -> Path:
    """The failure log of a build into ``out`` (``DIR/NAME.failures.jsonl``)."""
    out = Path(out)
    return out.parent / f"{out.stem}{FAILURES_SUFFIX}"


# ------------------------------------------------------------------ one sample
def _cut(values: np.ndarray, box: tuple[int, int, int], fill: float) -> np.ndarray:
    """``values[y0:y0+side, x0:x0+side]`` with ``fill`` where the box leaves the array."""
    x0, y0, side = box
    H, W = values.shape[:2]
    out = np.full((side, side) + values.shape[2:], fill, values.dtype)
    xa, xb, ya, yb = max(x0, 0), min(x0 + side, W), max(y0, 0), min(y0 + side, H)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = values[ya:yb, xa:xb]
    return out


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    """Square float32 map to ``size`` x ``size``: area averaging when shrinking, bilinear
    when enlarging (both with pixel centres at integer coordinates, as
    :meth:`Camera.scaled`)."""
    import cv2

    side = values.shape[0]
    v = np.ascontiguousarray(values, np.float32)
    if side == size:
        return v.copy()
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    out = cv2.resize(v, (size, size), interpolation=interp)
    return out.reshape((size, size) + values.shape[2:])


def _crop_image(image: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    return _resize(_cut(np.asarray(image, np.float32), box, 0.0), size)


def _crop_maps(valid: np.ndarray, maps: Sequence[np.ndarray], box: tuple[int, int, int],
               size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resample maps known on ``valid`` from their known pixels only: returns the pixels
    whose footprint is at least half known, and the maps (normalised averages of known
    values; arbitrary elsewhere)."""
    weight = _resize(_cut(valid.astype(np.float32), box, 0.0), size)
    known = weight >= 0.5
    out = []
    for m in maps:
        vmask = valid if m.ndim == 2 else valid[..., None]
        summed = _resize(_cut(np.where(vmask, m, 0.0).astype(np.float32), box, 0.0), size)
        w = np.maximum(weight, 1e-6)
        out.append(summed / (w if m.ndim == 2 else w[..., None]))
    return known, out


def _landmarks_in_crop(rec: Reconstruction, capture: Capture, box: tuple[int, int, int],
                       size: int) -> np.ndarray:
    """The fit's landmarks (at the working size) in crop pixels; NaN where unknown."""
    lm = np.full((68, 2), np.nan, np.float64)
    pts = np.asarray(rec.fit.landmarks, np.float64).reshape(-1, 2)[:68]
    lm[: pts.shape[0]] = pts
    w, h = rec.report.get("working_size", [capture.width, capture.height])
    lm = (lm + 0.5) * np.array([capture.width / w, capture.height / h]) - 0.5
    x0, y0, side = box
    return ((lm - np.array([x0, y0]) + 0.5) * (size / side) - 0.5).astype(np.float32)


def _vector(values: Any, k: int) -> np.ndarray:
    out = np.zeros(k, np.float32)
    v = np.asarray(values, np.float32).reshape(-1)[:k]
    out[: v.size] = v
    return out


def sample_from_reconstruction(capture: Capture, rec: Reconstruction, model: MorphableModel, *,
                               size: int = 256, n_lights: int = 3,
                               crop_scale: float | None = None,
                               subject: str = "") -> dict[str, Any]:
    """One contract-4 sample (source ``real``) from a capture and its reconstruction.

    Args:
        capture: the ingested session (the images are cropped from it).
        rec: its reconstruction (same resolution as the capture).
        model: the morphable model of the proxy.
        size: crop resolution (square).
        n_lights: L, lights per sample (the capture must have at most L images).
        crop_scale: crop side / larger side of the landmark box (default: the synthetic
            builder's).
        subject: the subject id.

    Returns:
        arrays by dataset name under ``samples/`` in the storage dtypes, e.g. ``images``
        (L, size, size, 3) float16, ``normals`` (size, size, 3) float16, ``K`` (3, 3)
        float32, ``subject`` str; plus the extra ``face_mask``.

    Raises:
        ConfigError: when the capture has more images than ``n_lights``.
    """
    from faceps.datasets.build import DEFAULT_CROP_SCALE, _frame_points, face_crop_box
    from faceps.synth.faces import rasterize_proxy

    L = int(n_lights)
    if capture.n_images > L:
        raise ConfigError(f"{capture.root}: the session has {capture.n_images} images; the "
                          f"dataset holds {L} lights per sample")
    proxy = rec.fit.proxy
    coef = proxy.coefficients
    geometry = model.geometry(coef.id, coef.exp)
    pts, region_scale = _frame_points(model, geometry, proxy, rec.camera)
    scale = DEFAULT_CROP_SCALE if crop_scale is None else float(crop_scale)
    box = face_crop_box(pts, scale * region_scale)
    x0, y0, side = box
    camera = rec.camera.cropped(x0, y0, side, side).scaled((size, size))

    images = np.zeros((L, size, size, 3), np.float32)
    for j in range(capture.n_images):
        images[j] = _crop_image(capture.images[j], box, size)
    lights = np.zeros((L, 11), np.float32)
    rows = rec.lights.to_array()
    lights[: rows.shape[0]] = rows

    valid = (rec.mask & np.all(np.isfinite(rec.normals), -1) & np.isfinite(rec.depth)
             & np.all(np.isfinite(rec.albedo), -1))
    known, (normals, depth, albedo) = _crop_maps(valid, (rec.normals, rec.depth, rec.albedo),
                                                 box, size)
    length = np.linalg.norm(normals, axis=-1)
    normals = normals / np.maximum(length, 1e-12)[..., None]
    mask = (known & (length > 0.5) & np.isfinite(depth) & np.all(np.isfinite(normals), -1)
            & np.all(np.isfinite(albedo), -1))
    if mask.any():
        median = float(np.median(albedo[mask]))
        if median > 0 and not ALBEDO_RANGE[0] <= median <= ALBEDO_RANGE[1]:
            s = ALBEDO_TARGET / median
            albedo = albedo * s
            lights[: rows.shape[0], 3:6] /= s
            log.info("%s: albedo rescaled by %.3g (light intensities by its inverse)",
                     capture.root, s)
    nan = np.float32(np.nan)
    normals = np.where(mask[..., None], normals, nan)
    albedo = np.where(mask[..., None], albedo, nan)
    depth = np.where(mask, depth, nan)

    raster = rasterize_proxy(proxy.geometry(model), model.triangles, camera)
    proxy_normals = np.full((size * size, 3), np.nan, np.float32)
    proxy_normals[raster.pixels] = raster.normals
    proxy_normals = proxy_normals.reshape(size, size, 3)

    pose = np.concatenate([np.asarray(proxy.angles, np.float64).reshape(3),
                           np.asarray(proxy.translation, np.float64).reshape(3)])
    return {
        "images": images.astype(np.float16),
        "lights": lights,
        "normals": normals.astype(np.float16),
        "proxy_normals": proxy_normals.astype(np.float16),
        "mask": mask.astype(np.uint8),
        "albedo": albedo.astype(np.float16),
        "depth": depth.astype(np.float32),
        "K": camera.K.astype(np.float32),
        "landmarks": _landmarks_in_crop(rec, capture, box, size),
        "params/id": _vector(coef.id, model.n_id),
        "params/exp": _vector(coef.exp, model.n_exp),
        "params/albedo": _vector(coef.albedo, model.n_albedo),
        "params/pose": pose.astype(np.float32),
        "subject": str(subject),
        "source": SOURCE,
        "face_mask": mask.astype(np.uint8),
    }


# ------------------------------------------------------------------ one session
@dataclass(frozen=True)
class _Job:
    """What every session of a build shares (sent to the workers once)."""

    root: str
    size: int
    n_lights: int
    crop_scale: float
    compression: int
    config: Any  # ReconstructConfig (a plain dataclass)


@dataclass
class _Outcome:
    session: str
    packed: dict[str, Any] | None = None
    failure: SessionFailure | None = None
    reconstructed: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def _process(model: MorphableModel, job: _Job, key: str) -> _Outcome:
    """Load, reconstruct, crop and pack one session; any exception becomes a failure."""
    from faceps.capture import load_session
    from faceps.datasets.build import _pack

    # looked up at each call (the module attribute), so the function can be wrapped
    reconstruct_module = importlib.import_module("faceps.optimize.reconstruct")
    t_start = time.perf_counter()
    folder = Path(job.root) / key
    out = _Outcome(key)
    stage = "load"
    try:
        t = time.perf_counter()
        capture = load_session(folder)
        if capture.n_images > job.n_lights:
            raise ConfigError(f"{folder}: the session has {capture.n_images} images; the "
                              f"dataset holds {job.n_lights} lights per sample (--lights)")
        out.timings["load"] = time.perf_counter() - t
        stage = "reconstruct"
        t = time.perf_counter()
        out.reconstructed = True
        rec = reconstruct_module.reconstruct(capture, model, job.config)
        out.timings["reconstruct"] = time.perf_counter() - t
        stage = "sample"
        t = time.perf_counter()
        arrays = sample_from_reconstruction(
            capture, rec, model, size=job.size, n_lights=job.n_lights,
            crop_scale=job.crop_scale, subject=subject_of(key, job.root, capture))
        out.timings["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        out.packed = _pack(arrays, job.compression)
        out.timings["compress"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - one session must never stop the build
        if not isinstance(exc, FacepsError):
            log.debug("session %s failed", key, exc_info=True)
        out.packed = None
        out.failure = SessionFailure(key, str(folder), stage, type(exc).__name__,
                                     str(exc).strip() or repr(exc),
                                     time.perf_counter() - t_start)
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(model_spec: Any, job: _Job) -> None:
    """Worker initializer: one torch thread, then the synthetic builder's initializer (ray
    caster and rasteriser warmed up, the model loaded once)."""
    import torch

    from faceps.datasets import build

    torch.set_num_threads(1)
    build._init_worker(model_spec, job)
    _WORKER["model"] = build._WORKER["model"]
    _WORKER["job"] = job


def _process_in_worker(key: str) -> _Outcome:
    return _process(_WORKER["model"], _WORKER["job"], key)


def _worker_failure(key: str, root: str, exc: BaseException) -> _Outcome:
    return _Outcome(key, failure=SessionFailure(
        key, str(Path(root) / key), "worker", type(exc).__name__,
        f"a worker process stopped unexpectedly while this session was pending ({exc}); "
        f"it may have been another session of the same worker"))


@contextlib.contextmanager
def _runner(model: MorphableModel, model_spec: Any, job: _Job, workers: int,
            executor: str = "local", address: str | None = None) -> Iterator[Any]:
    """Yield a function mapping session keys to an in-order iterator of outcomes.

    The sessions run on :func:`faceps.core.executor.make_executor` (``executor``,
    ``workers``, ``address``; one BLAS/OpenMP/torch thread per worker), ahead of the
    consumer by at most :data:`AHEAD_PER_WORKER` sessions per worker. A worker that dies
    is replaced; the session it was running is reported failed (stage ``worker``) and
    the others are submitted again.
    """
    from faceps.core.executor import TaskFailure, make_executor

    with make_executor(executor, workers, address=address, initializer=_init_worker,
                       initargs=(model_spec, job), threads=1) as ex:
        if ex.in_process:
            def fn(key: str) -> _Outcome:
                return _process(model, job, key)
        else:
            fn = _process_in_worker

        def run(keys: Sequence[str]) -> Iterator[_Outcome]:
            for result in ex.map(fn, keys, ahead=AHEAD_PER_WORKER * ex.workers,
                                 return_failures=True):
                if isinstance(result, TaskFailure):
                    log.warning("%s failed in its worker (%s)", result.item, result.error)
                    yield _worker_failure(result.item, job.root, result.error)
                else:
                    yield result

        yield run


# ------------------------------------------------------------------ configuration
def _generator(model: MorphableModel, size: int, n_lights: int, crop_scale: float,
               compression: int, config: ReconstructConfig) -> dict:
    """The configuration that decides the data, as plain JSON values (hashed)."""
    from faceps import __version__
    from faceps.datasets.build import _model_fingerprint

    gen = {
        "builder": "faceps.datasets.real",
        "faceps": __version__,
        "source": SOURCE,
        "size": int(size),
        "n_lights": int(n_lights),
        "crop_scale": float(crop_scale),
        "compression": int(compression),
        "model": {"name": model.name, "fingerprint": _model_fingerprint(model),
                  "n_vertices": model.n_vertices, "k_id": model.n_id, "k_exp": model.n_exp,
                  "k_albedo": model.n_albedo},
        "reconstruct": asdict(config),
    }
    return json.loads(json.dumps(gen))


def _shard_path(out: Path, index: int) -> Path:
    return out.parent / f"{out.stem}-{index:05d}.h5"


def _read_sessions(path: Path) -> list[str] | None:
    """The ``sessions`` attribute of a shard (None when absent or unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("sessions")
        raw = raw.decode() if isinstance(raw, bytes) else raw
        value = json.loads(raw) if isinstance(raw, str) else None
    except (OSError, ValueError):
        return None
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    return None


@dataclass(frozen=True)
class _Kept:
    index: int
    path: Path
    sessions: tuple[str, ...]


def _check_previous(out: Path, chash: str, generator: dict, force: bool) -> list[_Kept]:
    """Compare with what is on disk; return the complete shards of this configuration
    (in shard order) and delete damaged ones.

    Raises:
        ConfigError: when files of a build with other options exist (without ``force``).
    """
    from faceps.datasets.build import scan_previous_build
    from faceps.datasets.schema import validate_file

    # shards of other options are refused, or (force) removed below: their hash differs
    existing, hashes = scan_previous_build(out, chash, generator, force, noun="options")
    kept: list[_Kept] = []
    seen: set[str] = set()
    for k, p in sorted(existing.items()):
        if not p.exists():
            continue
        sessions = _read_sessions(p) if hashes.get(k) == chash else None
        ok = sessions is not None and not seen.intersection(sessions)
        if ok:
            try:
                summary = validate_file(p, check_data=True)
                ok = not summary.virtual and summary.n == len(sessions)
            except DatasetError as exc:
                log.info("shard %s is damaged: %s", p, exc)
                ok = False
        if ok:
            kept.append(_Kept(k, p, tuple(sessions)))
            seen.update(sessions)
        else:
            log.info("removing %s (incomplete, damaged or from other options)", p)
            p.unlink()
    return kept


def _remove_stray_temporaries(out: Path) -> None:
    from faceps.core.atomic import TMP_MARK
    from faceps.datasets.build import _stray_temporaries

    failures = failures_path(out)
    pattern = re.compile(rf"^\.{re.escape(failures.stem)}{re.escape(TMP_MARK)}")
    strays = _stray_temporaries(out) + [p for p in out.parent.iterdir()
                                        if pattern.match(p.name)]
    for p in strays:
        log.info("removing stray temporary file %s", p)
        p.unlink()


def _write_failures(path: Path, failures: Sequence[SessionFailure]) -> None:
    from faceps.core.atomic import atomic_path

    text = "".join(json.dumps(f.to_dict(), sort_keys=True) + "\n" for f in failures)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_shard(path: Path, index: int, outcomes: Sequence[_Outcome], dims: tuple[int, ...],
                 base_attrs: dict, compression: int) -> None:
    """A complete shard of ``outcomes`` (temporary name, renamed when complete)."""
    from faceps.core.atomic import atomic_path
    from faceps.datasets.build import _write_sample
    from faceps.datasets.schema import create_file

    L, size, k_id, k_exp, k_alb = dims
    attrs = {**base_attrs, "shard_index": index,
             "sessions": [o.session for o in outcomes]}
    with atomic_path(path) as tmp:
        with create_file(tmp, len(outcomes), L, size, size, k_id, k_exp, k_alb, attrs,
                         extras=EXTRAS, compression=compression) as f:
            for row, outcome in enumerate(outcomes):
                _write_sample(f, row, outcome.packed)
    log.info("wrote shard %s (%d samples)", path, len(outcomes))


# ------------------------------------------------------------------ the build
def build_real_dataset(root: str | os.PathLike, out: str | os.PathLike, *,
                       config: ReconstructConfig | None = None, size: int = 256,
                       workers: int = 1, model: str | os.PathLike | MorphableModel | None = None,
                       progress: bool = True, n_lights: int = 3,
                       crop_scale: float | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                       compression: int | None = None, force: bool = False,
                       executor: str = "local", ray_address: str | None = None
                       ) -> RealBuildResult:
    """Reconstruct every session under ``root`` into contract-4 shards plus a virtual index
    (see the module docstring for the layout, the sample content, resumption and failures).

    Args:
        root: folder of sessions (``SUBJECT/EXPRESSION/session.json`` or any depth).
        out: the index file ``DIR/NAME.h5``; shards, ``NAME.index.json`` and
            ``NAME.failures.jsonl`` go next to it.
        config: reconstruction options (default ``ReconstructConfig()``).
        size: crop resolution in pixels (square, >= 16).
        workers: processes reconstructing sessions (1: this process), or with
            ``executor="ray"`` the CPUs of a local Ray instance (tasks in flight on a
            cluster). The data do not depend on it.
        model: the morphable model: a ``.npz`` path, ``"builtin"``/None, or a model object.
        progress: show a progress bar over the sessions on stderr.
        n_lights: L, lights per sample; sessions with fewer images are padded, sessions
            with more fail.
        crop_scale: crop side / larger side of the landmark box (default 1.6, as the
            synthetic builder).
        shard_size: samples per shard file.
        compression: gzip level of the shards (default: the schema's).
        force: rebuild over the files of a build with other options.
        executor: ``local`` (this process or a local process pool) or ``ray`` (Ray tasks,
            see :func:`faceps.core.executor.make_executor`; on a cluster, ROOT must be at
            the same path on every node). The data do not depend on it.
        ray_address: the Ray cluster (``HOST:PORT``; default ``RAY_ADDRESS``, else a
            local instance); only with ``executor="ray"``.

    Returns:
        :class:`RealBuildResult` (its ``failures`` list the sessions without a sample).

    Raises:
        ConfigError: invalid arguments, ROOT not a folder or without sessions, files of a
            build with other options in the way, or Ray requested but not installed.
        DatasetError: when the index cannot be written.
    """
    from faceps.core.atomic import atomic_path, save_json
    from faceps.datasets.build import DEFAULT_CROP_SCALE, INDEX_FORMAT, _config_hash
    from faceps.datasets.schema import GZIP_LEVEL, create_virtual_index, now_iso, validate_file
    from faceps.model import load_model
    from faceps.model.morphable import MorphableModel
    from faceps.optimize.reconstruct import ReconstructConfig

    t_start = time.perf_counter()
    config = ReconstructConfig() if config is None else config
    if not isinstance(config, ReconstructConfig):
        raise ConfigError(f"config must be a ReconstructConfig; got {type(config).__name__}")
    compression = GZIP_LEVEL if compression is None else compression
    crop_scale = DEFAULT_CROP_SCALE if crop_scale is None else crop_scale
    for name, value, low in (("size", size, 16), ("workers", workers, 1),
                             ("n_lights", n_lights, 1), ("shard_size", shard_size, 1),
                             ("compression", compression, 1)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    if compression > 9:
        raise ConfigError(f"compression (gzip level) must be in 1..9; got {compression}")
    if not np.isfinite(crop_scale) or crop_scale <= 0:
        raise ConfigError(f"crop_scale must be > 0; got {crop_scale}")
    check_executor(executor, ray_address)
    root = Path(root)
    keys = _require_sessions(root)
    out = Path(out)
    if out.suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"{out}: the dataset file must end in .h5 or .hdf5")
    if out.exists() and not out.is_file():
        raise ConfigError(f"{out}: exists and is not a file")
    model_obj = load_model(model)
    model_spec = model if isinstance(model, MorphableModel) else (
        "builtin" if model is None else str(model))
    generator = _generator(model_obj, size, n_lights, crop_scale, compression, config)
    chash = _config_hash(generator)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stray_temporaries(out)
    kept = _check_previous(out, chash, generator, force)
    done = {s for k in kept for s in k.sessions}
    todo = [k for k in keys if k not in done]
    skipped = len(keys) - len(todo)
    log.info("real dataset %s: %d sessions under %s, %d already built, %d to process",
             out, len(keys), root, skipped, len(todo))

    dims = (int(n_lights), int(size), model_obj.n_id, model_obj.n_exp, model_obj.n_albedo)
    base_attrs = {"generator": generator, "model": model_obj.name, "config_hash": chash,
                  "root": str(root.resolve())}
    fail_path = failures_path(out)
    failures: list[SessionFailure] = []
    _write_failures(fail_path, failures)
    shards = list(kept)
    next_index = max((k.index for k in kept), default=-1) + 1
    timings: dict[str, float] = {"write": 0.0}
    written = reconstructed = 0
    buffer: list[_Outcome] = []

    def flush() -> None:
        nonlocal next_index, written
        if not buffer:
            return
        t = time.perf_counter()
        path = _shard_path(out, next_index)
        _write_shard(path, next_index, buffer, dims, base_attrs, compression)
        shards.append(_Kept(next_index, path, tuple(o.session for o in buffer)))
        next_index += 1
        written += len(buffer)
        buffer.clear()
        timings["write"] += time.perf_counter() - t

    bar = _session_bar(len(keys), skipped, out.name) if progress and todo else None
    try:
        if todo:
            job = _Job(str(root), int(size), int(n_lights), float(crop_scale),
                       int(compression), config)
            with _runner(model_obj, model_spec, job, min(workers, len(todo)), executor,
                         ray_address) as run:
                for outcome in run(todo):
                    reconstructed += int(outcome.reconstructed)
                    for k, v in outcome.timings.items():
                        timings[k] = timings.get(k, 0.0) + v
                    if outcome.failure is not None:
                        f = outcome.failure
                        log.warning("session %s failed (%s: %s)", f.session, f.error,
                                    f.message)
                        failures.append(f)
                        _write_failures(fail_path, failures)
                    else:
                        buffer.append(outcome)
                        if len(buffer) >= shard_size:
                            flush()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"failed {len(failures)}")
            flush()
    finally:
        if bar is not None:
            bar.close()

    t = time.perf_counter()
    index_json_path = out.parent / f"{out.stem}.index.json"
    n = 0
    rows = []
    for k in shards:
        rows.append({"path": k.path.name, "start": n, "stop": n + len(k.sessions),
                     "count": len(k.sessions), "bytes": k.path.stat().st_size,
                     "sessions": list(k.sessions)})
        n += len(k.sessions)
    path: Path | None = None
    index_json: Path | None = None
    if shards:
        with atomic_path(out) as tmp:
            L, _, k_id, k_exp, k_alb = dims
            create_virtual_index(tmp, [(k.path.name, len(k.sessions)) for k in shards],
                                 L, size, size, k_id, k_exp, k_alb,
                                 {**base_attrs, "n_shards": len(shards)}, extras=EXTRAS)
        validate_file(out, check_data=False)
        index_json = save_json(index_json_path, {
            "format": INDEX_FORMAT,
            "dataset": out.name,
            "created": now_iso(),
            "n": n,
            "shard_size": int(shard_size),
            "config_hash": chash,
            "root": str(root.resolve()),
            "sessions_found": len(keys),
            "failures": {"path": fail_path.name, "count": len(failures)},
            "shards": rows,
            "extras": list(EXTRAS),
            "generator": generator,
        })
        path = out
    else:
        for stale in (out, index_json_path):
            if stale.exists():
                stale.unlink()
    timings["index"] = time.perf_counter() - t
    result = RealBuildResult(
        path=path, index_json=index_json, failures_path=fail_path,
        shards=[k.path for k in shards], n=n, sessions=len(keys), skipped=skipped,
        written=written, reconstructed=reconstructed, failures=failures, config_hash=chash,
        seconds=time.perf_counter() - t_start, timings=timings)
    log.info("%s", result.summary())
    return result


def _session_bar(total: int, done: int, name: str) -> Any:
    """The progress bar of a run over sessions, ``done`` of ``total`` already there."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="session", desc=name, smoothing=0.1,
                dynamic_ncols=True)


# ------------------------------------------------------------------ command line
#: help of ``--break-ratio`` (here and in ``faceps reconstruct``)
BREAK_RATIO_HELP = ("height field: do not integrate across jumps of the proxy depth larger "
                    "than R pixel footprints (occluding contours, e.g. a nose in front of "
                    "a cheek on a turned face). Default 5; 0 couples every neighbour")


def add_fit_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--landmarks`` and ``--calibrate``: where the proxy fit takes its landmarks and
    lights from (``faceps fit``, ``reconstruct``, ``reconstruct-batch``, ``build-dataset``)."""
    parser.add_argument("--landmarks", choices=["auto", "session", "dlib"], default="auto",
                        help="landmark source (auto: the session's, else the detector)")
    parser.add_argument("--calibrate", choices=["auto", "always", "never"], default="auto",
                        help="calibrate the lights (auto: when the session gives none)")


def _add_reconstruct_options(parser: argparse.ArgumentParser) -> None:
    """The reconstruction options both commands of this module share."""
    add_fit_source_arguments(parser)
    parser.add_argument("--no-photometric", action="store_true",
                        help="landmark fit of the proxy only (faster, coarser proxy)")
    parser.add_argument("--max-size", type=int, default=None, metavar="PX",
                        help="work on a copy whose longer side is at most PX, then upsample")
    parser.add_argument("--passes", type=int, default=1,
                        help="extra normal-update / height-field rounds with the height "
                             "field's normals as the prior (default 1; 0: faster)")
    parser.add_argument("--break-ratio", type=float, default=None, metavar="R",
                        help=BREAK_RATIO_HELP)


def _reconstruct_config(args: argparse.Namespace, **extra: Any) -> Any:
    """The ReconstructConfig of :func:`_add_reconstruct_options` (plus ``extra`` fields)."""
    from faceps.optimize.fit import FitConfig
    from faceps.optimize.heightfield import HeightFieldConfig
    from faceps.optimize.reconstruct import ReconstructConfig

    hf = HeightFieldConfig()
    if getattr(args, "break_ratio", None) is not None:
        hf = replace(hf, break_ratio=args.break_ratio)
    return ReconstructConfig(
        fit=FitConfig(landmarks=args.landmarks, calibrate=args.calibrate,
                      photometric=not args.no_photometric),
        height_field=hf, max_size=args.max_size, refine_passes=args.passes, **extra)


def _print_outcome(result: Any) -> int:
    """Print a run's summary and its first failures; the exit code (0 or 1)."""
    print(result.summary())  # noqa: T201
    for f in result.failures[:10]:
        print(f"failed: {f.session}: {f.error}: {f.message}")  # noqa: T201
    if len(result.failures) > 10:
        print(f"... and {len(result.failures) - 10} more in "  # noqa: T201
              f"{result.failures_path}")
    return EXIT_FAILED if result.failures else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``faceps build-dataset`` (see :func:`run_from_args`)."""
    parser.add_argument("root", metavar="ROOT",
                        help="folder of capture sessions (SUBJECT/EXPRESSION/session.json; "
                             "any folder with a session.json, at any depth)")
    parser.add_argument("--out", required=True,
                        help="index file NAME.h5 (shards NAME-00000.h5, ..., "
                             "NAME.index.json, NAME.failures.jsonl beside it)")
    parser.add_argument("--workers", type=int, default=1,
                        help="sessions reconstructed in parallel processes (default 1)")
    parser.add_argument("--size", type=int, default=256,
                        help="crop size in pixels (default 256)")
    parser.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    parser.add_argument("--lights", type=int, default=3,
                        help="lights per sample; sessions with more images fail (default 3)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    _add_reconstruct_options(parser)
    parser.add_argument("--force", action="store_true",
                        help="rebuild over the files of a build with other options")
    parser.add_argument("--no-progress", "-q", action="store_true", help="no progress bar")
    add_executor_arguments(parser)


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``faceps build-dataset`` from parsed :func:`add_arguments` options.

    The command-line entry point (the only code of this module that prints): a summary on
    stdout, errors on stderr. Returns 0 when every session was written (or already
    was), 1 when some sessions failed (listed in the failure log), 2 on a bad invocation
    (one line on stderr).
    """
    import sys

    try:
        config = _reconstruct_config(args)
        result = build_real_dataset(
            args.root, args.out, config=config, size=args.size, workers=args.workers,
            model=args.model, progress=not args.no_progress, n_lights=args.lights,
            shard_size=args.shard_size, force=args.force, executor=args.executor,
            ray_address=args.ray_address)
    except (FacepsError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"faceps build-dataset: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    return _print_outcome(result)


# ------------------------------------------------------------------ batch reconstruction
#: the failure log of :func:`reconstruct_sessions`, in OUTDIR
BATCH_FAILURES = "failures.jsonl"
#: the file of a contract-2 folder written last: its presence marks a finished session
BATCH_DONE = "report.json"


@dataclass
class BatchResult:
    """What :func:`reconstruct_sessions` found and wrote.

    Attributes:
        out: OUTDIR.
        sessions: sessions found under ROOT.
        skipped: sessions whose output already had ``report.json`` (not processed).
        written: keys of the sessions reconstructed by this run.
        failures: the sessions of this run that failed.
        failures_path: ``OUTDIR/failures.jsonl``.
        seconds: wall time of the run.
    """

    out: Path
    sessions: int
    skipped: int
    written: list[str]
    failures: list[SessionFailure]
    failures_path: Path
    seconds: float

    def summary(self) -> str:
        """One line for people."""
        text = (f"{self.out}: {self.sessions} sessions: {self.skipped} already done, "
                f"{len(self.written)} reconstructed, {len(self.failures)} failed in "
                f"{self.seconds:.1f} s")
        if self.failures:
            text += f"; failures: {self.failures_path}"
        return text


@dataclass(frozen=True)
class _BatchJob:
    """What every session of a batch shares (sent to the workers once)."""

    root: str
    out: str
    config: Any  # ReconstructConfig


def _reconstruct_one(model: MorphableModel, job: _BatchJob, key: str) -> SessionFailure | None:
    """Reconstruct one session into ``OUTDIR/key`` (contract 2); any exception becomes a
    failure (stage ``load``, ``reconstruct`` or ``write``)."""
    from faceps.capture import load_session

    reconstruct_module = importlib.import_module("faceps.optimize.reconstruct")
    t_start = time.perf_counter()
    folder = Path(job.root) / key
    stage = "load"
    try:
        capture = load_session(folder)
        stage = "reconstruct"
        rec = reconstruct_module.reconstruct(capture, model, job.config)
        stage = "write"
        reconstruct_module.write_reconstruction(Path(job.out) / key, rec, model)
    except Exception as exc:  # noqa: BLE001 - one session must never stop the batch
        if not isinstance(exc, FacepsError):
            log.debug("session %s failed", key, exc_info=True)
        return SessionFailure(key, str(folder), stage, type(exc).__name__,
                              str(exc).strip() or repr(exc), time.perf_counter() - t_start)
    return None


def _reconstruct_in_worker(key: str) -> SessionFailure | None:
    return _reconstruct_one(_WORKER["model"], _WORKER["job"], key)


def reconstruct_sessions(root: str | os.PathLike, out: str | os.PathLike, *,
                         config: ReconstructConfig | None = None,
                         model: str | os.PathLike | MorphableModel | None = None,
                         workers: int = 1, executor: str = "local",
                         ray_address: str | None = None, progress: bool = False
                         ) -> BatchResult:
    """Reconstruct every capture session under ``root`` into ``out/<key>/`` (contract 2).

    The sessions are those of :func:`discover_sessions`; the session ``KEY`` (its path
    relative to ROOT) goes to ``OUTDIR/KEY/`` (ROOT itself to OUTDIR), written by
    :func:`faceps.optimize.reconstruct.write_reconstruction` in the worker that
    reconstructed it. A session whose output folder already has ``report.json`` (written
    last) is skipped, so a stopped batch continues where it stopped. Failures never stop
    the batch: they are listed in ``OUTDIR/failures.jsonl`` (as the dataset builder's
    failure log: ``session``, ``path``, ``stage``, ``error``, ``message``, ``seconds``,
    ``time``; rewritten after each failure).

    Args:
        root: folder of sessions.
        out: OUTDIR.
        config: reconstruction options (default ``ReconstructConfig()``).
        model: the morphable model: a ``.npz`` path, ``"builtin"``/None, or a model object.
        workers: parallel sessions (see :func:`faceps.core.executor.make_executor`).
        executor: ``local`` or ``ray`` (on a cluster, ROOT and OUTDIR must be at the same
            path on every node). The results do not depend on it.
        ray_address: the Ray cluster (default ``RAY_ADDRESS``, else a local instance).
        progress: show a progress bar over the sessions on stderr.

    Returns:
        :class:`BatchResult`.

    Raises:
        ConfigError: invalid arguments, ROOT not a folder or without sessions, or Ray
            requested but missing.
    """
    from faceps.model import load_model
    from faceps.model.morphable import MorphableModel
    from faceps.optimize.reconstruct import ReconstructConfig

    t_start = time.perf_counter()
    config = ReconstructConfig() if config is None else config
    if not isinstance(config, ReconstructConfig):
        raise ConfigError(f"config must be a ReconstructConfig; got {type(config).__name__}")
    if not isinstance(workers, int | np.integer) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1; got {workers!r}")
    check_executor(executor, ray_address)
    root, out = Path(root), Path(out)
    keys = _require_sessions(root)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    model_obj = load_model(model)
    model_spec = model if isinstance(model, MorphableModel) else (
        "builtin" if model is None else str(model))
    todo = [k for k in keys if not (out / k / BATCH_DONE).is_file()]
    skipped = len(keys) - len(todo)
    log.info("reconstruct-batch %s: %d sessions under %s, %d done, %d to reconstruct",
             out, len(keys), root, skipped, len(todo))
    out.mkdir(parents=True, exist_ok=True)
    fail_path = out / BATCH_FAILURES
    failures: list[SessionFailure] = []
    written: list[str] = []
    _write_failures(fail_path, failures)

    bar = _session_bar(len(keys), skipped, out.name) if progress and todo else None
    try:
        if todo:
            from faceps.core.executor import TaskFailure, make_executor

            job = _BatchJob(str(root), str(out), config)
            with make_executor(executor, min(workers, len(todo)), address=ray_address,
                               initializer=_init_worker, initargs=(model_spec, job),
                               threads=1) as ex:
                if ex.in_process:
                    def fn(key: str) -> SessionFailure | None:
                        return _reconstruct_one(model_obj, job, key)
                else:
                    fn = _reconstruct_in_worker
                results = ex.map(fn, todo, ahead=AHEAD_PER_WORKER * ex.workers,
                                 return_failures=True)
                for key, result in zip(todo, results):
                    if isinstance(result, TaskFailure):
                        result = _worker_failure(key, str(root), result.error).failure
                    if result is None:
                        written.append(key)
                    else:
                        log.warning("session %s failed (%s: %s)", key, result.error,
                                    result.message)
                        failures.append(result)
                        _write_failures(fail_path, failures)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"failed {len(failures)}")
    finally:
        if bar is not None:
            bar.close()
    result = BatchResult(out=out, sessions=len(keys), skipped=skipped, written=written,
                         failures=failures, failures_path=fail_path,
                         seconds=time.perf_counter() - t_start)
    log.info("%s", result.summary())
    return result


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``faceps reconstruct-batch`` (see :func:`run_batch_from_args`)."""
    parser.add_argument("root", metavar="ROOT",
                        help="folder of capture sessions (any folder with a session.json, "
                             "at any depth)")
    parser.add_argument("--out", required=True, metavar="OUTDIR",
                        help="output folder: OUTDIR/<session path>/ (contract 2) and "
                             "OUTDIR/failures.jsonl")
    parser.add_argument("--workers", type=int, default=1,
                        help="sessions reconstructed in parallel (default 1)")
    parser.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    _add_reconstruct_options(parser)
    parser.add_argument("--region", choices=["face", "visible"], default="face",
                        help="reconstructed region: the model's face region or all it sees")
    parser.add_argument("--no-progress", "-q", action="store_true", help="no progress bar")
    add_executor_arguments(parser)


def run_batch_from_args(args: argparse.Namespace) -> int:
    """Run ``faceps reconstruct-batch`` from parsed :func:`add_batch_arguments` options.

    Prints a summary on stdout and errors on stderr. Returns 0 when every session is
    reconstructed (or already was), 1 when some failed (listed in
    ``OUTDIR/failures.jsonl``), 2 on a bad invocation (one line on stderr).
    """
    import sys

    try:
        config = _reconstruct_config(args, region=args.region)
        result = reconstruct_sessions(
            args.root, args.out, config=config, model=args.model, workers=args.workers,
            executor=args.executor, ray_address=args.ray_address,
            progress=not args.no_progress)
    except (FacepsError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"faceps reconstruct-batch: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    return _print_outcome(result)
