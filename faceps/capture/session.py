"""Capture sessions (DESIGN.md, contract 1, format ``faceps.session/1``): reading and writing.

:func:`load_session` validates a session folder and returns a :class:`Capture` holding
linear, ambient-free, undistorted float32 images at the stored resolution, the camera at
that resolution (zero distortion), per-image saturation masks and the optional mask,
landmarks and lights. Every problem with the input raises a
:class:`~faceps.core.errors.SessionError` naming the file and the JSON field.

:func:`write_session` writes a session from linear images (PNG, 8-bit or 16-bit) through the
atomic writers, ``session.json`` last, so a folder with a ``session.json`` is complete.

Landmark files are iBUG ``.pts`` files or JSON lists of [u, v]. The iBUG ``.pts`` format
counts pixels from 1 (the centre of the top-left pixel is (1, 1), as in the 300-W
annotations), so :func:`read_landmarks` subtracts :data:`PTS_ORIGIN` and
:func:`write_landmarks_pts` adds it; JSON files hold the project's 0-based pixel coordinates
(DESIGN.md conventions: pixel centres at integer coordinates, the top-left one at (0, 0)).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceps.core.atomic import atomic_path, save_json, save_png
from faceps.core.camera import Camera
from faceps.core.color import decode, encode, parse_encoding
from faceps.core.errors import (
    ConfigError,
    FacepsError,
    SessionError,
    ShapeError,
    check_finite,
    check_shape,
)
from faceps.core.imageio import ImageReadError, read_image
from faceps.core.lights import PointLights

__all__ = [
    "SESSION_FORMAT",
    "SESSION_FILE",
    "N_LANDMARKS",
    "PTS_ORIGIN",
    "SATURATION_LEVEL",
    "PARTIAL_CLIP_SHARE",
    "Capture",
    "load_session",
    "write_session",
    "read_landmarks",
    "write_landmarks_pts",
    "keeps_clipped_channels",
]

log = logging.getLogger(__name__)

#: the ``format`` value of contract 1
SESSION_FORMAT = "faceps.session/1"
#: name of the session description inside a session folder
SESSION_FILE = "session.json"
#: number of iBUG landmarks a session's landmark file holds
N_LANDMARKS = 68
#: pixel coordinate of the top-left pixel centre in iBUG ``.pts`` files
PTS_ORIGIN = 1.0
#: a stored code value at or above this fraction of full scale counts as saturated
SATURATION_LEVEL = 0.995
#: share of samples clipped in some channels only from which the solvers keep their
#: unclipped channels (fewer are dropped whole: not worth the per-channel path)
PARTIAL_CLIP_SHARE = 0.02
#: accepted numbers of lens distortion coefficients (OpenCV)
DISTORTION_SIZES = (4, 5, 8, 12, 14)

_INTEGER_DEPTHS = ("8", "16")
_DEFAULT_ENCODING = {"8": "srgb", "16": "linear", "float": "linear"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


# ======================================================================= Capture
@dataclass
class Capture:
    """One capture: L images of a face under L lights, ready for the pipeline.

    Attributes:
        root: folder of the session (paths in ``session.json`` are relative to it).
        camera: intrinsics at the image size (W, H) with zero distortion (images, mask
            and landmarks are undistorted at ingest).
        images: (L, H, W, 3) float32 linear RGB, ambient subtracted, not clipped (small
            negative values from noise survive the ambient subtraction).
        light_names: L names, one per image, in image order.
        saturated: (L, H, W) bool, True where any channel's stored code value reached
            :data:`SATURATION_LEVEL` of full scale (never for float files).
        mask: (H, W) bool region of interest (True inside), or None.
        landmarks: (68, 2) float64 iBUG landmarks (u, v) in pixels (0-based, undistorted),
            or None.
        lights: calibrated point lights in the order of ``light_names`` (positions in mm,
            camera frame), or None when they still have to be calibrated.
        encoding: the colour encoding the files were decoded with (``linear``, ``srgb`` or
            ``gamma:<g>``).
        bit_depth: ``"8"``, ``"16"`` or ``"float"``, the stored sample type of the images.
        subject: subject identifier, or None.
        expression: expression label, or None.
        image_paths: L paths of the image files.
        saturated_channels: (L, H, W, 3) bool, the same test per channel (``saturated``
            is their any), or None when not known; the normal update keeps the unclipped
            channels of a sample (skin clips in red first).
    """

    root: Path
    camera: Camera
    images: np.ndarray
    light_names: tuple[str, ...]
    saturated: np.ndarray
    mask: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    lights: PointLights | None = None
    encoding: str = "linear"
    bit_depth: str = "float"
    subject: str | None = None
    expression: str | None = None
    image_paths: tuple[Path, ...] = ()
    saturated_channels: np.ndarray | None = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images, dtype=np.float32)
        dims = check_shape(images, "images", ("L", "H", "W", 3))
        L, H, W = dims["L"], dims["H"], dims["W"]
        if L < 1:
            raise ShapeError("a capture needs at least one image")
        if not isinstance(self.camera, Camera):
            raise ShapeError(f"expected camera to be a Camera; got {type(self.camera).__name__}")
        if self.camera.image_size != (W, H):
            raise ShapeError(f"camera image_size {self.camera.image_size} does not match the "
                             f"images' size {(W, H)}")
        if self.camera.has_distortion:
            raise ShapeError("a Capture's camera must have zero distortion (undistort first)")
        names = tuple(str(n) for n in self.light_names)
        if len(names) != L:
            raise ShapeError(f"expected {L} light names; got {len(names)}")
        if len(set(names)) != L:
            raise ShapeError(f"light names must be unique; got {names}")
        saturated = np.asarray(self.saturated, dtype=bool)
        check_shape(saturated, "saturated", (L, H, W))
        channels = None
        if self.saturated_channels is not None:
            channels = np.asarray(self.saturated_channels, dtype=bool)
            check_shape(channels, "saturated_channels", (L, H, W, 3))
            if np.any(channels.any(-1) & ~saturated):
                raise ShapeError("saturated_channels flags samples that saturated does not")
        mask = None
        if self.mask is not None:
            mask = np.asarray(self.mask, dtype=bool)
            check_shape(mask, "mask", (H, W))
        landmarks = None
        if self.landmarks is not None:
            landmarks = np.asarray(self.landmarks, dtype=np.float64)
            check_shape(landmarks, "landmarks", (N_LANDMARKS, 2))
        if self.lights is not None:
            if not isinstance(self.lights, PointLights):
                raise ShapeError(f"expected lights to be PointLights; got "
                                 f"{type(self.lights).__name__}")
            if tuple(self.lights.names) != names:
                raise ShapeError(f"lights {self.lights.names} must be in the order of the "
                                 f"light names {names}")
        paths = tuple(Path(p) for p in self.image_paths)
        if paths and len(paths) != L:
            raise ShapeError(f"expected {L} image paths; got {len(paths)}")
        self.root = Path(self.root)
        self.images = images
        self.light_names = names
        self.saturated = saturated
        self.saturated_channels = channels
        self.mask = mask
        self.landmarks = landmarks
        self.image_paths = paths

    @property
    def n_images(self) -> int:
        """Number of images L (one per light)."""
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        """Image height H in pixels."""
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        """Image width W in pixels."""
        return int(self.images.shape[2])

    def image_sum(self) -> np.ndarray:
        """(H, W, 3) float32 sum of the linear images over all lights."""
        return self.images.sum(axis=0, dtype=np.float32)


# ================================================================ JSON validation
def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"number {text if len(text) <= 24 else text[:21] + '...'}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Source:
    """The session file being validated; builds errors that name it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, message: str, field: str | None, path: object | None = None
              ) -> SessionError:
        return SessionError(message, path=self.path if path is None else path, field=field)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, field: str, src: _Source, *, minimum: float | None = None,
            positive: bool = False) -> float:
    """A finite JSON number (booleans are not numbers), optionally bounded."""
    if not _is_number(value):
        raise src.error(f"expected a number; got {_describe(value)}", field)
    try:
        x = float(value)
    except OverflowError:
        raise src.error("number is too large", field) from None
    if not math.isfinite(x):
        raise src.error(f"expected a finite number; got {x}", field)
    if positive and x <= 0:
        raise src.error(f"expected a positive number; got {x}", field)
    if minimum is not None and x < minimum:
        raise src.error(f"expected a number >= {minimum}; got {x}", field)
    return x


