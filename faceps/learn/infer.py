"""Inference (paper section 4): a capture and two trained networks in, contract 2 out.

Pipeline of :func:`infer` (each stage is timed in :attr:`Inference.timings`):

1. ``load``: the ProxyNet and NormalNet weights and the morphable model
   (:func:`load_networks`; zero when preloaded networks are passed, as a server or a
   benchmark does).
2. ``landmarks``: the session's 68 landmarks, else the dlib detector
   (:func:`faceps.capture.get_landmarks`).
3. ``crop``: the crop exactly as the training crops were made
   (:func:`faceps.datasets.build.render_sample`): the square box of
   :func:`faceps.datasets.build.face_crop_box` around the landmarks (the mean of the
   training jitter: no jitter), its camera ``camera.cropped(x0, y0, side, side)
   .scaled((size, size))``, the images resampled to ``size`` x ``size`` by area averaging
   (the pixel-centre convention of :meth:`Camera.scaled`; zero outside the frame, like the
   black background of the synthetic renders). Intensities: the dataset's automatic
   exposure rule (the 99th percentile of the brightest image at 0.8; here over the crop,
   the dataset takes the face pixels); both networks divide their input by its own mean
   intensity, so this only keeps the values in the training range. ``size`` and the crop
   scale of each network come from its training data (:class:`CropSpec`: a ``crop.json``
   next to the weights, else the generator of the data file named by the run's
   ``run.json``), or from the configuration.
4. ``proxynet``: 3DMM coefficients and pose from the selected images and the crop's K.
5. ``render``: the proxy normal map and mask at the NormalNet crop with the render layer
   (:func:`faceps.learn.render_layer.render_proxy`), and the proxy's face region (the
   model's ``region`` attribute interpolated > 0.5, as the dataset's ``face_mask``).
6. ``normalnet``: normals at the crop from the selected images and the proxy normals.
7. ``paste``: the crop's normals back to the input resolution: every output pixel is
   mapped into the crop by ``K_crop K^-1`` (the inverse of the crop mapping), the
   face-masked normals and the mask are sampled bilinearly (OpenCV ``remap``: sample
   positions rounded to 1/32 of a crop pixel), the normals divided by the sampled mask and
   re-normalised; the region is where the sampled mask is >= 0.5 (the crop's face mask
   mapped back), intersected with the session mask, its largest connected part.
8. ``height_field``: the proxy depth rendered as Z0 (:func:`faceps.core.rasterize.rasterize`)
   and the depth whose normals match the pasted ones: Gauss-Newton on eq. 7 with Z0 as
   prior (:func:`faceps.optimize.heightfield.solve_height_field`, ``integrate="gn"``), or
   weighted least squares / Frankot-Chellappa integration of the log-depth gradients with
   the scale taken from Z0 (:mod:`faceps.optimize.integrate`, ``wls``, ``fc``). This runs
   at a working resolution (``depth_resolution``): by default the one at which the face
   has the NormalNet crop's pixel density (the normals carry no finer detail than the
   crop; about 413x310 for a 1600x1200 capture and 256 px crops), then the depth is
   upsampled bilinearly to the input resolution. ``"full"`` solves at the input
   resolution (several seconds at 1600x1200).
9. ``albedo``: when the session gives calibrated lights, the closed-form least-squares
   albedo of eq. 1 per pixel and channel from the selected images, the inferred normals
   and the back-projected depth (saturated samples left out); NaN where no selected light
   reaches the pixel, and NaN everywhere when the session has no lights (the networks do
   not estimate albedo).

:func:`write_inference` writes contract 2 of DESIGN.md plus ``report.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceps.capture.session import Capture
from faceps.core.atomic import plain_json
from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FacepsError, FitError, ShapeError, check_shape
from faceps.core.lights import PointLights
from faceps.core.threads import torch_threads
from faceps.learn.checkpoint import (
    CheckpointError,
    LoadedNetwork,
    load_network,
    model_matches,
    model_signature,
    require_model,
    resolve_weights,
)
from faceps.learn.normalnet import check_passes, default_passes
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.optimize.heightfield import HeightFieldConfig
from faceps.optimize.proxy import ProxyFit

log = logging.getLogger(__name__)

__all__ = [
    "INTEGRATORS",
    "CROP_FILE",
    "CROP_FORMAT",
    "DEFAULT_CROP_SIZE",
    "CropSpec",
    "InferConfig",
    "InferenceNetworks",
    "Inference",
    "default_weights_dir",
    "network_files",
    "training_crop",
    "load_networks",
    "crop_box",
    "crop_camera",
    "crop_images",
    "map_pixels",
    "paste_crop",
    "infer",
    "write_inference",
]

#: depth recovery methods: Gauss-Newton eq. 7, weighted least squares, Frankot-Chellappa
INTEGRATORS = ("gn", "wls", "fc")
#: optional file next to weights files giving the crop they were trained with
CROP_FILE = "crop.json"
CROP_FORMAT = "faceps.crop/1"
#: crop resolution assumed when the training data cannot be found (the dataset default)
DEFAULT_CROP_SIZE = 256
#: file names of the two networks in a weights folder (the shipped layout)
WEIGHT_FILES = {"proxy": "proxy.pt", "normal": "normal.pt"}
#: the dataset's automatic exposure: this percentile of the brightest image at this level
EXPOSURE_PERCENTILE = 99.0
EXPOSURE_TARGET = 0.8
#: a pixel is in the pasted region when the bilinearly sampled crop mask reaches this
PASTE_THRESHOLD = 0.5
#: share of a crop outside the image above which the report warns
MAX_OUTSIDE = 0.05
#: fewest pixels of a usable face region (at the working resolution)
MIN_REGION_PX = 100
_DEPTH_RESOLUTIONS = ("crop", "full")
#: where the proxy of :func:`infer` comes from (:attr:`InferConfig.proxy`)
PROXY_SOURCES = ("proxynet", "landmarks")
_NAMES = {"proxy": "ProxyNet", "normal": "NormalNet"}


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class CropSpec:
    """How a network's training crops were framed.

    Attributes:
        size: crop resolution in pixels (square).
        scale: crop side / larger side of the landmarks' bounding box
            (:func:`faceps.datasets.build.face_crop_box`).
        source: where the values come from (the training data file, a ``crop.json``, the
            configuration, or ``default``).
    """

    size: int
    scale: float
    source: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or int(self.size) < 16:
            raise ConfigError(f"crop size must be an integer >= 16; got {self.size!r}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"crop scale must be > 0; got {self.scale!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def key(self) -> tuple[int, float]:
        """(size, scale): crops with equal keys are identical."""
        return (self.size, self.scale)


@dataclass(frozen=True)
class InferConfig:
    """Options of :func:`infer`.

    Attributes:
        num_images: use the first K images in session order (1..L; None: all). With
            ``images`` it must equal their count.
        images: names of the lights whose images to use, in this order (None: see
            ``num_images``).
        weights: a folder with ``proxy.pt`` and ``normal.pt`` (the shipped layout), or with
            the training run folders ``proxy/`` and ``normal/``; None: the shipped weights
            (:func:`default_weights_dir`).
        proxy_weights, normal_weights: a run folder or ``.pt`` file for one network,
            overriding ``weights`` for it.
        integrate: depth from normals: ``gn`` (Gauss-Newton on eq. 7 with the proxy depth
            as prior), ``wls`` or ``fc`` (:mod:`faceps.optimize.integrate`). ``wls``
            weighs each pixel by ``1 / (1 + wls_lambda W)`` when the normal network
            predicts the depth-gradient magnitude W (``grad_head``; the WLS paper's eq. 6).
        wls_lambda: lambda of that weight (the paper's optimum, 0.1).
        arch: the normal network's architecture (:mod:`faceps.learn.archs`): None takes
            whatever the normal weights are; a name picks the shipped ``normal-ARCH.pt``
            (``normal.pt`` for ``facepsnet``) unless ``normal_weights``/``weights`` say
            otherwise, and the loaded network must be of that architecture.
        height_field: options of the ``gn`` solve.
        depth_resolution: where the depth is solved: ``crop`` (the resolution at which the
            face has the NormalNet crop's pixel density, at most the input's), ``full``
            (the input resolution), or an integer: the longer image side in pixels (as
            ``ReconstructConfig.max_size``). The depth is upsampled to the input
            resolution.
        crop_size, crop_scale: override the crop resolution / scale of both networks
            (None: from their training data, :class:`CropSpec`).
        landmarks: ``auto`` (the session's, else the detector), ``session`` or ``dlib``.
        proxy: where the proxy comes from: ``proxynet`` (the paper: the network's
            coefficients and pose) or ``landmarks`` (the morphable model fitted to the 68
            landmarks, :func:`faceps.optimize.proxy.fit_landmarks`, about 15 ms; a
            geometric fit that does not depend on what faces ProxyNet was trained on;
            see bench/RESULTS.md for both on faces of another morphable model).
        passes: NormalNet passes, each after the first with the previous estimate as the
            proxy input (None: with ``proxy="proxynet"`` what the NormalNet was trained
            for, :func:`faceps.learn.normalnet.default_passes`; with ``landmarks`` one, as
            the landmark fit's proxy is closer than the first estimate).
        albedo: estimate the albedo in closed form when the session has lights (False:
            NaN albedo).
        device: ``cpu``, ``cuda``, ... or ``auto``.
        threads: torch intra-op threads during the call (None: unchanged).
    """

    num_images: int | None = None
    images: tuple[str, ...] | None = None
    weights: str | None = None
    proxy_weights: str | None = None
    normal_weights: str | None = None
    integrate: str = "gn"
    wls_lambda: float = 0.1
    arch: str | None = None
    # depth breaks (HeightFieldConfig.break_ratio) were measured for the optimisation
    # pipeline only; the network path keeps every neighbour coupled until they are measured
    # here too
    height_field: HeightFieldConfig = field(
        default_factory=lambda: HeightFieldConfig(break_ratio=0.0))
    depth_resolution: str | int = "crop"
    crop_size: int | None = None
    crop_scale: float | None = None
    landmarks: str = "auto"
    proxy: str = "proxynet"
    passes: int | None = None
    albedo: bool = True
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.num_images is not None:
            if isinstance(self.num_images, bool) or not isinstance(
                    self.num_images, int | np.integer) or self.num_images < 1:
                raise ConfigError(f"num_images must be an integer >= 1 or None; got "
                                  f"{self.num_images!r}")
            s(self, "num_images", int(self.num_images))
        if self.images is not None:
            names = (self.images,) if isinstance(self.images, str) else tuple(self.images)
            names = tuple(str(n) for n in names)
            if not names:
                raise ConfigError("images must name at least one light")
            if len(set(names)) != len(names):
                raise ConfigError(f"images names a light twice: {names}")
            if self.num_images is not None and self.num_images != len(names):
                raise ConfigError(f"num_images is {self.num_images} but images names "
                                  f"{len(names)} lights {names}")
            s(self, "images", names)
        for name in ("weights", "proxy_weights", "normal_weights"):
            v = getattr(self, name)
            if v is not None:
                s(self, name, str(v))
        if self.arch is not None:
            from faceps.learn.archs import ARCHS

            if self.arch not in ARCHS:
                raise ConfigError(f"arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if not (isinstance(self.wls_lambda, int | float) and self.wls_lambda >= 0):
            raise ConfigError(f"wls_lambda must be a number >= 0; got {self.wls_lambda!r}")
        if self.integrate not in INTEGRATORS:
            raise ConfigError(f"integrate must be one of {INTEGRATORS}; got "
                              f"{self.integrate!r}")
        if isinstance(self.height_field, dict):
            s(self, "height_field", HeightFieldConfig(**self.height_field))
        if not isinstance(self.height_field, HeightFieldConfig):
            raise ConfigError("height_field must be a HeightFieldConfig")
        dr = self.depth_resolution
        if isinstance(dr, str) and dr.isdigit():
            dr = int(dr)
        if isinstance(dr, bool) or not (dr in _DEPTH_RESOLUTIONS or (
                isinstance(dr, int | np.integer) and dr >= 64)):
            raise ConfigError(f"depth_resolution must be 'crop', 'full' or an integer >= 64 "
                              f"(pixels); got {self.depth_resolution!r}")
        s(self, "depth_resolution", dr if isinstance(dr, str) else int(dr))
        if self.crop_size is not None:
            CropSpec(self.crop_size, 1.0)
            s(self, "crop_size", int(self.crop_size))
        if self.crop_scale is not None:
            CropSpec(DEFAULT_CROP_SIZE, self.crop_scale)
            s(self, "crop_scale", float(self.crop_scale))
        if self.proxy not in PROXY_SOURCES:
            raise ConfigError(f"proxy must be one of {PROXY_SOURCES}; got {self.proxy!r}")
        if self.landmarks not in ("auto", "session", "dlib"):
            raise ConfigError(f"landmarks must be 'auto', 'session' or 'dlib'; got "
                              f"{self.landmarks!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or int(
                self.threads) < 1):
            raise ConfigError(f"threads must be None or an integer >= 1; got {self.threads!r}")
        if self.passes is not None:
            s(self, "passes", check_passes(self.passes))
        s(self, "albedo", bool(self.albedo))

    def replace(self, **changes: Any) -> InferConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the options."""
        return json.loads(json.dumps(asdict(self)))


# ------------------------------------------------------------------ weights
def default_weights_dir(check: bool = True) -> Path:
    """The shipped weights: ``faceps/learn/weights/`` inside the package, holding
    ``proxy.pt`` and ``normal.pt`` (and optionally ``crop.json``).

    Args:
        check: raise when the files are missing (False: only return the path).

    Raises:
        FacepsError: naming the folder and the ``--weights`` option, when ``check`` and
            either file is missing.
    """
    path = Path(__file__).resolve().parent / "weights"
    if check:
        missing = [n for n in WEIGHT_FILES.values() if not (path / n).is_file()]
        if missing:
            raise FacepsError(
                f"no shipped network weights: {path} lacks {' and '.join(missing)}; train the "
                f"networks (faceps train proxy ... / faceps train normal ...) and pass their "
                f"folder with --weights RUN (holding proxy.pt and normal.pt, or the run "
                f"folders proxy/ and normal/), or copy the weights files into {path}")
    return path


def network_files(config: InferConfig | None = None) -> dict[str, Path]:
    """The weights file of each network (``proxy``, ``normal``) for ``config``.

    A weights folder holds ``proxy.pt`` and ``normal.pt``, or the training run folders
    ``proxy/`` and ``normal/`` (their ``best.pt``, else ``weights.pt``, else
    ``checkpoint.pt``); ``proxy_weights`` / ``normal_weights`` override one network.

    Raises:
        FacepsError: no shipped weights (:func:`default_weights_dir`).
        CheckpointError: a network's weights are not found (the message names the folder
            and what was looked for).
    """
    config = config or InferConfig()
    explicit = {"proxy": config.proxy_weights, "normal": config.normal_weights}
    root: Path | None = None
    if config.weights is not None:
        root = Path(config.weights)
        if root.is_file():
            raise CheckpointError(
                f"{root}: --weights needs a folder holding proxy.pt and normal.pt (or the "
                f"run folders proxy/ and normal/); one file holds only one network (use "
                f"proxy_weights / normal_weights for single files)")
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such weights folder")
    elif not all(explicit.values()):
        root = default_weights_dir()
    files: dict[str, Path] = {}
    for kind in ("proxy", "normal"):
        if explicit[kind]:
            files[kind] = resolve_weights(explicit[kind])
            continue
        assert root is not None
        flat, run = root / WEIGHT_FILES[kind], root / kind
        if kind == "normal" and config.arch not in (None, "facepsnet"):
            flat, run = root / f"normal-{config.arch}.pt", root / f"normal-{config.arch}"
            if not (flat.is_file() or run.is_dir()):
                raise CheckpointError(
                    f"{root}: no {config.arch} normal network: expected {flat.name} or a "
                    f"run folder {run.name}/; train one (faceps train normal --arch "
                    f"{config.arch} ...) and pass it with --normal-weights RUN")
        if flat.is_file():
            files[kind] = flat
        elif run.is_dir():
            files[kind] = resolve_weights(run)
        else:
            single = [n for n in ("checkpoint.pt", "weights.pt", "best.pt")
                      if (root / n).is_file()]
            hint = (f" ({root} looks like a single training run: infer needs both networks)"
                    if single else "")
            raise CheckpointError(f"{root}: no {_NAMES[kind]} weights: expected "
                                  f"{WEIGHT_FILES[kind]} or a run folder {kind}/{hint}")
    return files


def _dataset_generator(data: Path) -> dict | None:
    """The ``generator`` attribute of a contract-4 file (or of a split's file), or None."""
    import h5py

    try:
        if data.suffix.lower() == ".json":
            from faceps.datasets.torch_data import load_split

            data = Path(load_split(data).dataset)
        with h5py.File(data, "r") as f:
            gen = f.attrs.get("generator")
        if isinstance(gen, bytes):
            gen = gen.decode()
        gen = json.loads(gen) if gen else None
    except (OSError, ValueError, KeyError, FacepsError):
        return None
    return gen if isinstance(gen, dict) else None


def _crop_from_file(path: Path, kind: str) -> CropSpec | None:
    """The crop of ``kind`` in a ``crop.json`` (top-level ``size``/``scale``, optionally
    overridden per network under ``proxy``/``normal``), or None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format", CROP_FORMAT) != CROP_FORMAT:
        raise ConfigError(f"{path}: not a crop file (expected format '{CROP_FORMAT}')")
    values = {k: data[k] for k in ("size", "scale") if k in data}
    values.update({k: v for k, v in dict(data.get(kind) or {}).items() if k in ("size",
                                                                                 "scale")})
    if "size" not in values:
        return None
    from faceps.datasets.build import DEFAULT_CROP_SCALE

    try:
        return CropSpec(int(values["size"]), float(values.get("scale", DEFAULT_CROP_SCALE)),
                        str(path))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid crop ({exc})") from None


def training_crop(weights_file: str | os.PathLike, kind: str,
                  recorded: dict[str, Any] | None = None) -> CropSpec | None:
    """The crop a network was trained with: ``crop.json`` next to its weights file, else
    the crop ``recorded`` in the file itself (exported weights,
    :attr:`LoadedNetwork.crop`), else the generator of the training data named by the
    run's ``run.json``; None if none of them says."""
    weights_file = Path(weights_file)
    spec = _crop_from_file(weights_file.parent / CROP_FILE, kind)
    if spec is not None:
        return spec
    if recorded and "size" in recorded:
        from faceps.datasets.build import DEFAULT_CROP_SCALE

        try:
            return CropSpec(int(recorded["size"]),
                            float(recorded.get("scale", DEFAULT_CROP_SCALE)),
                            f"{weights_file} ({recorded.get('source') or 'recorded'})")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{weights_file}: field 'crop' is invalid ({exc})") from None
    run_json = weights_file.parent / "run.json"
    if not run_json.is_file():
        return None
    try:
        data = json.loads(run_json.read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    if not data:
        return None
    data = Path(data)
    if not data.exists() and not data.is_absolute():
        data = weights_file.parent / data         # recorded relative to another folder
    gen = _dataset_generator(data)
    if gen is None or "size" not in gen:
        return None
    from faceps.datasets.build import DEFAULT_CROP_SCALE

    scale = dict(gen.get("config") or {}).get("crop_scale", DEFAULT_CROP_SCALE)
    return CropSpec(int(gen["size"]), float(scale), f"training data {data}")


@dataclass
class InferenceNetworks:
    """The two networks, their morphable model and crops, ready for :func:`infer`.

    Attributes:
        proxy, normal: the loaded ProxyNet and NormalNet (eval mode, on ``device``).
        model: the morphable model ProxyNet was trained with.
        proxy_crop, normal_crop: the crop of each network's input.
        device: where the networks run.
        warnings: what the caller should know (defaulted crops, model mismatches).
        seconds: loading time.
    """

    proxy: LoadedNetwork
    normal: LoadedNetwork
    model: MorphableModel
    proxy_crop: CropSpec
    normal_crop: CropSpec
    device: torch.device
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """Plain-JSON summary for reports."""
        return {kind: {"weights": str(net.path), "crop": asdict(crop),
                       "model": net.model_name, "network": net.config.to_dict()}
                for kind, net, crop in (("proxy", self.proxy, self.proxy_crop),
                                        ("normal", self.normal, self.normal_crop))}


def _resolve_device(device: str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None


def load_networks(config: InferConfig | None = None, *, model: MorphableModel | None = None
                  ) -> InferenceNetworks:
    """Load ProxyNet and NormalNet for inference (the start-up of :func:`infer`).

    Args:
        config: which weights, crops and device (:class:`InferConfig`).
        model: the morphable model (default: the one named in ProxyNet's training
            configuration, ``builtin`` or a ``.npz`` path).

    Returns:
        :class:`InferenceNetworks`.

    Raises:
        FacepsError: no shipped weights and no ``weights`` given.
        CheckpointError: missing or unreadable weights, a file of the other network kind,
            another architecture, or a ProxyNet trained with another morphable model.
    """
    from faceps.model import load_model

    config = config or InferConfig()
    t0 = time.perf_counter()
    files = network_files(config)
    device = _resolve_device(config.device)
    proxy = load_network(files["proxy"], kind="proxy", device=device)
    normal = load_network(files["normal"], kind="normal", device=device)
    if config.arch is not None:
        from faceps.learn.archs import arch_of

        got = arch_of(normal.network.config)
        if got != config.arch:
            raise CheckpointError(f"{normal.path}: holds a {got} normal network; arch "
                                  f"{config.arch} was asked for")
    if model is None:
        spec = str(proxy.train_config.get("model") or "builtin")
        try:
            model = load_model(spec)
        except (FacepsError, OSError) as exc:
            raise CheckpointError(f"{proxy.path}: cannot load its morphable model {spec!r} "
                                  f"({exc}); pass the model explicitly") from None
    require_model(proxy.model_entry, model, proxy.path)
    warnings: list[str] = []
    if not model_matches(normal.model_entry, model):
        warnings.append(f"the NormalNet ({normal.path}) was trained with proxies of morphable "
                        f"model '{normal.model_name}'; the ProxyNet's is '{model.name}'")
    from faceps.datasets.build import DEFAULT_CROP_SCALE

    crops = {}
    for kind, net in (("proxy", proxy), ("normal", normal)):
        found = training_crop(net.path, kind, net.crop)
        size = config.crop_size or (found.size if found else None)
        scale = config.crop_scale or (found.scale if found else None)
        assumed = []
        if size is None:
            size = DEFAULT_CROP_SIZE
            assumed.append(f"size {size}")
        if scale is None:
            scale = DEFAULT_CROP_SCALE
            assumed.append(f"scale {scale}")
        if assumed:
            source = "default"
            warnings.append(
                f"the {_NAMES[kind]} crop is not recorded with its weights ({net.path}: no "
                f"{CROP_FILE}, no crop in the file and no readable training data): "
                f"assuming the dataset "
                f"default {' and '.join(assumed)}; set crop_size / crop_scale if it was "
                f"trained otherwise")
        elif found is None or (config.crop_size and config.crop_scale):
            source = "configuration"
        elif config.crop_size or config.crop_scale:
            source = f"{found.source} (partly overridden by the configuration)"
        else:
            source = found.source
        crops[kind] = CropSpec(size, scale, source)
    if len(np.flatnonzero(np.asarray(model.landmarks68) >= 0)) < 5:
        warnings.append(f"model '{model.name}' has fewer than 5 landmark vertices: its "
                        f"training crops were framed by the face region, inference frames "
                        f"them by the image landmarks")
    for w in warnings:
        log.warning("%s", w)
    return InferenceNetworks(proxy=proxy, normal=normal, model=model,
                             proxy_crop=crops["proxy"], normal_crop=crops["normal"],
                             device=device, warnings=warnings,
                             seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------ crop geometry
def crop_box(landmarks: np.ndarray, spec: CropSpec) -> tuple[int, int, int]:
    """The training crop box around image landmarks (no jitter).

    Args:
        landmarks: (68, 2) pixels (u, v) of the input image (NaN rows ignored).
        spec: the crop.

    Returns:
        (x0, y0, side): the crop is ``[y0:y0+side, x0:x0+side]`` of the input (it may
        extend past the image).
    """
    from faceps.datasets.build import face_crop_box

    return face_crop_box(landmarks, spec.scale)


def crop_camera(camera: Camera, box: tuple[int, int, int], size: int) -> Camera:
    """The camera of the crop ``box`` resized to ``size`` x ``size`` (as the dataset
    builder: ``camera.cropped(x0, y0, side, side).scaled((size, size))``)."""
    x0, y0, side = box
    return camera.cropped(x0, y0, side, side).scaled((size, size))


def map_pixels(uv: np.ndarray, source: Camera, target: Camera) -> np.ndarray:
    """Pixel positions of one camera in another with the same centre and orientation
    (crops and rescalings of one camera): ``K_target K_source^-1 (u, v, 1)``.

    Args:
        uv: (..., 2) pixels (u, v) of ``source``.
        source, target: the cameras.

    Returns:
        (..., 2) float64 pixels of ``target``.
    """
    uv = np.asarray(uv, np.float64)
    check_shape(uv, "uv", (2,), leading=True)
    A = target.K @ np.linalg.inv(source.K)
    return uv @ A[:2, :2].T + A[:2, 2]


def crop_images(images: np.ndarray, box: tuple[int, int, int], size: int,
                index: Sequence[int] | None = None) -> np.ndarray:
    """Crop images to ``box`` (zero outside the frame) and resize by area averaging.

    Args:
        images: (L, H, W, 3) float32 linear images.
        box: (x0, y0, side) from :func:`crop_box`.
        size: output resolution.
        index: which of the L images, in this order (None: all).

    Returns:
        (k, size, size, 3) float32; pixel (u', v') covers the input pixels
        ``x0 + [u', u' + 1) * side / size`` (the :meth:`Camera.scaled` convention).
    """
    import cv2

    check_shape(images, "images", (None, "H", "W", 3))
    L, H, W = images.shape[:3]
    index = list(range(L)) if index is None else [int(i) for i in index]
    x0, y0, side = (int(b) for b in box)
    out = np.empty((len(index), size, size, 3), np.float32)
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, H), max(x0, 0), min(x0 + side, W)
    for i, j in enumerate(index):
        if ya >= yb or xa >= xb:
            out[i] = 0.0
            continue
        src = images[j, ya:yb, xa:xb]
        if (ya, yb, xa, xb) != (y0, y0 + side, x0, x0 + side):
            padded = np.zeros((side, side, 3), np.float32)
            padded[ya - y0:yb - y0, xa - x0:xb - x0] = src
            src = padded
        out[i] = cv2.resize(np.ascontiguousarray(src, np.float32), (size, size),
                            interpolation=cv2.INTER_AREA)
    return out


def _resample_box(image: np.ndarray, source: Camera, target: Camera,
                  box: tuple[int, int, int, int]) -> np.ndarray:
    """Bilinear samples of a ``source`` map (h, w[, C]) at the ``target`` pixels of
    ``box`` (v0, v1, u0, u1), the cameras related by ``K_source K_target^-1`` (crops and
    rescalings of one camera); zero outside the source image."""
    import cv2

    v0, v1, u0, u1 = box
    A = source.K @ np.linalg.inv(target.K)
    map_x = (A[0, 0] * np.arange(u0, u1, dtype=np.float64)[None, :]
             + A[0, 1] * np.arange(v0, v1, dtype=np.float64)[:, None] + A[0, 2])
    map_y = np.broadcast_to(A[1, 1] * np.arange(v0, v1, dtype=np.float64)[:, None]
                            + A[1, 2], map_x.shape)
    return cv2.remap(np.asarray(image, np.float32), map_x.astype(np.float32),
                     map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _paste_box(values: np.ndarray, mask: np.ndarray, source: Camera, target: Camera,
               threshold: float, unit: bool
               ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """:func:`paste_crop` restricted to the target box the crop's mask maps to.

    Returns (values (h, w, C) float32 NaN outside the region, region (h, w) bool,
    (v0, v1, u0, u1) the box in target pixels; empty when nothing maps inside).
    """
    H, W = target.height, target.width
    C = values.shape[2]
    m = np.asarray(mask, np.float32)
    rows, cols = np.nonzero(m > 0)
    empty = (np.zeros((0, 0, C), np.float32), np.zeros((0, 0), bool), (0, 0, 0, 0))
    if rows.size == 0:
        return empty
    corners = np.array([[cols.min() - 1, rows.min() - 1], [cols.max() + 1, rows.max() + 1]],
                       np.float64)
    box = map_pixels(corners, source, target)
    u0 = int(np.clip(np.floor(box[:, 0].min()), 0, W))
    u1 = int(np.clip(np.ceil(box[:, 0].max()) + 1, 0, W))
    v0 = int(np.clip(np.floor(box[:, 1].min()), 0, H))
    v1 = int(np.clip(np.ceil(box[:, 1].max()) + 1, 0, H))
    if u0 >= u1 or v0 >= v1:
        return empty
    stack = np.concatenate([np.nan_to_num(np.asarray(values, np.float32)) * m[..., None],
                            m[..., None]], axis=2)
    sampled = _resample_box(stack, source, target, (v0, v1, u0, u1))
    if sampled.ndim == 2:
        sampled = sampled[..., None]
    weight = sampled[..., C]
    inside = weight >= threshold
    out = sampled[..., :C] / np.where(inside, weight, 1.0)[..., None]
    if unit:
        norm = np.sqrt(np.einsum("hwc,hwc->hw", out, out))
        inside &= norm > 0
        out /= np.where(inside, norm, 1.0)[..., None]
    out[~inside] = np.nan
    return out, inside, (v0, v1, u0, u1)


def paste_crop(values: np.ndarray, mask: np.ndarray, source: Camera, target: Camera,
               threshold: float = PASTE_THRESHOLD, unit: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Resample a masked crop map into another camera's image (bilinear, normalised).

    Every target pixel is mapped into the crop (``K_source K_target^-1``, the inverse of
    :func:`map_pixels`); ``values * mask`` and ``mask`` are sampled bilinearly and
    divided, so values outside the mask never leak in.

    Args:
        values: (h, w, C) float map of the crop camera ``source``.
        mask: (h, w) bool or float weights in [0, 1].
        source: the crop's camera (image_size (w, h)).
        target: the output camera (e.g. the input or a working resolution).
        threshold: a target pixel is in the region when the sampled mask reaches this.
        unit: re-normalise the sampled vectors to unit length (normal maps).

    Returns:
        (values (H, W, C) float32, NaN outside the region; region (H, W) bool).
    """
    check_shape(values, "values", (source.height, source.width, None))
    check_shape(mask, "mask", (source.height, source.width))
    H, W = target.height, target.width
    sub, inside, (v0, v1, u0, u1) = _paste_box(values, mask, source, target, threshold,
                                               unit)
    out = np.full((H, W, values.shape[2]), np.nan, np.float32)
    region = np.zeros((H, W), bool)
    out[v0:v1, u0:u1] = sub
    region[v0:v1, u0:u1] = inside
    return out, region


def _exposure(crops: np.ndarray) -> float:
    """The dataset's automatic exposure factor for cropped images (k, S, S, 3)."""
    brightest = int(np.argmax(crops.reshape(crops.shape[0], -1).mean(1)))
    ref = float(np.percentile(crops[brightest], EXPOSURE_PERCENTILE))
    return EXPOSURE_TARGET / ref if ref > 0 else 1.0


# ------------------------------------------------------------------ result
@dataclass
class Inference:
    """A capture reconstructed by the networks, at the input resolution (camera frame).

    Attributes:
        normals: (H, W, 3) float32 unit normals (n_z < 0 facing the camera); NaN outside.
        depth: (H, W) float32 z in mm; NaN outside.
        albedo: (H, W, 3) float32 linear albedo in the scale of the session's lights; NaN
            outside, where no selected light reaches a pixel, and everywhere when the
            session has no lights.
        mask: (H, W) bool reconstructed region (finite normals and depth).
        proxy: the ProxyNet prediction as a proxy fit (coefficients padded with zeros to
            the model's sizes; ``landmark_rmse_px`` against the landmarks used).
        crop_box: (x0, y0, side) input pixels of the NormalNet crop.
        crop_camera: the NormalNet crop's camera (``size`` x ``size``).
        crop_normals: (size, size, 3) float32 NormalNet output; NaN outside ``crop_mask``.
        crop_mask: (size, size) bool proxy face region at the crop.
        image_names: the lights of the images used, in the order used.
        landmarks: (68, 2) float64 the landmarks the crop was framed by.
        camera: the input camera.
        lights: the session's lights (all of them), or None.
        timings: seconds per stage: ``load``, ``landmarks``, ``crop``, ``proxynet``,
            ``render``, ``normalnet``, ``paste``, ``height_field``, ``albedo``, ``total``
            (everything) and ``session`` (``total`` without ``load``).
        report: plain-JSON report (sizes, crops, weights, timings, solver, warnings).
    """

    normals: np.ndarray
    depth: np.ndarray
    albedo: np.ndarray
    mask: np.ndarray
    proxy: ProxyFit
    crop_box: tuple[int, int, int]
    crop_camera: Camera
    crop_normals: np.ndarray
    crop_mask: np.ndarray
    image_names: tuple[str, ...]
    landmarks: np.ndarray
    camera: Camera
    lights: PointLights | None
    timings: dict[str, float]
    report: dict[str, Any]


# ------------------------------------------------------------------ helpers
def _select_images(capture: Capture, config: InferConfig) -> list[int]:
    names = list(capture.light_names)
    L = len(names)
    if config.images is not None:
        unknown = [n for n in config.images if n not in names]
        if unknown:
            raise ConfigError(f"{capture.root}: no image for light(s) {unknown}; the session "
                              f"has {names}")
        return [names.index(n) for n in config.images]
    k = L if config.num_images is None else config.num_images
    if k > L:
        raise ConfigError(f"{capture.root}: {k} images asked for, but the session has only "
                          f"{L} ({', '.join(names)})")
    return list(range(k))


def _working_camera(camera: Camera, config: InferConfig, crop_density: float) -> Camera:
    """The camera of the depth solve (see ``InferConfig.depth_resolution``);
    ``crop_density`` is the NormalNet crop's pixels per input pixel (size / side)."""
    W, H = camera.image_size
    dr = config.depth_resolution
    if dr == "full":
        s = 1.0
    elif dr == "crop":
        s = min(1.0, crop_density)
    else:
        s = min(1.0, float(dr) / max(W, H))
    if s >= 1.0:
        return camera
    return camera.scaled((max(1, round(W * s)), max(1, round(H * s))))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _render_depth(model: MorphableModel, vertices: torch.Tensor, camera: Camera,
                  region: np.ndarray) -> np.ndarray:
    """(H, W) float64 proxy depth (mm) over the bounding box of ``region``; NaN elsewhere
    and where the proxy is not seen from the front."""
    from faceps.core.rasterize import rasterize

    H, W = camera.height, camera.width
    depth = np.full((H, W), np.nan)
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return depth
    v0, v1, u0, u1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    K = camera.cropped(u0, v0, u1 - u0, v1 - v0).K
    tris = model.torch_tensors(vertices.device)["triangles"]
    frags = rasterize(vertices, tris, torch.as_tensor(K, dtype=vertices.dtype,
                                                      device=vertices.device),
                      (u1 - u0, v1 - v0))
    d = frags.depth[0].double()
    ok = frags.mask[0] & ~frags.backface[0]
    depth[v0:v1, u0:u1] = torch.where(ok, d, torch.full_like(d, float("nan"))).cpu().numpy()
    return depth


def _fill_nearest(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Values at invalid pixels replaced by the nearest valid pixel's (for resampling)."""
    from scipy import ndimage

    if valid.all():
        return values
    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return values[iy, ix]


def _integrate(method: str, normals: np.ndarray, depth0: np.ndarray, mask: np.ndarray,
               camera: Camera, config: InferConfig, grad_magnitude: np.ndarray | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Depth (H, W) float (NaN outside) from normals with ``method``, and a report
    (``wls`` weighs the pixels by ``1 / (1 + wls_lambda W)`` with a ``grad_magnitude``
    map W).

    ``gn``: Gauss-Newton on eq. 7 with ``depth0`` as the prior Z0 (``config.height_field``).
    ``wls`` / ``fc``: :func:`faceps.optimize.integrate.integrate_wls` /
    :func:`~faceps.optimize.integrate.integrate_frankot_chellappa` of the perspective
    log-depth gradients, the scale of each connected part fixed by ``depth0`` (median of
    ``depth0 / z``).
    """
    if method == "gn":
        from faceps.optimize.heightfield import solve_height_field

        hf = solve_height_field(normals, np.where(mask, depth0, np.nan), mask, camera,
                                config.height_field)
        info = {"method": "gn", "iterations": hf.iterations, "converged": hf.converged,
                "history": [float(c) for c in hf.history], "terms": hf.terms,
                "cg_iterations": list(hf.cg_iterations), "levels": hf.levels,
                "timings": hf.timings}
        return hf.depth, info
    from faceps.optimize.integrate import integrate_frankot_chellappa, integrate_wls

    z0 = np.where(mask, depth0, np.nan)
    if method == "wls":
        res = integrate_wls(normals, mask, camera, depth0=z0, gradient_magnitude=grad_magnitude,
                            lam=config.wls_lambda)
    else:
        res = integrate_frankot_chellappa(normals, mask, camera, depth0=z0)
    info = {"method": method, "function": res.method, "iterations": int(res.iterations),
            "gradient_weighted": grad_magnitude is not None,
            "scale": [float(v) for v in getattr(res, "scale", [])],
            "timings": {"total": float(res.time)}}
    return np.where(mask, res.depth, np.nan), info


def _albedo(images: np.ndarray, saturated: np.ndarray, index: Sequence[int],
            normals: np.ndarray, depth: np.ndarray, mask: np.ndarray, camera: Camera,
            box: tuple[int, int, int, int], lights: PointLights) -> np.ndarray:
    """Closed-form least-squares albedo of eq. 1 inside a box of the image.

    Per pixel and channel: ``rho = sum_j I_j s_j / sum_j s_j^2`` with ``s_j = beta_j
    max(0, n . (P_j - V)) / |P_j - V|^3 led_j(V)`` (as
    :func:`faceps.core.lights.point_irradiance`, in float32) over the selected images j
    whose sample is not saturated.

    Args:
        images: (L, H, W, 3) float32 linear images; saturated: (L, H, W) bool.
        index: the k selected images; ``lights`` are theirs, in that order.
        normals: (h, w, 3) unit normals of the box; depth: (h, w) z in mm;
        mask: (h, w) bool pixels to solve.
        camera: the input camera; box: (v0, v1, u0, u1) input pixels of the maps.
        lights: k point lights.

    Returns:
        (h, w, 3) float32 albedo; NaN outside the mask and where no light reaches.
    """
    v0, v1, u0, u1 = box
    W = camera.width
    out = np.full((v1 - v0, u1 - u0, 3), np.nan, np.float32)
    w = u1 - u0
    inside = np.flatnonzero(mask)                                  # flat ids in the box
    if inside.size == 0:
        return out
    vv, uu = np.divmod(inside, w)
    flat = (vv + v0) * W + (uu + u0)                               # flat ids in the image
    # one contiguous 1-D float32 array per coordinate: element-wise passes are cheap
    K = camera.K.astype(np.float32)
    y = (vv.astype(np.float32) + np.float32(v0 - K[1, 2])) / K[1, 1]
    x = (uu.astype(np.float32) + np.float32(u0 - K[0, 2]) - K[0, 1] * y) / K[0, 0]
    z = depth.reshape(-1)[inside].astype(np.float32)
    P = (x * z, y * z, z)                                          # mm, camera frame
    n = np.ascontiguousarray(normals.reshape(-1, 3)[inside].astype(np.float32).T)
    num = np.zeros((3, vv.size), np.float32)
    den = np.zeros((3, vv.size), np.float32)
    for j, i in enumerate(index):
        d = [np.float32(lights.positions[j, c]) - P[c] for c in range(3)]  # toward light
        dist2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        dist = np.sqrt(dist2)
        s = n[0] * d[0] + n[1] * d[1] + n[2] * d[2]
        np.maximum(s, 0.0, out=s)
        s /= dist2 * dist
        mu = float(lights.anisotropy[j])
        if mu > 0:
            a = lights.directions[j].astype(np.float32)
            cos = -(a[0] * d[0] + a[1] * d[1] + a[2] * d[2]) / dist
            s *= np.maximum(cos, 0.0) ** mu
        s *= ~saturated[i].reshape(-1)[flat]
        pixels = np.ascontiguousarray(images[i].reshape(-1, 3)[flat].T)   # (3, M)
        for c in range(3):
            sb = s * np.float32(lights.intensities[j, c])
            num[c] += pixels[c] * sb
            den[c] += sb * sb
    top = float(den.max()) if den.size else 0.0
    good = den > max(top, 1e-30) * 1e-8
    out.reshape(-1, 3)[inside] = np.where(good, num / np.where(good, den, 1.0), np.nan).T
    return out


def _proxy_fit(model: MorphableModel, pred: Any, landmarks: np.ndarray, camera: Camera,
               vertices: np.ndarray) -> ProxyFit:
    """The ProxyNet prediction as a :class:`faceps.optimize.proxy.ProxyFit`: coefficients
    padded with zeros to the model's sizes (ProxyNet may regress only leading ones),
    ``landmark_rmse_px`` of the proxy's landmark vertices (V, 3) against ``landmarks``."""
    a_id = np.zeros(model.n_id)
    a_exp = np.zeros(model.n_exp)
    pid = pred.alpha_id[0].detach().cpu().double().numpy()
    pexp = pred.alpha_exp[0].detach().cpu().double().numpy()
    a_id[:pid.size] = pid
    a_exp[:pexp.size] = pexp
    ids = np.asarray(model.landmarks68)
    ok = (ids >= 0) & np.all(np.isfinite(landmarks), 1)
    rmse = float("nan")
    if ok.any():
        uv = camera.project(vertices[ids[ok]])
        rmse = float(np.sqrt(np.mean((uv - landmarks[ok]) ** 2)))
    return ProxyFit(coefficients=Coefficients(a_id, a_exp, np.zeros(model.n_albedo)),
                    angles=pred.angles[0].detach().cpu().double().numpy(),
                    translation=pred.translation[0].detach().cpu().double().numpy(),
                    model_name=model.name, landmark_rmse_px=rmse, converged=True,
                    vertex_ids=np.where(ids >= 0, ids, -1))


def _landmark_proxy(model: MorphableModel, landmarks: np.ndarray, camera: Camera,
                    pred: Any) -> Any:
    """``pred`` (a ProxyNet output) with its coefficients and pose replaced by the model
    fitted to the landmarks in the input camera (the pose frame is the same: a crop only
    changes the intrinsics)."""
    from faceps.optimize.proxy import fit_landmarks

    fit = fit_landmarks(model, landmarks, camera)
    like = pred.alpha_id

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, np.float64)[None], dtype=like.dtype,
                               device=like.device)

    return dataclasses.replace(pred, alpha_id=t(fit.coefficients.id[:pred.alpha_id.shape[1]]),
                               alpha_exp=t(fit.coefficients.exp[:pred.alpha_exp.shape[1]]),
                               angles=t(fit.angles), translation=t(fit.translation))


# ------------------------------------------------------------------ inference
def infer(capture: Capture, config: InferConfig | None = None, *,
          model: MorphableModel | None = None, networks: InferenceNetworks | None = None
          ) -> Inference:
    """Reconstruct normals and depth (and albedo when the lights are known) of a capture
    with the two networks (module docstring for the stages).

    Args:
        capture: the ingested session (:func:`faceps.capture.load_session`).
        config: options (:class:`InferConfig`).
        model: the morphable model (default: the one ProxyNet was trained with).
        networks: preloaded networks (:func:`load_networks`) to skip the start-up; their
            weights, crops and device are used (``config``'s weights options are ignored).

    Returns:
        :class:`Inference` at the capture's resolution.

    Raises:
        ConfigError: invalid options (e.g. more images than the session has).
        FacepsError: no shipped weights; CheckpointError: unusable weights.
        FitError: no face found, or the face region is too small to reconstruct.
    """
    from faceps.capture.landmarks import default_detector, get_landmarks, needs_detector
    from faceps.core.rasterize import interpolate, rasterize
    from faceps.learn.proxynet import camera_vertices
    from faceps.learn.render_layer import render_proxy

    config = config or InferConfig()
    if not isinstance(capture, Capture):
        raise ShapeError(f"expected capture to be a faceps.capture.Capture; got "
                         f"{type(capture).__name__}")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    sel = _select_images(capture, config)
    with torch_threads(config.threads):
        if networks is None:
            t = time.perf_counter()
            networks = load_networks(config, model=model)
            timings["load"] = time.perf_counter() - t
        else:
            if model is not None and model is not networks.model and not model_matches(
                    {"signature": model_signature(networks.model)}, model):
                raise ConfigError(f"the model given ('{model.name}') is not the one the "
                                  f"networks were loaded with ('{networks.model.name}')")
            timings["load"] = 0.0
        warnings += networks.warnings
        model, dev = networks.model, networks.device
        names = tuple(capture.light_names[i] for i in sel)
        # a second pass gains over ProxyNet's proxies (15-30 deg off) and loses over a
        # landmark fit's (about 9 deg with precise landmarks): bench/RESULTS.md
        passes = (config.passes if config.passes is not None
                  else default_passes(networks.normal.train_config)
                  if config.proxy == "proxynet" else 1)

        # reading the detector's model files is start-up, like loading the networks
        t = time.perf_counter()
        detector = default_detector() if needs_detector(capture, config.landmarks) else None
        timings["load_detector"] = time.perf_counter() - t
        t = time.perf_counter()
        lm = get_landmarks(capture, config.landmarks, detector)
        landmarks = np.asarray(lm.points, np.float64)
        timings["landmarks"] = time.perf_counter() - t

        # ---- crops (one per distinct crop of the two networks)
        t = time.perf_counter()
        crops: dict[tuple[int, float], dict[str, Any]] = {}
        for spec in (networks.proxy_crop, networks.normal_crop):
            if spec.key in crops:
                continue
            box = crop_box(landmarks, spec)
            cam = crop_camera(capture.camera, box, spec.size)
            px = crop_images(capture.images, box, spec.size, sel)
            if not np.any(px > 0):
                raise FitError(f"{capture.root}: the face crop {box} of the selected images "
                               f"({', '.join(names)}) is black")
            exposure = _exposure(px)
            tensor = torch.from_numpy(np.ascontiguousarray(
                (px * np.float32(exposure)).transpose(0, 3, 1, 2)))[None].to(dev)
            x0, y0, side = box
            inside_w = max(0, min(x0 + side, capture.width) - max(x0, 0))
            inside_h = max(0, min(y0 + side, capture.height) - max(y0, 0))
            outside = 1.0 - inside_w * inside_h / float(side * side)
            crops[spec.key] = {"box": box, "camera": cam, "images": tensor,
                               "exposure": exposure, "outside": outside}
            if outside > MAX_OUTSIDE:
                warnings.append(f"{100 * outside:.0f} % of the {spec.size} px crop {box} "
                                f"lies outside the image (filled with zeros; the training "
                                f"crops had no border): is the face cut off?")
        pc, nc = crops[networks.proxy_crop.key], crops[networks.normal_crop.key]
        timings["crop"] = time.perf_counter() - t

        with torch.inference_mode():
            # ---- ProxyNet
            t = time.perf_counter()
            Kp = torch.as_tensor(pc["camera"].K, dtype=torch.float32, device=dev)[None]
            pred = networks.proxy.network(pc["images"], Kp)
            if config.proxy == "landmarks":
                pred = _landmark_proxy(model, landmarks, capture.camera, pred)
            V = camera_vertices(model, pred.alpha_id, pred.alpha_exp, pred.angles,
                                pred.translation)
            timings["proxynet"] = time.perf_counter() - t

            # ---- render layer at the NormalNet crop, and the proxy's face region
            t = time.perf_counter()
            ncam: Camera = nc["camera"]
            S = networks.normal_crop.size
            Kn = torch.as_tensor(ncam.K, dtype=torch.float32, device=dev)[None]
            proxy = render_proxy(model, pred.alpha_id, pred.alpha_exp, pred.angles,
                                 pred.translation, Kn, (S, S))
            frags = rasterize(V, model.torch_tensors(dev)["triangles"], Kn, (S, S))
            region_v = torch.as_tensor(model.region.astype(np.float32), device=dev)[:, None]
            face = (interpolate(region_v, frags)[0, ..., 0] > 0.5) & (proxy.mask[0] > 0)
            timings["render"] = time.perf_counter() - t

            # ---- NormalNet
            t = time.perf_counter()
            out = networks.normal.network(nc["images"], proxy.normals, None, proxy.mask,
                                          passes=passes)
            crop_n = out.normals[0].permute(1, 2, 0).float().cpu().numpy()
            crop_w = (out.aux["grad_magnitude"][0, 0].float().cpu().numpy()
                      if "grad_magnitude" in out.aux else None)
            timings["normalnet"] = time.perf_counter() - t
        if getattr(networks.normal.network, "single_image", False) and \
                nc["images"].shape[1] > 1:
            warnings.append(f"the normal network ({networks.normal.network.config.arch}) "
                            f"reads one image: it used {names[0]} of the "
                            f"{nc['images'].shape[1]} selected")

        crop_mask = face.cpu().numpy()
        if crop_mask.sum() < MIN_REGION_PX // 4:
            raise FitError(f"{capture.root}: the predicted proxy covers only "
                           f"{int(crop_mask.sum())} face pixels of the crop; nothing to "
                           f"reconstruct (is there a face at the landmarks?)")

        # ---- paste back to the input resolution (and the working resolution); the
        # full-resolution maps are handled inside the box the crop maps to
        t = time.perf_counter()
        cam = capture.camera
        H, W = cam.height, cam.width
        nb, rb, box = _paste_box(crop_n, crop_mask, ncam, cam, PASTE_THRESHOLD, unit=True)
        v0, v1, u0, u1 = box
        if capture.mask is not None:
            rb &= capture.mask[v0:v1, u0:u1]
        rb = _largest_component(rb)
        work = _working_camera(cam, config, S / nc["box"][2])
        if work is cam:
            wn = np.full((H, W, 3), np.nan, np.float32)
            wregion = np.zeros((H, W), bool)
            wn[v0:v1, u0:u1] = nb
            wregion[v0:v1, u0:u1] = rb
        else:
            wn, wregion = paste_crop(crop_n, crop_mask, ncam, work, unit=True)
            if capture.mask is not None:
                import cv2

                wregion &= cv2.resize(capture.mask.astype(np.float32), work.image_size,
                                      interpolation=cv2.INTER_AREA) >= 0.5
            wregion = _largest_component(wregion)
        timings["paste"] = time.perf_counter() - t

        # ---- depth: proxy Z0 and the height field at the working resolution
        t = time.perf_counter()
        z0 = _render_depth(model, V, work, wregion)
        wmask = _largest_component(wregion & np.isfinite(z0))
        if wmask.sum() < MIN_REGION_PX:
            raise FitError(f"{capture.root}: the face region has only {int(wmask.sum())} "
                           f"pixels at the working resolution {work.image_size}; nothing "
                           f"to reconstruct")
        wn = np.where(wmask[..., None], wn, np.nan).astype(np.float32)
        grad_w = None
        if crop_w is not None and config.integrate == "wls":
            # W is a slope (dimensionless): it pastes to any resolution unchanged
            grad_w, _ = paste_crop(crop_w[..., None], crop_mask, ncam, work)
            grad_w = np.where(wmask, np.nan_to_num(grad_w[..., 0]), 0.0)
        try:
            wdepth, hf_info = _integrate(config.integrate, wn, np.where(wmask, z0, np.nan),
                                         wmask, work, config, grad_w)
        except (RuntimeError, ArithmeticError, np.linalg.LinAlgError) as exc:
            raise FitError(f"{capture.root}: the depth solve ({config.integrate}) failed at "
                           f"{work.image_size[0]}x{work.image_size[1]}: {exc}; try another "
                           f"integrate method or depth_resolution") from exc
        if hf_info.get("converged") is False:
            warnings.append(f"the height field did not converge in "
                            f"{hf_info.get('iterations')} iterations")
        wvalid = wmask & np.isfinite(wdepth)
        if work is cam:
            db = wdepth[v0:v1, u0:u1]
            mb = rb & wvalid[v0:v1, u0:u1]
        else:
            # bilinear upsampling (holes filled from the nearest pixel first, so none
            # bleeds in), only where the working region reaches: no extrapolation
            filled = _fill_nearest(np.where(wvalid, wdepth, 0.0), wvalid)
            db = _resample_box(filled, work, cam, box)
            reach = _resample_box(wvalid.astype(np.float32), work, cam, box)
            mb = rb & (reach > 0)
        mb &= np.isfinite(db)
        depth = np.full((H, W), np.nan, np.float32)
        normals = np.full((H, W, 3), np.nan, np.float32)
        mask = np.zeros((H, W), bool)
        depth[v0:v1, u0:u1] = np.where(mb, db, np.nan)
        normals[v0:v1, u0:u1] = np.where(mb[..., None], nb, np.nan)
        mask[v0:v1, u0:u1] = mb
        timings["height_field"] = time.perf_counter() - t

        # ---- albedo (closed form, when the lights are known)
        t = time.perf_counter()
        albedo = np.full((H, W, 3), np.nan, np.float32)
        if config.albedo and capture.lights is not None:
            albedo[v0:v1, u0:u1] = _albedo(capture.images, capture.saturated, sel, nb, db,
                                           mb, cam, box, capture.lights.select(sel))
        elif config.albedo:
            warnings.append("the session has no calibrated lights: albedo.npy is NaN (the "
                            "networks do not estimate albedo)")
        timings["albedo"] = time.perf_counter() - t

    verts = V[0].detach().cpu().double().numpy()
    fit = _proxy_fit(model, pred, landmarks, cam, verts)
    from faceps.optimize.heightfield import height_field_normals

    gap = np.array([])
    hf_normals = None
    with contextlib.suppress(FacepsError, ValueError):
        hf_normals = height_field_normals(np.where(wvalid, wdepth, np.nan), work)
    if hf_normals is not None:
        both = wvalid & np.all(np.isfinite(hf_normals), -1) & np.all(np.isfinite(wn), -1)
        cos = np.clip(np.einsum("ij,ij->i", hf_normals[both], wn[both]), -1, 1)
        gap = np.degrees(np.arccos(cos))
    crop_normals = np.where(crop_mask[..., None], crop_n, np.nan).astype(np.float32)
    timings["total"] = time.perf_counter() - t_all
    timings["session"] = timings["total"] - timings["load"] - timings["load_detector"]
    report = {
        "format": "faceps.infer-report/1",
        "input_size": list(cam.image_size),
        "working_size": list(work.image_size),
        "pixels": int(mask.sum()),
        "images": list(names),
        "landmarks": {"source": lm.source, "score": lm.score},
        "crops": {kind: {"box": list(crops[spec.key]["box"]), "size": spec.size,
                         "scale": spec.scale, "source": spec.source,
                         "exposure": crops[spec.key]["exposure"],
                         "outside_fraction": crops[spec.key]["outside"]}
                  for kind, spec in (("proxy", networks.proxy_crop),
                                     ("normal", networks.normal_crop))},
        "networks": networks.describe(),
        "model": model.name,
        "proxy": {"landmark_rmse_px": fit.landmark_rmse_px},
        "crop_face_pixels": int(crop_mask.sum()),
        "normalnet_passes": int(passes),
        "height_field": {**_plain(hf_info), "normal_gap_deg": {
            "mean": float(np.mean(gap)) if gap.size else None,
            "median": float(np.median(gap)) if gap.size else None}},
        "albedo": ("closed form from the session's lights" if config.albedo and
                   capture.lights is not None else "none (NaN)"),
        "timings": timings,
        "warnings": warnings,
        "config": config.to_dict(),
        "device": str(dev),
        "threads": torch.get_num_threads() if config.threads is None else config.threads,
    }
    log.info("inference: %d pixels, %d image(s), %.3f s (%.3f s without loading)",
             int(mask.sum()), len(sel), timings["total"], timings["session"])
    return Inference(normals=normals, depth=depth, albedo=albedo, mask=mask, proxy=fit,
                     crop_box=tuple(int(b) for b in nc["box"]), crop_camera=ncam,
                     crop_normals=crop_normals, crop_mask=crop_mask, image_names=names,
                     landmarks=landmarks, camera=cam, lights=capture.lights,
                     timings=timings, report=report)


def _plain(obj: Any) -> Any:
    """Plain JSON values (numpy scalars and arrays become numbers and lists, other objects
    their ``str``)."""
    return plain_json(obj, strings=True)


# ------------------------------------------------------------------ outputs
def write_inference(out_dir: str | os.PathLike, inf: Inference, capture: Capture
                    ) -> dict[str, Path]:
    """Write contract 2 of DESIGN.md for an inference under ``out_dir`` (atomic files).

    Files: ``normals.npy``, ``depth.npy``, ``albedo.npy`` (float32, NaN outside),
    ``mask.png``, ``lights.json`` (the session's lights, or ``{"lights": {}}``),
    ``proxy.json`` (the ProxyNet parameters in the schema of the optimisation pipeline,
    plus ``source`` and ``weights``), ``mesh.ply`` (the triangulated depth with per-vertex
    normals; colours from the albedo preview, or the shading preview without albedo),
    ``normals.png``, ``albedo.png``, ``shading.png`` and ``report.json``.

    Args:
        out_dir: the output folder (created).
        inf: the result of :func:`infer`.
        capture: the capture it was computed from (its lights and camera).

    Returns:
        the written files by name.
    """
    from faceps.core.atomic import save_json, save_npy, save_ply, save_png
    from faceps.core.imageio import normals_to_rgb
    from faceps.optimize.reconstruct import albedo_preview, height_field_mesh, shading_preview

    if capture.camera.image_size != inf.camera.image_size:
        raise ShapeError(f"the capture's size {capture.camera.image_size} is not the "
                         f"inference's {inf.camera.image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lights = capture.lights.to_dict() if capture.lights is not None else {}
    proxy = inf.proxy.to_dict()
    proxy.pop("timings", None)
    source = str(inf.report.get("config", {}).get("proxy", "proxynet"))
    proxy.update(source=source, weights=inf.report.get("networks", {})
                 .get("proxy", {}).get("weights") if source == "proxynet" else None)
    files = {
        "normals": save_npy(out / "normals.npy", inf.normals.astype(np.float32)),
        "depth": save_npy(out / "depth.npy", inf.depth.astype(np.float32)),
        "albedo": save_npy(out / "albedo.npy", inf.albedo.astype(np.float32)),
        "mask": save_png(out / "mask.png", inf.mask.astype(np.uint8) * 255),
        "lights": save_json(out / "lights.json", {"lights": lights}),
        "proxy": save_json(out / "proxy.json", proxy),
    }
    albedo_png = albedo_preview(inf.albedo, inf.mask)
    shading_png = shading_preview(inf.normals, inf.mask)
    files["normals_png"] = save_png(out / "normals.png", normals_to_rgb(inf.normals))
    files["albedo_png"] = save_png(out / "albedo.png", albedo_png)
    files["shading_png"] = save_png(out / "shading.png", shading_png)
    t = time.perf_counter()
    has_albedo = bool(np.any(np.isfinite(inf.albedo[inf.mask])))
    mesh = height_field_mesh(inf.depth, inf.camera, inf.normals,
                             albedo_png if has_albedo else shading_png)
    files["mesh"] = save_ply(out / "mesh.ply", mesh)
    report = dict(inf.report)
    report["timings"] = {**report["timings"], "write_mesh": time.perf_counter() - t}
    report["mesh"] = {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
    files["report"] = save_json(out / "report.json", report)
    return files

