"""Synthetic training datasets: random faces rendered as face crops into contract-4 shards.

For each sample i a generator ``np.random.default_rng([seed, i])`` draws everything: the
face, pose and lights (:func:`faceps.synth.faces.sample_face`, framed for a virtual capture
camera), the crop jitter and the sensor noise. The crop is a square around the projected
landmarks (centre of their bounding box, side ``crop_scale`` times the larger box side,
jittered); the crop's camera is the capture camera cropped and scaled to ``size`` x ``size``,
and the face is rendered directly at that resolution (the crop may extend past the capture
frame: the virtual camera has no border). So sample i is the same whichever process renders
it and however many workers there are.

Layout of a build into ``out = DIR/NAME.h5``:

- ``DIR/NAME-00000.h5``, ``DIR/NAME-00001.h5``, ...: shards, each a complete contract-4 file
  of up to ``shard_size`` consecutive samples, written under a temporary name and renamed
  when complete; root attributes ``shard_index``, ``shard_start``, ``shard_stop`` (sample
  range [start, stop)) and ``config_hash`` record what it holds;
- ``DIR/NAME.h5``: the index, a contract-4 file of virtual datasets mapping every dataset of
  ``samples/`` onto the shards by relative paths (the folder can move); written last;
- ``DIR/NAME.index.json``: the shards, their sample ranges and sizes, and the configuration.

A build that is stopped (Ctrl-C, kill, crash) and run again with the same arguments keeps
every complete shard whose attributes match and renders the rest; a run with other
arguments over an existing build raises :class:`ConfigError` unless ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from faceps import __version__
from faceps.core.atomic import TMP_MARK, atomic_path, save_json
from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, DatasetError
from faceps.core.executor import TaskError, check_executor, make_executor
from faceps.datasets.schema import (
    EXTRAS,
    GZIP_LEVEL,
    SAMPLES,
    create_file,
    create_virtual_index,
    encode_chunk,
    now_iso,
    validate_file,
    write_chunk,
)
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.synth.faces import (
    FaceConfig,
    FaceSample,
    LightRig,
    default_camera,
    landmark_pixels,
    render_face,
    sample_face,
)
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.scanface import ScanFace, render_scan
from faceps.synth.wild import WildConfig

log = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "BuildResult", "build_dataset", "render_sample", "face_crop_box",
           "shard_paths", "DEFAULT_SHARD_SIZE", "INDEX_FORMAT"]

#: samples per shard file by default (about 1 GB at 256 x 256 with 3 lights)
DEFAULT_SHARD_SIZE = 500
INDEX_FORMAT = "faceps.dataset-index/1"
#: default crop side / larger side of the landmark box
DEFAULT_CROP_SCALE = 1.6
#: crop scale applied to the face-region box when a model has too few landmarks (the region
#: box spans forehead to chin and ear to ear, larger than the landmark box)
REGION_CROP_SCALE = 1.1
#: samples each worker may render ahead of the writer
AHEAD_PER_WORKER = 3
#: landmarks needed to frame the crop by them
MIN_LANDMARKS = 5
SOURCE = "synthetic"
#: DatasetConfig.lighting choices
LIGHTINGS = ("near", "wild", "mixed")


@dataclass(frozen=True)
class DatasetConfig:
    """How synthetic samples are drawn and rendered (everything but n, size, seed).

    Attributes:
        n_lights: lights per sample (the rig is spread left to right, see
            :meth:`LightRig.spread`, unless ``face.rig`` already has that many).
        capture_size: (W, H) pixels of the virtual capture camera that frames the face.
        fov_x_deg: its horizontal field of view.
        crop_scale: crop side / larger side of the landmark bounding box.
        crop_centre_jitter: std of the crop-centre offset, fraction of the crop side.
        crop_scale_jitter: std of the log crop side (0.05: about +-5 %).
        levels: mesh subdivision levels of the detailed surface (None: automatic, edges of
            about 2 pixels at the crop resolution).
        face: ranges of faces, poses, fine detail and lights.
        shading, sensor: image formation (set ``shading.lambertian`` and zero sensor noise
            for data that follows eq. 1 exactly outside cast shadows).
        compression: gzip level of the shards (1-9).
        scans: registered scans (``scan_face.npz`` files or folders written by
            ``faceps synth register``) to render as samples of source ``scan``.
        scan_fraction: probability that a sample is a registered scan (one of ``scans``,
            uniformly) instead of a random model face.
        lighting: ``near`` (the near point lights of ``face.rig``), ``wild`` (in-the-wild
            lighting, :mod:`faceps.synth.wild`: ``n_lights`` images per sample, each under
            its own environment, over a random background, maybe behind occluders) or
            ``mixed`` (a sample is ``wild`` with probability ``wild_fraction``).
        wild_fraction: the share of in-the-wild samples of a ``mixed`` build.
        wild: the in-the-wild ranges (lighting, backgrounds, occluders).
    """

    n_lights: int = 3
    capture_size: tuple[int, int] = (1600, 1200)
    fov_x_deg: float = 34.0
    crop_scale: float = DEFAULT_CROP_SCALE
    crop_centre_jitter: float = 0.03
    crop_scale_jitter: float = 0.05
    levels: int | None = None
    face: FaceConfig = field(default_factory=FaceConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    sensor: SensorConfig = field(default_factory=SensorConfig)
    compression: int = GZIP_LEVEL
    scans: tuple[str, ...] = ()
    scan_fraction: float = 0.0
    lighting: str = "near"
    wild_fraction: float = 0.5
    wild: WildConfig = field(default_factory=WildConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scans", tuple(str(s) for s in self.scans))
        if self.lighting not in LIGHTINGS:
            raise ConfigError(f"lighting must be one of {LIGHTINGS}; got {self.lighting!r}")
        if not 0.0 <= self.wild_fraction <= 1.0:
            raise ConfigError(f"wild_fraction must be in [0, 1]; got {self.wild_fraction}")
        if isinstance(self.wild, dict):
            object.__setattr__(self, "wild", WildConfig(**self.wild))
        if not 0.0 <= self.scan_fraction <= 1.0:
            raise ConfigError(f"scan_fraction must be in [0, 1]; got {self.scan_fraction}")
        if self.scan_fraction > 0 and not self.scans:
            raise ConfigError("scan_fraction > 0 needs at least one registered scan")
        if self.n_lights < 1:
            raise ConfigError(f"n_lights must be >= 1; got {self.n_lights}")
        if self.crop_scale <= 0:
            raise ConfigError(f"crop_scale must be > 0; got {self.crop_scale}")
        if self.crop_centre_jitter < 0 or self.crop_scale_jitter < 0:
            raise ConfigError("crop jitters must be >= 0")
        if self.levels is not None and not 0 <= self.levels <= 4:
            raise ConfigError(f"levels must be in 0..4 or None; got {self.levels}")
        if not 1 <= self.compression <= 9:
            raise ConfigError(f"compression (gzip level) must be in 1..9; got {self.compression}")
        if min(self.capture_size) < 32:
            raise ConfigError(f"capture_size must be at least 32x32; got {self.capture_size}")
        if self.face.rig.positions is None and len(self.face.rig.names) != self.n_lights:
            object.__setattr__(self, "face", FaceConfig(**{
                **{k: getattr(self.face, k) for k in self.face.__dataclass_fields__},
                "rig": LightRig.spread(self.n_lights)}))
        elif len(self.face.rig.names) != self.n_lights:
            raise ConfigError(f"the light rig has {len(self.face.rig.names)} lights; "
                              f"n_lights is {self.n_lights}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BuildResult:
    """What :func:`build_dataset` wrote and measured.

    Attributes:
        path: the index file (contract 4, virtual datasets).
        index_json: the ``NAME.index.json`` listing.
        shards: the shard files, in sample order.
        n: samples in the dataset.
        kept_shards, built_shards: shards found complete and kept / rendered by this run.
        rendered: samples rendered by this run.
        config_hash: hash of the resolved configuration (stored in every shard).
        seconds: wall time of the run.
        file_bytes: bytes of the shards plus the index.
        timings: seconds, summed over the samples of this run: the render stages
            ``crop``, ``detail``, ``raycast``, ``shading``, ``sensor``, ``proxy`` (see
            :class:`RenderedFace`), ``pack`` (storage dtypes) and ``compress`` (shuffle +
            gzip of the chunks), measured in whichever process rendered; in the main
            process ``write`` (storing chunks, closing and renaming shards) and ``wait``
            (waiting for rendered samples); ``first_sample`` (start of rendering to the
            first sample, worker start-up included) and ``index`` (index files).
    """

    path: Path
    index_json: Path
    shards: list[Path]
    n: int
    kept_shards: int
    built_shards: int
    rendered: int
    config_hash: str
    seconds: float
    file_bytes: int
    timings: dict = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        """Rendered samples per second of wall time (0 when nothing was rendered)."""
        return self.rendered / self.seconds if self.rendered and self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for people."""
        size = self.file_bytes / 2**20
        head = (f"{self.path}: {self.n} samples in {len(self.shards)} shards "
                f"({self.kept_shards} kept, {self.built_shards} built), {size:.1f} MiB")
        if not self.rendered:
            return f"{head}, nothing to render ({self.seconds:.1f} s)"
        return (f"{head}, {self.rendered} rendered in {self.seconds:.1f} s "
                f"({self.samples_per_second:.2f} samples/s)")