def _vector(value: Any, sizes: Sequence[int], field: str, src: _Source, *,
            minimum: float | None = None) -> np.ndarray:
    """A JSON list of finite numbers whose length is one of ``sizes`` -> float64 array."""
    if not isinstance(value, list):
        raise src.error(f"expected a list of {_sizes_text(sizes)} numbers; got "
                        f"{_describe(value)}", field)
    if len(value) not in sizes:
        raise src.error(f"expected {_sizes_text(sizes)} numbers; got {len(value)}", field)
    return np.array([_number(v, f"{field}[{i}]", src, minimum=minimum)
                     for i, v in enumerate(value)], dtype=np.float64)


def _sizes_text(sizes: Sequence[int]) -> str:
    sizes = [str(s) for s in sizes]
    return sizes[0] if len(sizes) == 1 else ", ".join(sizes[:-1]) + " or " + sizes[-1]


def _matrix(value: Any, rows: int, cols: int, field: str, src: _Source) -> np.ndarray:
    """A JSON list of ``rows`` lists of ``cols`` finite numbers -> (rows, cols) float64."""
    if not isinstance(value, list) or len(value) != rows:
        raise src.error(f"expected a {rows}x{cols} list of lists of numbers; got "
                        f"{_describe(value)}", field)
    out = np.empty((rows, cols))
    for r, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            raise src.error(f"expected row {r} to be a list of {cols} numbers; got "
                            f"{_describe(row)}", field)
        for c, v in enumerate(row):
            out[r, c] = _number(v, f"{field}[{r}][{c}]", src)
    return out


