"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader never sees a half-written file under its final name: when the writer raises or
is interrupted (Ctrl-C), the temporary file is removed; when the process is killed, only a
``.tmp-`` file can remain, never the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "plain_json",
    "save_npy",
    "save_npz",
    "save_json",
    "save_png",
    "save_ply",
    "TMP_MARK",
]

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix of ``path`` so writers that choose the format by
    extension (OpenCV, trimesh) work. Parent folders are created.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}{TMP_MARK}", suffix=final.suffix, dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced no file for {final}")
        # mkstemp creates 0600; give the file the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Atomically save one array as ``.npy`` (no pickled objects)."""
    arr = np.asarray(array)
    if arr.dtype == object:
        raise TypeError("refusing to save an object array (it would need pickle)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return Path(path)


def save_npz(path: str | os.PathLike, compressed: bool = True, **arrays: Any) -> Path:
    """Atomically save named arrays as ``.npz`` (no pickled objects)."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"refusing to save object array '{key}' (it would need pickle)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plain_json(obj: Any, *, strings: bool = False) -> Any:
    """``obj`` as plain JSON values by a JSON round trip: tuples become lists, numpy
    scalars and arrays numbers and lists, paths strings. Other objects raise TypeError,
    or with ``strings`` become their ``str``."""
    def default(o: Any) -> Any:
        try:
            return _json_default(o)
        except TypeError:
            if strings:
                return str(o)
            raise
    return json.loads(json.dumps(obj, default=default))


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None (strict JSON has no NaN) recursively."""
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def save_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Atomically save strict JSON; numpy arrays and scalars become lists and numbers,
    NaN and infinities become null."""
    text = json.dumps(_finite(data), indent=indent, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Atomically save an RGB (H, W, 3), RGBA or grey (H, W) uint8/uint16 image as PNG."""
    import cv2

    img = np.asarray(image)
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"save_png expects uint8 or uint16, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[..., [2, 1, 0, 3]]
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(img)):
            raise OSError(f"could not write image {path}")
    return Path(path)


def save_ply(path: str | os.PathLike, mesh: Any) -> Path:
    """Atomically export a ``trimesh.Trimesh`` (normals and colours kept) as binary PLY."""
    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type="ply")
    return Path(path)