# ------------------------------------------------------------------ one sample
def face_crop_box(landmarks: np.ndarray, scale: float, centre_offset: np.ndarray | None = None,
                  scale_factor: float = 1.0) -> tuple[int, int, int]:
    """Square crop around landmarks.

    Args:
        landmarks: (M, 2) pixel positions (u, v); NaN rows are ignored (at least 2 finite).
        scale: crop side / larger side of the landmarks' bounding box.
        centre_offset: optional (2,) offset of the centre as a fraction of the side.
        scale_factor: extra factor on the side (jitter).

    Returns:
        (x0, y0, side) integer pixels: the crop is ``[y0:y0+side, x0:x0+side]`` (it may
        extend past the image).
    """
    pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if pts.shape[0] < 2:
        raise ConfigError("a face crop needs at least 2 finite landmarks")
    lo, hi = pts.min(0), pts.max(0)
    side = max(float(scale) * float(np.max(hi - lo)) * float(scale_factor), 8.0)
    centre = 0.5 * (lo + hi)
    if centre_offset is not None:
        centre = centre + np.asarray(centre_offset, np.float64) * side
    s = int(round(side))
    x0 = int(np.floor(centre[0] - 0.5 * (s - 1) + 0.5))
    y0 = int(np.floor(centre[1] - 0.5 * (s - 1) + 0.5))
    return x0, y0, s