def _string(value: Any, field: str, src: _Source, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise src.error(f"expected a string; got {_describe(value)}", field)
    if not allow_empty and not value.strip():
        raise src.error("expected a non-empty string", field)
    if "\x00" in value:
        raise src.error("string contains a NUL character", field)
    return value


def _optional_string(data: Mapping[str, Any], key: str, src: _Source) -> str | None:
    value = data.get(key)
    return None if value is None else _string(value, key, src, allow_empty=True)


def _object(value: Any, field: str, src: _Source) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise src.error(f"expected an object; got {_describe(value)}", field)
    return value


class _Object(dict):
    """A parsed JSON object that remembers keys it saw more than once."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    dup: list[str] = []
    for key, value in pairs:
        if key in obj:
            dup.append(key)
        obj[key] = value
    if dup:
        obj.duplicates = tuple(dup)
    return obj


def _first_duplicate_key(data: Any) -> str | None:
    """Dotted path of the first JSON object key that appears twice, or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            dups = getattr(node, "duplicates", ())
            if dups:
                return f"{prefix}.{dups[0]}" if prefix else dups[0]
            for key, value in node.items():
                stack.append((f"{prefix}.{key}" if prefix else str(key), value))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                stack.append((f"{prefix}[{i}]", value))
    return None


def _parse_json_text(text: str, path: Path, field: str | None) -> Any:
    """JSON text -> Python values; duplicate keys and syntax errors raise SessionError."""
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise SessionError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: "
                           f"{exc.msg}", path=path, field=field) from None
    except (ValueError, RecursionError) as exc:
        raise SessionError(f"invalid JSON: {exc}", path=path, field=field) from None
    dup = _first_duplicate_key(data)
    if dup is not None:
        raise SessionError("key given more than once", path=path,
                           field=dup if field is None else f"{field}: {dup}")
    return data


def _read_text(path: Path, field: str | None) -> str:
    try:
        if path.is_dir():
            raise SessionError("is a folder, not a file", path=path, field=field)
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SessionError("file not found", path=path, field=field) from None
    except UnicodeDecodeError as exc:
        raise SessionError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path,
                           field=field) from None
    except OSError as exc:
        raise SessionError(f"cannot read file ({exc.strerror or exc})", path=path,
                           field=field) from None
    except ValueError as exc:
        raise SessionError(f"cannot read file ({exc})", path=path, field=field) from None


# ------------------------------------------------------------------ the spec
@dataclass
class _ImageEntry:
    path: Path
    light: str
    field: str


@dataclass
class _Spec:
    K: np.ndarray
    image_size: tuple[int, int] | None
    distortion: np.ndarray
    encoding: str | None
    images: list[_ImageEntry]
    ambient: Path | None
    mask: Path | None
    landmarks: Path | None
    lights: dict[str, dict[str, Any]] | None
    subject: str | None
    expression: str | None


def _parse_format(data: Mapping[str, Any], src: _Source) -> None:
    if "format" not in data:
        raise src.error(f"missing required field (expected \"{SESSION_FORMAT}\")", "format")
    fmt = data["format"]
    if not isinstance(fmt, str):
        raise src.error(f"expected the string \"{SESSION_FORMAT}\"; got {_describe(fmt)}",
                        "format")
    if fmt != SESSION_FORMAT:
        family = SESSION_FORMAT.split("/")[0] + "/"
        if fmt.startswith(family):
            raise src.error(f"unsupported format version {fmt!r} (this reader handles "
                            f"\"{SESSION_FORMAT}\")", "format")
        raise src.error(f"not a capture session: format {fmt!r} (expected "
                        f"\"{SESSION_FORMAT}\")", "format")


def _parse_camera(data: Mapping[str, Any], src: _Source
                  ) -> tuple[np.ndarray, tuple[int, int] | None, np.ndarray]:
    if "camera" not in data:
        raise src.error("missing required field", "camera")
    cam = _object(data["camera"], "camera", src)
    if "K" not in cam:
        raise src.error("missing required field", "camera.K")
    K = _matrix(cam["K"], 3, 3, "camera.K", src)
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise src.error(f"focal lengths must be positive; got fx={K[0, 0]}, fy={K[1, 1]}",
                        "camera.K")
    if K[1, 0] != 0:
        raise src.error(f"K[1][0] must be 0; got {K[1, 0]}", "camera.K")
    if not np.array_equal(K[2], [0.0, 0.0, 1.0]):
        raise src.error(f"the last row of K must be [0, 0, 1]; got {K[2].tolist()}",
                        "camera.K")
    size = None
    if cam.get("image_size") is not None:
        raw = cam["image_size"]
        if not isinstance(raw, list) or len(raw) != 2:
            raise src.error(f"expected [W, H]; got {_describe(raw)}", "camera.image_size")
        wh = []
        for i, v in enumerate(raw):
            x = _number(v, f"camera.image_size[{i}]", src, positive=True)
            if x != int(x):
                raise src.error(f"expected whole pixels; got {x}", "camera.image_size")
            wh.append(int(x))
        size = (wh[0], wh[1])
    dist = np.zeros(5)
    if cam.get("distortion") is not None:
        dist = _vector(cam["distortion"], DISTORTION_SIZES, "camera.distortion", src)
    return K, size, dist