@dataclass(frozen=True)
class _Job:
    """What every sample of a build shares (sent to the workers once)."""

    seed: int
    size: int
    config: DatasetConfig


def _frame_points(model: MorphableModel, geometry: np.ndarray, sample, camera: Camera
                  ) -> tuple[np.ndarray, float]:
    """Pixels that frame the crop, and a factor on ``crop_scale`` for their box: the
    landmarks (factor 1), or the face-region vertices when the model has fewer than
    :data:`MIN_LANDMARKS` landmarks (scaled so the default crop is
    :data:`REGION_CROP_SCALE` times the region box)."""
    lm = landmark_pixels(model, geometry, sample.rotation, sample.translation, camera)
    if np.all(np.isfinite(lm), axis=1).sum() >= MIN_LANDMARKS:
        return lm, 1.0
    region = geometry[model.region] @ sample.rotation.T + sample.translation
    return camera.project(region), REGION_CROP_SCALE / DEFAULT_CROP_SCALE


def render_sample(model: MorphableModel, index: int, *, seed: int = 0, size: int = 256,
                  config: DatasetConfig | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Draw and render sample ``index`` of a build, packed in the storage dtypes.

    Args:
        model: the morphable model.
        index: the sample's global index (its random stream is ``default_rng([seed, index])``).
        seed: the build's seed.
        size: crop resolution (pixels, square).
        config: the build configuration.

    Returns:
        (arrays, timings): arrays by dataset name under ``samples/`` (contract 4 plus the
        extras ``face_mask``, ``shadow``, ``exposure``, ``sample_index``, ``lighting``,
        ``wild_lighting``), in the storage dtypes, e.g. ``images`` (L, size, size, 3)
        float16, ``subject`` str; timings in seconds per render stage.
    """
    config = config or DatasetConfig()
    t0 = time.perf_counter()
    rng = np.random.default_rng([int(seed), int(index)])
    full = default_camera(config.capture_size, config.fov_x_deg)
    sample = sample_face(rng, model, full, config.face)
    scan = None
    if config.scans:  # drawn only when scans are configured: other builds keep their stream
        pick = rng.random()
        k = int(rng.integers(len(config.scans)))
        if pick < config.scan_fraction:
            scan = _load_scan_face(config.scans[k], model)
            sample = FaceSample(Coefficients(scan.alpha_id, scan.alpha_exp,
                                             sample.coefficients.albedo),
                                sample.angles, sample.translation, sample.lights, None)
    geometry = model.geometry(sample.coefficients.id, sample.coefficients.exp)
    pts, region_scale = _frame_points(model, geometry, sample, full)
    # always three draws, so the noise stream does not depend on the jitter settings
    jitter = rng.standard_normal(3)
    x0, y0, side = face_crop_box(pts, config.crop_scale * region_scale,
                                 jitter[:2] * config.crop_centre_jitter,
                                 float(np.exp(jitter[2] * config.crop_scale_jitter)))
    camera = full.cropped(x0, y0, side, side).scaled((size, size))
    # the in-the-wild choice is drawn only by mixed builds: others keep their stream
    wild = config.wild if config.lighting == "wild" else None
    if config.lighting == "mixed" and rng.random() < config.wild_fraction:
        wild = config.wild
    t_crop = time.perf_counter() - t0

    L = config.n_lights
    if scan is None:
        r = render_face(model, sample, camera, shading=config.shading, sensor=config.sensor,
                        rng=rng, levels=config.levels, geometry=geometry, wild=wild,
                        n_wild=L)
    else:
        r = render_scan(model, scan, sample, camera, shading=config.shading,
                        sensor=config.sensor, rng=rng, wild=wild, n_wild=L)
    t0 = time.perf_counter()
    lights = np.zeros((L, 11), np.float32)
    rows = r.lights.to_array()[:L]
    lights[: rows.shape[0]] = rows
    wild_rows = np.zeros((L, 34), np.float32)
    if r.wild is not None:
        wild_rows[:] = [lt.row() for lt in r.wild.lightings[:L]]
    n_img = min(L, r.images.shape[0])
    images = np.zeros((L, size, size, 3), np.float16)
    images[:n_img] = r.images[:n_img]
    shadow = np.zeros((L, size, size), np.uint8)
    shadow[:n_img] = r.shadow[:n_img]
    coef = sample.coefficients
    arrays: dict[str, Any] = {
        "images": images,
        "lights": lights,
        "normals": r.normals.astype(np.float16),
        "proxy_normals": r.proxy_normals.astype(np.float16),
        "mask": r.mask.astype(np.uint8),
        "albedo": r.albedo.astype(np.float16),
        "depth": r.depth.astype(np.float32),
        "K": camera.K.astype(np.float32),
        "landmarks": r.landmarks.astype(np.float32),
        "params/id": np.asarray(coef.id, np.float32),
        "params/exp": np.asarray(coef.exp, np.float32),
        "params/albedo": np.asarray(coef.albedo, np.float32),
        "params/pose": sample.pose_vector(),
        "subject": (f"synthetic-s{int(seed)}-{int(index):07d}" if scan is None
                    else f"scan-{scan.name}"),
        "source": SOURCE if scan is None else "scan",
        "face_mask": r.face_mask.astype(np.uint8),
        "shadow": shadow,
        "exposure": np.float32(r.exposure),
        "sample_index": np.int64(index),
        "lighting": "near" if r.wild is None else "wild",
        "wild_lighting": wild_rows,
    }
    timings = {"crop": t_crop, **r.timings, "pack": time.perf_counter() - t0}
    return arrays, timings


_SCANS: dict[str, Any] = {}


def _load_scan_face(path: str, model: MorphableModel):
    """A registered scan, loaded once per process and checked against the model."""
    if path not in _SCANS:
        face = ScanFace.load(path)
        face.check_model(model)
        _SCANS[path] = face
    return _SCANS[path]


# ------------------------------------------------------------------ workers
_WORKER: dict[str, Any] = {}


def _warm_up_raycaster() -> None:
    """Load open3d and start its thread pools (TBB, Embree) with one tiny query."""
    from faceps.core.raycast import RayCaster

    caster = RayCaster(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
                       np.array([[0, 1, 2]]))
    origins = np.zeros((2, 3))
    dirs = np.array([[0.2, 0.2, 1.0], [0.2, 0.2, 1.0]])
    caster.cast(origins, dirs)
    caster.occluded(origins, dirs, 10.0)


def _warm_up_rasterizer() -> None:
    """Import torch (about 1 s of CPU) and run the proxy rasteriser once, so the first
    sample of a worker does not pay for it."""
    from faceps.core.rasterize import rasterize

    rasterize(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32),
              np.array([[0, 1, 2]]), np.eye(3, dtype=np.float32) * [4, 4, 1], (4, 4))


def _init_worker(model_spec: Any, job: Any) -> None:
    """Worker initializer (see :mod:`faceps.core.executor`): start the thread pools of
    the ray caster and the rasteriser, load the model once, keep the job.

    The executor runs it with the worker's CPU affinity restricted to its share, so
    open3d's TBB and Embree pools, sized from the affinity mask when they start, give
    about one thread per core over all workers; torch (the proxy's rasteriser) takes its
    thread count from ``OMP_NUM_THREADS``, set by the executor.
    """
    from faceps.model import load_model

    _warm_up_raycaster()
    _warm_up_rasterizer()
    _WORKER["model"] = load_model(model_spec)
    _WORKER["job"] = job


def _pack(arrays: dict[str, Any], level: int) -> dict[str, Any]:
    """Encode the numeric rows as stored chunks: name -> (bytes, raw size); strings stay."""
    packed: dict[str, Any] = {}
    for name, value in arrays.items():
        if isinstance(value, str):
            packed[name] = value
        else:
            a = np.asarray(value)
            if a.size:  # zero-size rows (no albedo modes) are not stored
                packed[name] = (encode_chunk(a, level), a.nbytes)
    return packed


def _render_packed(model: MorphableModel, job: _Job, index: int
                   ) -> tuple[dict[str, Any], dict[str, float]]:
    arrays, timings = render_sample(model, index, seed=job.seed, size=job.size,
                                    config=job.config)
    t0 = time.perf_counter()
    packed = _pack(arrays, job.config.compression)
    timings["compress"] = time.perf_counter() - t0
    return packed, timings


def _render_in_worker(index: int) -> tuple[dict[str, Any], dict[str, float]]:
    return _render_packed(_WORKER["model"], _WORKER["job"], index)


@contextlib.contextmanager
def _renderer(model: MorphableModel, model_spec: Any, job: _Job, workers: int,
              executor: str = "local", address: str | None = None) -> Iterator[Any]:
    """Yield a function mapping sample indices to an in-order iterator of rendered samples.

    The samples are rendered by :func:`faceps.core.executor.make_executor` (``executor``,
    ``workers``, ``address``), ahead of the consumer by at most :data:`AHEAD_PER_WORKER`
    samples per worker (bounded memory); a failed sample or a worker that dies raises
    :class:`~faceps.core.executor.TaskError` naming the sample instead of hanging.
    """
    with make_executor(executor, workers, address=address, initializer=_init_worker,
                       initargs=(model_spec, job)) as ex:
        if ex.in_process:
            def fn(i: int) -> tuple[dict, dict]:
                return _render_packed(model, job, i)
        else:
            fn = _render_in_worker

        def run(indices: Sequence[int]) -> Iterator[tuple[dict, dict]]:
            return ex.map(fn, indices, ahead=AHEAD_PER_WORKER * ex.workers)

        yield run


# ------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _Shard:
    index: int
    start: int
    stop: int
    path: Path

    @property
    def count(self) -> int:
        return self.stop - self.start


def shard_paths(out: str | os.PathLike, n: int, shard_size: int) -> list[Path]:
    """The shard files of a build of n samples into ``out``: ``NAME-00000.h5``, ..."""
    out = Path(out)
    return [out.parent / f"{out.stem}-{k:05d}.h5" for k in range((n + shard_size - 1)
                                                                   // shard_size)]


def _plan(out: Path, n: int, shard_size: int) -> list[_Shard]:
    return [_Shard(k, k * shard_size, min(n, (k + 1) * shard_size), p)
            for k, p in enumerate(shard_paths(out, n, shard_size))]


def _model_fingerprint(model: MorphableModel) -> str:
    h = hashlib.sha256()
    for key, arr in sorted(model.to_arrays().items()):
        h.update(key.encode())
        a = np.ascontiguousarray(arr)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes() if a.dtype.kind != "U" else str(a.tolist()).encode())
    return h.hexdigest()[:16]


def _generator(model: MorphableModel, n: int, size: int, seed: int, shard_size: int,
               config: DatasetConfig) -> dict:
    """The resolved configuration as plain JSON values (tuples become lists)."""
    gen = {
        "builder": "faceps.datasets.build",
        "faceps": __version__,
        "source": SOURCE,
        "n": int(n),
        "size": int(size),
        "seed": int(seed),
        "shard_size": int(shard_size),
        "rng": "numpy.random.default_rng([seed, sample_index])",
        "model": {"name": model.name, "fingerprint": _model_fingerprint(model),
                  "n_vertices": model.n_vertices, "k_id": model.n_id, "k_exp": model.n_exp,
                  "k_albedo": model.n_albedo},
        "config": config.to_dict(),
    }
    return json.loads(json.dumps(gen))


def _config_hash(generator: dict) -> str:
    text = json.dumps(generator, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "configuration hash differs"


def _read_build_attrs(path: Path) -> tuple[str | None, dict | None]:
    """(config hash, generator) stored in a file of a build; (None, None) if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            chash = f.attrs.get("config_hash")
            gen = f.attrs.get("generator")
            chash = chash.decode() if isinstance(chash, bytes) else chash
            gen = json.loads(gen.decode() if isinstance(gen, bytes) else gen) if gen else None
            return (str(chash) if chash is not None else None,
                    gen if isinstance(gen, dict) else None)
    except (OSError, ValueError, json.JSONDecodeError):
        return None, None


def _stray_temporaries(out: Path) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(out.stem)}(-\d{{5}}|\.index)?{re.escape(TMP_MARK)}")
    return [p for p in out.parent.iterdir() if pattern.match(p.name)]


def _existing_shards(out: Path) -> dict[int, Path]:
    pattern = re.compile(rf"^{re.escape(out.stem)}-(\d{{5}})\.h5$")
    found = {}
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def _index_json_path(out: Path) -> Path:
    return out.parent / f"{out.stem}.index.json"


def scan_previous_build(out: Path, chash: str, generator: dict, force: bool,
                        noun: str = "arguments"
                        ) -> tuple[dict[int, Path], dict[int, str | None]]:
    """The shards of an earlier build at ``out`` and their configuration hashes.

    Files of a build with another configuration (index, index JSON, shards) are refused
    without ``force``; with it the index files are deleted (a stale index must never point
    at new shards) and the callers delete the shards whose hash differs. Shared by the
    synthetic and the real-capture builders.

    Args:
        noun: what the builder calls its settings in the message (``arguments``,
            ``options``).

    Returns:
        (shard index -> path, shard index -> stored hash or None).

    Raises:
        ConfigError: naming the first file in the way and what differs (without ``force``).
    """
    existing = _existing_shards(out)
    index_json = _index_json_path(out)
    conflicts: list[tuple[Path, dict | None]] = []
    if out.exists():
        old_hash, old_gen = _read_build_attrs(out)
        if old_hash != chash:
            conflicts.append((out, old_gen))
    if index_json.exists():
        try:
            old = json.loads(index_json.read_text(encoding="utf-8"))
            old_hash, old_gen = old.get("config_hash"), old.get("generator")
        except (OSError, ValueError, AttributeError):
            old_hash, old_gen = None, None
        if old_hash != chash:
            conflicts.append((index_json, old_gen if isinstance(old_gen, dict) else None))
    hashes: dict[int, str | None] = {}
    for k, p in sorted(existing.items()):
        old_hash, old_gen = _read_build_attrs(p)
        hashes[k] = old_hash
        if old_hash is not None and old_hash != chash:
            conflicts.append((p, old_gen))
    if conflicts and not force:
        path, old_gen = conflicts[0]
        what = (_differences(old_gen, generator) if old_gen is not None
                else "not a dataset of this builder")
        raise ConfigError(f"{path}: exists from a build with different {noun} ({what}); "
                          f"use --force to rebuild ({len(conflicts)} file(s) in the way)")
    for path, _ in conflicts:
        if path in (out, index_json) and path.exists():
            log.info("removing %s (a build with other %s)", path, noun)
            path.unlink()
    return existing, hashes


def _check_previous(out: Path, plan: list[_Shard], chash: str, generator: dict,
                    force: bool) -> list[_Shard]:
    """Compare with what is on disk; return the shards to keep, delete what is redone.

    Raises:
        ConfigError: when files of a build with other arguments exist (without ``force``).
    """
    existing, hashes = scan_previous_build(out, chash, generator, force)
    keep = []
    planned = {s.index: s for s in plan}
    for k, p in existing.items():
        s = planned.get(k)
        if s is not None and hashes.get(k) == chash and _shard_complete(s, chash):
            keep.append(s)
        else:
            log.info("removing %s (incomplete, damaged or from other arguments)", p)
            p.unlink()
    return sorted(keep, key=lambda s: s.index)


def _shard_complete(shard: _Shard, chash: str) -> bool:
    try:
        summary = validate_file(shard.path, check_data=True)
    except DatasetError as exc:
        log.info("shard %s is damaged: %s", shard.path, exc)
        return False
    a = summary.attrs
    return (not summary.virtual and a.get("config_hash") == chash
            and int(a.get("shard_start", -1)) == shard.start
            and int(a.get("shard_stop", -1)) == shard.stop and summary.n == shard.count)


# ------------------------------------------------------------------ the build
def _write_sample(f: h5py.File, row: int, packed: dict[str, Any]) -> None:
    group = f[SAMPLES]
    for name, value in packed.items():
        if isinstance(value, str):
            group[name][row] = value
        else:
            write_chunk(group[name], row, *value)


def _write_shard(shard: _Shard, results: Iterator[tuple[dict, dict]],
                 sizes: tuple[int, ...], config: DatasetConfig, base_attrs: dict,
                 timings: dict[str, float], bar: Any, t_render: float) -> int:
    """Write one shard from the next ``shard.count`` rendered samples (temporary name,
    renamed when complete); add to ``timings``; return the number of samples written."""
    L, size, k_id, k_exp, k_alb = sizes
    attrs = {**base_attrs, "shard_index": shard.index, "shard_start": shard.start,
             "shard_stop": shard.stop}
    with atomic_path(shard.path) as tmp:
        with create_file(tmp, shard.count, L, size, size, k_id, k_exp, k_alb, attrs,
                         compression=config.compression) as f:
            for row in range(shard.count):
                t0 = time.perf_counter()
                packed, stage = next(results)
                t1 = time.perf_counter()
                if "first_sample" not in timings:
                    timings["first_sample"] = t1 - t_render
                _write_sample(f, row, packed)
                timings["wait"] += t1 - t0
                timings["write"] += time.perf_counter() - t1
                for k, v in stage.items():
                    timings[k] = timings.get(k, 0.0) + v
                if bar is not None:
                    bar.update(1)
            t1 = time.perf_counter()
    timings["write"] += time.perf_counter() - t1  # flush, close, rename
    log.info("wrote shard %s (samples %d..%d)", shard.path, shard.start, shard.stop - 1)
    return shard.count


def build_dataset(out: str | os.PathLike, n: int, *, size: int = 256, seed: int = 0,
                  workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
                  model: str | os.PathLike | MorphableModel | None = None,
                  config: DatasetConfig | None = None, progress: bool = False,
                  force: bool = False, executor: str = "local",
                  ray_address: str | None = None) -> BuildResult:
    """Render n random face crops into contract-4 shards plus a virtual index.

    Args:
        out: the index file ``DIR/NAME.h5``; shards ``DIR/NAME-00000.h5``, ... and
            ``DIR/NAME.index.json`` go next to it.
        n: number of samples (>= 1).
        size: crop resolution in pixels (square, >= 16).
        seed: random seed; sample i uses ``default_rng([seed, i])``.
        workers: rendering processes (1: render in this process). The data do not depend
            on it.
        shard_size: samples per shard file.
        model: the morphable model: a ``.npz`` path, ``"builtin"``/None, or a model object.
        config: sampling and rendering options.
        progress: show a progress bar (samples/s and ETA) on stderr.
        force: rebuild over the files of a build with other arguments.
        executor: ``local`` (this process or a local process pool) or ``ray`` (Ray tasks;
            see :func:`faceps.core.executor.make_executor`). The data do not depend on it.
        ray_address: the Ray cluster (``HOST:PORT``; default ``RAY_ADDRESS``, else a
            local instance); only with ``executor="ray"``.

    Returns:
        :class:`BuildResult`.

    Raises:
        ConfigError: invalid arguments, files of a build with other arguments in the way,
            or Ray requested but not installed.
        DatasetError: a sample could not be rendered or a worker died (the complete
            shards are kept: the same command continues the build).
    """
    from faceps.model import load_model

    t_start = time.perf_counter()
    config = config or DatasetConfig()
    for name, value, low in (("n", n, 1), ("size", size, 16), ("workers", workers, 1),
                             ("shard_size", shard_size, 1)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0; got {seed!r}")
    check_executor(executor, ray_address)
    out = Path(out)
    if out.suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"{out}: the dataset file must end in .h5 or .hdf5")
    if out.exists() and not out.is_file():
        raise ConfigError(f"{out}: exists and is not a file")
    model_obj = load_model(model)
    model_spec = model if isinstance(model, MorphableModel) else (
        "builtin" if model is None else str(model))
    generator = _generator(model_obj, n, size, seed, shard_size, config)
    chash = _config_hash(generator)
    plan = _plan(out, n, shard_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    for p in _stray_temporaries(out):
        log.info("removing stray temporary file %s", p)
        p.unlink()
    kept = _check_previous(out, plan, chash, generator, force)
    kept_ids = {s.index for s in kept}
    todo = [s for s in plan if s.index not in kept_ids]
    log.info("dataset %s: %d shards kept, %d to build", out, len(kept), len(todo))

    L, dims = config.n_lights, (model_obj.n_id, model_obj.n_exp, model_obj.n_albedo)
    base_attrs = {"generator": generator, "model": model_obj.name, "config_hash": chash}
    timings: dict[str, float] = {"write": 0.0, "wait": 0.0}
    n_rendered = 0
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - sum(s.count for s in todo), unit="sample",
                   desc=out.name, smoothing=0.1, dynamic_ncols=True)
    try:
        if todo:
            job = _Job(int(seed), int(size), config)
            t_render = time.perf_counter()
            with _renderer(model_obj, model_spec, job,
                           min(workers, sum(s.count for s in todo)), executor,
                           ray_address) as render:
                results = iter(render([i for s in todo for i in range(s.start, s.stop)]))
                for shard in todo:
                    n_rendered += _write_shard(shard, results, (L, size, *dims), config,
                                               base_attrs, timings, bar, t_render)
    except TaskError as exc:
        what = (f"a rendering worker stopped unexpectedly ({exc})" if exc.worker_lost
                else f"sample {exc.item} could not be rendered ({exc.__cause__})")
        raise DatasetError(f"{out}: {what}; the complete shards are kept: run the same "
                           f"command again to continue") from exc
    finally:
        if bar is not None:
            bar.close()

    t0 = time.perf_counter()
    shard_rows = [(s.path.name, s.count) for s in plan]
    with atomic_path(out) as tmp:
        create_virtual_index(tmp, shard_rows, L, size, size, *dims,
                             {**base_attrs, "n_shards": len(plan)})
    summary = validate_file(out, check_data=False)
    index_json = save_json(_index_json_path(out), {
        "format": INDEX_FORMAT,
        "dataset": out.name,
        "created": now_iso(),
        "n": int(n),
        "shard_size": int(shard_size),
        "config_hash": chash,
        "shards": [{"path": s.path.name, "start": s.start, "stop": s.stop, "count": s.count,
                    "bytes": s.path.stat().st_size} for s in plan],
        "extras": list(EXTRAS),
        "generator": generator,
    })
    timings["index"] = time.perf_counter() - t0
    seconds = time.perf_counter() - t_start
    result = BuildResult(path=out, index_json=index_json, shards=[s.path for s in plan], n=n,
                         kept_shards=len(kept), built_shards=len(todo), rendered=n_rendered,
                         config_hash=chash, seconds=seconds, file_bytes=summary.file_bytes,
                         timings=timings)
    log.info("%s", result.summary())
    return result