def _parse_images(data: Mapping[str, Any], src: _Source, root: Path) -> list[_ImageEntry]:
    if "images" not in data:
        raise src.error("missing required field", "images")
    raw = data["images"]
    if not isinstance(raw, list):
        raise src.error(f"expected a list of {{\"path\", \"light\"}} objects; got "
                        f"{_describe(raw)}", "images")
    if not raw:
        raise src.error("expected at least one image", "images")
    entries: list[_ImageEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        field = f"images[{i}]"
        entry = _object(item, field, src)
        for key in ("path", "light"):
            if key not in entry:
                raise src.error("missing required field", f"{field}.{key}")
        rel = _string(entry["path"], f"{field}.path", src)
        light = _string(entry["light"], f"{field}.light", src)
        if light in seen:
            raise src.error(f"duplicate light name {light!r} (also images[{seen[light]}])",
                            f"{field}.light")
        seen[light] = i
        entries.append(_ImageEntry(root / rel, light, f"{field}.path"))
    return entries


def _parse_lights(data: Mapping[str, Any], src: _Source) -> dict[str, dict[str, Any]] | None:
    """Validate the ``lights`` object; returns name -> clean entry for PointLights."""
    raw = data.get("lights")
    if raw is None:
        return None
    lights = _object(raw, "lights", src)
    out: dict[str, dict[str, Any]] = {}
    for name, item in lights.items():
        field = f"lights.{name}"
        if not name.strip():
            raise src.error("light names must be non-empty", field)
        entry = _object(item, field, src)
        if "position" not in entry:
            raise src.error("missing required field", f"{field}.position")
        position = _vector(entry["position"], (3,), f"{field}.position", src)
        value = entry.get("intensity")
        if value is None:
            intensity = np.ones(3)
        elif isinstance(value, list):
            intensity = _vector(value, (3,), f"{field}.intensity", src, minimum=0.0)
        else:
            intensity = np.full(3, _number(value, f"{field}.intensity", src, minimum=0.0))
        direction = np.zeros(3)
        if entry.get("direction") is not None:
            direction = _vector(entry["direction"], (3,), f"{field}.direction", src)
        anisotropy = 0.0
        if entry.get("anisotropy") is not None:
            anisotropy = _number(entry["anisotropy"], f"{field}.anisotropy", src, minimum=0.0)
        with np.errstate(over="ignore"):
            norm = float(np.linalg.norm(direction))
        if anisotropy > 0 and not norm > 1e-9:
            raise src.error("an LED with anisotropy > 0 needs a non-zero direction",
                            f"{field}.direction")
        if not math.isfinite(norm):
            raise src.error("direction is too large", f"{field}.direction")
        out[name] = {"position": position.tolist(), "intensity": intensity.tolist(),
                     "direction": direction.tolist(), "anisotropy": anisotropy}
    return out


def _optional_path(data: Mapping[str, Any], key: str, src: _Source, root: Path
                   ) -> Path | None:
    value = data.get(key)
    if value is None:
        return None
    return root / _string(value, key, src)


def _parse_spec(data: Any, src: _Source, root: Path) -> _Spec:
    if not isinstance(data, dict):
        raise src.error(f"expected a JSON object at the top level; got {_describe(data)}",
                        None)
    _parse_format(data, src)
    units = data.get("units")
    if units is not None and units != "mm":
        raise src.error(f"only \"mm\" is supported; got {_describe(units)}", "units")
    K, size, dist = _parse_camera(data, src)
    encoding = None
    if data.get("encoding") is not None:
        encoding = _string(data["encoding"], "encoding", src)
        try:
            parse_encoding(encoding)
        except ConfigError as exc:
            raise src.error(str(exc), "encoding") from None
    images = _parse_images(data, src, root)
    lights = _parse_lights(data, src)
    if lights is not None:
        for i, entry in enumerate(images):
            if entry.light not in lights:
                defined = ", ".join(repr(n) for n in lights) or "none"
                raise src.error(f"light {entry.light!r} is not defined in 'lights' "
                                f"(defined: {defined})", f"images[{i}].light")
    return _Spec(
        K=K, image_size=size, distortion=dist, encoding=encoding, images=images,
        ambient=_optional_path(data, "ambient", src, root),
        mask=_optional_path(data, "mask", src, root),
        landmarks=_optional_path(data, "landmarks", src, root),
        lights=lights,
        subject=_optional_string(data, "subject", src),
        expression=_optional_string(data, "expression", src),
    )


# ====================================================================== images
def _read_code_values(path: Path, field: str) -> tuple[np.ndarray, str]:
    """Read an image file as (H, W) or (H, W, 3) float32 code values and its bit depth.

    Float files must hold finite, non-negative values.
    """
    import cv2

    try:
        if path.is_dir():
            raise SessionError("is a folder, not an image file", path=path, field=field)
        img, depth = read_image(path)
    except ImageReadError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        raise SessionError(msg[len(prefix):] if msg.startswith(prefix) else msg, path=path,
                           field=field) from None
    except OSError as exc:
        raise SessionError(f"cannot read image ({exc.strerror or exc})", path=path,
                           field=field) from None
    except (ValueError, MemoryError, cv2.error) as exc:
        raise SessionError(f"cannot read image ({type(exc).__name__}: {exc})", path=path,
                           field=field) from None
    if img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        raise SessionError(f"unsupported image layout {img.shape}", path=path, field=field)
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise SessionError(f"empty image {img.shape}", path=path, field=field)
    if depth == "float":
        if not np.all(np.isfinite(img)):
            raise SessionError("image holds NaN or infinite values", path=path, field=field)
        if np.any(img < 0):
            raise SessionError(f"image holds negative values (min {float(img.min()):.4g})",
                               path=path, field=field)
    return img, depth


def _depth_text(depth: str) -> str:
    return depth if depth == "float" else f"{depth}-bit"


def _rgb(img: np.ndarray) -> np.ndarray:
    """(H, W) grey -> (H, W, 3); RGB unchanged."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img


def _check_size(img: np.ndarray, size: tuple[int, int], path: Path, field: str, ref: Path
                ) -> None:
    H, W = img.shape[:2]
    if (H, W) != size:
        raise SessionError(f"image is {W}x{H} pixels but {ref.name} is {size[1]}x{size[0]}; "
                           f"all images, the ambient image and the mask must have one size",
                           path=path, field=field)


def keeps_clipped_channels(clipped: np.ndarray) -> bool:
    """Whether samples clipped in some channels only should keep their other channels:
    ``clipped`` (..., 3) bool per-channel flags of the samples considered, of which at
    least :data:`PARTIAL_CLIP_SHARE` must be partly clipped."""
    c0, c1, c2 = clipped[..., 0], clipped[..., 1], clipped[..., 2]
    partial = int(((c0 | c1 | c2) & ~(c0 & c1 & c2)).sum())
    return partial > 0 and partial >= PARTIAL_CLIP_SHARE * max(c0.size, 1)


def _saturation(code: np.ndarray, depth: str) -> np.ndarray:
    """(H, W, 3) bool: the channels whose code value is at or above
    :data:`SATURATION_LEVEL`."""
    if depth not in _INTEGER_DEPTHS:
        return np.zeros(code.shape, dtype=bool)
    return code >= np.float32(SATURATION_LEVEL)


def _linearise(code: np.ndarray, encoding: str, path: Path, field: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        lin = decode(code, encoding)
    if not np.all(np.isfinite(lin)):
        raise SessionError(f"values overflow when decoded with encoding {encoding!r}",
                           path=path, field=field)
    return np.ascontiguousarray(lin, dtype=np.float32)


def _read_mask(path: Path, size: tuple[int, int], ref: Path) -> np.ndarray:
    img, _ = _read_code_values(path, "mask")
    _check_size(img, size, path, "mask", ref)
    return np.any(img != 0, axis=-1) if img.ndim == 3 else img != 0


def _undistort_points(points: np.ndarray, camera: Camera) -> np.ndarray:
    """(N, 2) distorted pixels -> (N, 2) pixels of the same K without distortion."""
    import cv2

    src = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 1, 2)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    out = cv2.undistortPoints(src, camera.K, camera.distortion, R=None, P=camera.K,
                              criteria=criteria)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


# ================================================================= landmarks
def _parse_pts(text: str, path: Path, field: str) -> np.ndarray:
    """iBUG .pts text -> (N, 2) float64 as stored (1-based)."""
    def fail(message: str) -> SessionError:
        return SessionError(message, path=path, field=field)

    lines = text.splitlines()
    header: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() != "{":
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise fail(f"line {i}: expected 'key: value' or '{{' in the .pts header; "
                       f"got {line[:40]!r}")
        header[key.strip().lower()] = value.strip()
    if i >= len(lines):
        raise fail("not an iBUG .pts file: no '{' opening the point list")
    i += 1
    points: list[tuple[float, float]] = []
    while i < len(lines) and lines[i].strip() != "}":
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            points.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise fail(f"line {i}: expected two numbers 'u v'; got {line[:40]!r}") from None
    if i >= len(lines):
        raise fail("not an iBUG .pts file: no '}' closing the point list")
    if "n_points" in header:
        try:
            declared = int(header["n_points"])
        except ValueError:
            raise fail(f"n_points is not an integer: {header['n_points'][:20]!r}") from None
        if declared != len(points):
            raise fail(f"n_points says {declared} but the file lists {len(points)} points")
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _parse_landmark_json(text: str, path: Path, field: str) -> np.ndarray:
    data = _parse_json_text(text, path, field)
    if isinstance(data, dict) and "landmarks" in data:
        data = data["landmarks"]
    if not isinstance(data, list):
        raise SessionError(f"expected a JSON list of [u, v] pairs; got {_describe(data)}",
                           path=path, field=field)
    src = _Source(path)
    out = np.empty((len(data), 2))
    for i, item in enumerate(data):
        out[i] = _vector(item, (2,), f"{field}[{i}]", src)
    return out


def read_landmarks(path: str | os.PathLike, n_points: int | None = N_LANDMARKS
                   ) -> np.ndarray:
    """Read landmarks from an iBUG ``.pts`` file or a JSON list of [u, v].

    The format is chosen by the suffix (``.pts``, ``.json``), otherwise by the content
    (JSON starts with ``[`` or ``{``). A JSON file may hold the list itself or an object
    with a ``landmarks`` list.

    Args:
        path: the landmark file.
        n_points: the required number of points (68 for iBUG); None accepts any number.

    Returns:
        (N, 2) float64 pixel coordinates (u, v), 0-based (pixel centres at integers):
        ``.pts`` coordinates are shifted by -:data:`PTS_ORIGIN`.

    Raises:
        SessionError: naming the file and the field ``landmarks`` for a missing or
            malformed file, a wrong number of points or non-finite coordinates.
    """
    field = "landmarks"
    p = Path(path)
    text = _read_text(p, field)
    suffix = p.suffix.lower()
    is_json = suffix == ".json" or (suffix != ".pts" and text.lstrip()[:1] in ("[", "{"))
    if is_json:
        points = _parse_landmark_json(text, p, field)
    else:
        points = _parse_pts(text, p, field) - PTS_ORIGIN
    if n_points is not None and points.shape[0] != n_points:
        raise SessionError(f"expected {n_points} points; got {points.shape[0]}", path=p,
                           field=field)
    if not np.all(np.isfinite(points)):
        raise SessionError("landmarks hold NaN or infinite coordinates", path=p, field=field)
    return points


def write_landmarks_pts(path: str | os.PathLike, points: np.ndarray) -> Path:
    """Atomically write landmarks as an iBUG ``.pts`` file.

    Args:
        path: the output file.
        points: (N, 2) pixel coordinates (u, v), 0-based; written 1-based
            (+:data:`PTS_ORIGIN`) as the iBUG format expects.

    Returns:
        the path written.

    Raises:
        ShapeError: for a wrong shape or non-finite points.
    """
    pts = np.asarray(points, dtype=np.float64)
    check_shape(pts, "points", (None, 2))
    check_finite(pts, "points")
    lines = ["version: 1", f"n_points: {pts.shape[0]}", "{"]
    lines += [f"{u + PTS_ORIGIN:.6f} {v + PTS_ORIGIN:.6f}" for u, v in pts]
    lines.append("}")
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# ==================================================================== loading
def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """(session.json path, session folder) for a folder or a json file."""
    try:
        p = Path(path)
    except TypeError:
        raise SessionError(f"expected a path to a session folder or {SESSION_FILE}; got "
                           f"{type(path).__name__}") from None
    try:
        if p.is_dir():
            json_path = p / SESSION_FILE
            if not json_path.is_file():
                raise SessionError(f"no {SESSION_FILE} in the session folder", path=json_path)
            return json_path, p
        if p.is_file():
            return p, p.parent
    except OSError as exc:
        raise SessionError(f"cannot access ({exc})", path=p) from None
    raise SessionError("session not found (expected a folder with "
                       f"{SESSION_FILE} or the json file)", path=p)


def load_session(path: str | os.PathLike) -> Capture:
    """Read and validate a capture session (contract 1).

    Images are read (8/16-bit PNG or TIFF, float TIFF or ``.npy``; grey becomes RGB),
    checked for one common size, turned into saturation masks from the stored code values,
    linearised with the session's encoding (default ``srgb`` for 8-bit, ``linear`` for
    16-bit and float files), reduced by the linearised ambient image and undistorted
    (bilinear for images, nearest for masks, iterative point undistortion for landmarks)
    when the camera has distortion. K is scaled when the images' size differs from
    ``camera.image_size``.

    Args:
        path: a session folder containing ``session.json``, or the json file itself.
            Relative paths inside are resolved against the json file's folder.

    Returns:
        the :class:`Capture`.

    Raises:
        SessionError: for any missing, unreadable or malformed input, naming the file and
            the field (for example ``images[1].path`` or ``camera.K``).
    """
    json_path, root = _locate(path)
    data = _parse_json_text(_read_text(json_path, None), json_path, None)
    src = _Source(json_path)
    spec = _parse_spec(data, src, root)
    try:
        return _build_capture(spec, src, root)
    except SessionError:
        raise
    except (FacepsError, KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise src.error(f"invalid session ({type(exc).__name__}: {exc})", None) from None


def _build_capture(spec: _Spec, src: _Source, root: Path) -> Capture:
    import cv2

    first = spec.images[0]
    codes: list[np.ndarray] = []
    depth0 = ""
    size: tuple[int, int] = (0, 0)
    for i, entry in enumerate(spec.images):
        img, depth = _read_code_values(entry.path, entry.field)
        if i == 0:
            depth0, size = depth, img.shape[:2]
        else:
            _check_size(img, size, entry.path, entry.field, first.path)
            if depth != depth0:
                raise SessionError(f"stored as {_depth_text(depth)} samples but "
                                   f"{first.path.name} has {_depth_text(depth0)} samples; "
                                   f"all images must share one sample type",
                                   path=entry.path, field=entry.field)
        codes.append(_rgb(img))
    H, W = size
    encoding = spec.encoding if spec.encoding is not None else _DEFAULT_ENCODING[depth0]

    sat_channels = np.stack([_saturation(c, depth0) for c in codes])       # (L, H, W, 3)
    images = np.stack([_linearise(c, encoding, e.path, e.field)
                       for c, e in zip(codes, spec.images)])
    del codes

    if spec.ambient is not None:
        amb, amb_depth = _read_code_values(spec.ambient, "ambient")
        _check_size(amb, size, spec.ambient, "ambient", first.path)
        if amb_depth != depth0:
            raise SessionError(f"stored as {_depth_text(amb_depth)} samples but the images "
                               f"have {_depth_text(depth0)} samples", path=spec.ambient,
                               field="ambient")
        images -= _linearise(_rgb(amb), encoding, spec.ambient, "ambient")[None]

    mask = None if spec.mask is None else _read_mask(spec.mask, size, first.path)
    landmarks = None if spec.landmarks is None else read_landmarks(spec.landmarks)

    try:
        camera = Camera(spec.K, spec.image_size or (W, H), spec.distortion)
        if camera.image_size != (W, H):
            cw, ch = camera.image_size
            if abs((W * ch) / (H * cw) - 1.0) > 0.01:
                log.warning("%s: images are %dx%d but camera.image_size is %dx%d (aspect "
                            "ratio differs); scaling K anisotropically", src.path, W, H,
                            cw, ch)
            camera = camera.scaled((W, H))
    except (ShapeError, ValueError, OverflowError) as exc:
        raise src.error(str(exc), "camera") from None

    if camera.has_distortion:
        try:
            images = np.stack([camera.undistort_image(im, "linear") for im in images])
            sat_channels = np.stack([camera.undistort_image(s.astype(np.uint8), "nearest")
                                     > 0 for s in sat_channels])
            if mask is not None:
                mask = camera.undistort_image(mask.astype(np.uint8), "nearest") > 0
            if landmarks is not None:
                landmarks = _undistort_points(landmarks, camera)
        except cv2.error as exc:
            raise src.error(f"undistortion failed ({exc})", "camera.distortion") from None
        if not np.all(np.isfinite(images)) or (landmarks is not None
                                               and not np.all(np.isfinite(landmarks))):
            raise src.error("undistortion produced non-finite values", "camera.distortion")
        camera = camera.undistorted()

    lights = None
    names = tuple(e.light for e in spec.images)
    if spec.lights is not None:
        try:
            lights = PointLights.from_dict(spec.lights, order=names)
        except (ShapeError, KeyError, TypeError, ValueError) as exc:
            raise src.error(str(exc), "lights") from None

    if mask is not None and not mask.any():
        log.warning("%s: the mask is empty", spec.mask)
    log.debug("loaded %s: %d images %dx%d, %s-bit, encoding %s", src.path, len(names), W, H,
              depth0, encoding)
    saturated = sat_channels[..., 0] | sat_channels[..., 1] | sat_channels[..., 2]
    return Capture(
        root=root, camera=camera, images=images, light_names=names, saturated=saturated,
        mask=mask, landmarks=landmarks, lights=lights, encoding=encoding, bit_depth=depth0,
        subject=spec.subject, expression=spec.expression,
        image_paths=tuple(e.path for e in spec.images), saturated_channels=sat_channels,
    )


# ==================================================================== writing
def _quantise(linear: np.ndarray, encoding: str, bit_depth: int, name: str) -> np.ndarray:
    """Linear float -> encoded, clipped, rounded integer code values."""
    arr = np.asarray(linear, dtype=np.float32)
    check_finite(arr, name)
    code = np.clip(encode(np.maximum(arr, 0.0), encoding), 0.0, 1.0)
    full = 255.0 if bit_depth == 8 else 65535.0
    return np.round(code * full).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _unique_file_name(stem: str, suffix: str, used: set[str]) -> str:
    base = _SAFE_NAME.sub("_", stem).strip("._") or "image"
    name, k = f"{base}{suffix}", 1
    while name.lower() in used:
        name, k = f"{base}_{k}{suffix}", k + 1
    used.add(name.lower())
    return name


def write_session(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    camera: Camera,
    *,
    light_names: Sequence[str],
    encoding: str | None = None,
    bit_depth: int | str = 8,
    lights: PointLights | Mapping[str, Mapping[str, Any]] | None = None,
    landmarks: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    ambient: np.ndarray | None = None,
    subject: str | None = None,
    expression: str | None = None,
    image_names: Sequence[str] | None = None,
) -> Path:
    """Write a capture session (contract 1) with PNG images, ``session.json`` last.

    Args:
        out_dir: the session folder (created).
        images: (L, H, W, 3) linear float images (values above 1 clip at full scale,
            negative values at 0).
        camera: intrinsics written as ``camera`` (K, image_size and distortion as given:
            the images are stored as they are, so a camera with distortion describes
            distorted images).
        light_names: L unique names, one per image.
        encoding: ``srgb``, ``linear`` or ``gamma:<g>``; default ``srgb`` for 8-bit and
            ``linear`` for 16-bit files (the contract's defaults).
        bit_depth: 8 or 16 bits per sample.
        lights: calibrated lights covering every light name (PointLights or the session's
            ``lights`` JSON object); optional.
        landmarks: (68, 2) pixel coordinates (u, v), written as ``landmarks.pts``.
        mask: (H, W) region (nonzero inside), written as a 0/255 ``mask.png``.
        ambient: (H, W, 3) linear image with all lights off, written as ``ambient.png``
            with the same encoding (the reader subtracts it).
        subject: subject identifier.
        expression: expression label.
        image_names: L file names (``.png``, relative to ``out_dir``); default from the
            light names.

    Returns:
        the session folder.

    Raises:
        ShapeError: for arrays of the wrong shape or with non-finite values.
        ConfigError: for invalid names, encodings or bit depths.
    """
    imgs = np.asarray(images, dtype=np.float32)
    dims = check_shape(imgs, "images", ("L", "H", "W", 3))
    L, H, W = dims["L"], dims["H"], dims["W"]
    if L < 1:
        raise ShapeError("write_session needs at least one image")
    if not isinstance(camera, Camera):
        raise ConfigError(f"camera must be a Camera; got {type(camera).__name__}")
    if str(bit_depth) not in _INTEGER_DEPTHS:
        raise ConfigError(f"bit_depth must be 8 or 16; got {bit_depth!r}")
    depth = int(bit_depth)
    enc = _DEFAULT_ENCODING[str(depth)] if encoding is None else encoding
    parse_encoding(enc)

    names = [str(n) for n in light_names] if not isinstance(light_names, str) else []
    if len(names) != L:
        raise ConfigError(f"expected {L} light names (one per image); got {light_names!r}")
    if len(set(names)) != L or any(not n.strip() for n in names):
        raise ConfigError(f"light names must be unique and non-empty; got {names}")

    out = Path(out_dir)
    used = {"session.json", "ambient.png", "mask.png", "landmarks.pts"}
    if image_names is None:
        files = [_unique_file_name(n, ".png", used) for n in names]
    else:
        files = [str(f) for f in image_names]
        if len(files) != L:
            raise ConfigError(f"expected {L} image names; got {len(files)}")
        for f in files:
            if Path(f).is_absolute() or Path(f).suffix.lower() != ".png":
                raise ConfigError(f"image names must be relative .png paths; got {f!r}")
            if f.lower() in used:
                raise ConfigError(f"image name {f!r} is used twice or is reserved")
            used.add(f.lower())

    light_json: dict[str, Any] | None = None
    if lights is not None:
        if isinstance(lights, PointLights):
            light_json = lights.to_dict()
        else:
            light_json = {str(k): dict(v) for k, v in lights.items()}
        missing = [n for n in names if n not in light_json]
        if missing:
            raise ConfigError(f"lights do not define {missing}")

    amb_code = None
    if ambient is not None:
        amb = np.asarray(ambient, dtype=np.float32)
        check_shape(amb, "ambient", (H, W, 3))
        amb_code = _quantise(amb, enc, depth, "ambient")
    mask_png = None
    if mask is not None:
        m = np.asarray(mask)
        check_shape(m, "mask", (H, W))
        mask_png = np.where(m != 0, 255, 0).astype(np.uint8)
    lm = None
    if landmarks is not None:
        lm = np.asarray(landmarks, dtype=np.float64)
        check_shape(lm, "landmarks", (N_LANDMARKS, 2))
        check_finite(lm, "landmarks")
    codes = [_quantise(imgs[i], enc, depth, f"images[{i}]") for i in range(L)]

    session: dict[str, Any] = {
        "format": SESSION_FORMAT,
        "units": "mm",
        "camera": camera.to_dict(),
        "encoding": enc,
        "images": [{"path": f, "light": n} for f, n in zip(files, names)],
    }
    for f, code in zip(files, codes):
        save_png(out / f, code)
    if amb_code is not None:
        save_png(out / "ambient.png", amb_code)
        session["ambient"] = "ambient.png"
    if mask_png is not None:
        save_png(out / "mask.png", mask_png)
        session["mask"] = "mask.png"
    if lm is not None:
        write_landmarks_pts(out / "landmarks.pts", lm)
        session["landmarks"] = "landmarks.pts"
    if light_json is not None:
        session["lights"] = light_json
    if subject is not None:
        session["subject"] = str(subject)
    if expression is not None:
        session["expression"] = str(expression)
    save_json(out / SESSION_FILE, session)
    log.debug("wrote session %s (%d images %dx%d, %d-bit %s)", out, L, W, H, depth, enc)
    return out
