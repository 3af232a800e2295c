"""Reading images of the formats sessions use, and preview encodings.

``read_image`` returns RGB code values scaled to [0, 1] for integer files (8-bit / 255,
16-bit / 65535) and the stored values for float files (TIFF, EXR, ``.npy``), plus the
bit depth so callers can choose the default colour encoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from faceps.core.errors import FacepsError

__all__ = ["ImageReadError", "read_image", "to_uint8", "normals_to_rgb", "rgb_to_normals",
           "sample_bilinear", "block_sum_2x2", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".exr", ".npy", ".bmp")


class ImageReadError(FacepsError):
    """An image file is missing, unreadable or of an unsupported kind."""


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """Read an image as float32 RGB (H, W, 3) (or (H, W) for single-channel files).

    Returns:
        (image, depth) with depth one of ``"8"``, ``"16"``, ``"float"``; integer files are
        scaled to [0, 1], float files are returned as stored. An alpha channel is dropped.

    Raises:
        ImageReadError: missing file, unreadable or truncated data, unsupported dtype.
    """
    p = Path(path)
    try:
        return _read_image(p)
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot read ({exc.strerror or exc})") from None


def _read_image(p: Path) -> tuple[np.ndarray, str]:
    import cv2

    if not p.is_file():
        raise ImageReadError(f"{p}: file not found")
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageReadError(f"{p}: unreadable .npy ({exc})") from None
        if arr.dtype.kind != "f" or arr.ndim not in (2, 3) or (arr.ndim == 3
                                                               and arr.shape[2] not in (1, 3)):
            raise ImageReadError(f"{p}: expected a float (H, W) or (H, W, 3) array; "
                                 f"got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.float32)
        return (arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr), "float"
    if p.suffix.lower() == ".exr":
        os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    data = np.fromfile(p, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{p}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None or img.size == 0:
        raise ImageReadError(f"{p}: not a readable image (corrupt, truncated or unsupported)")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim != 2:
        raise ImageReadError(f"{p}: unsupported channel layout {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0), "8"
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535.0), "16"
    if img.dtype in (np.float32, np.float64, np.float16):
        return img.astype(np.float32), "float"
    raise ImageReadError(f"{p}: unsupported pixel type {img.dtype}")


def to_uint8(x: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """Scale [0, vmax] to 8 bits (clipped); NaN becomes 0."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    if vmax is None:
        vmax = 1.0
    return np.clip(np.round(x / max(float(vmax), 1e-12) * 255.0), 0, 255).astype(np.uint8)


def normals_to_rgb(normals: np.ndarray, background: int = 0) -> np.ndarray:
    """Preview colours of unit normals: RGB = 0.5 * (n_x, -n_y, -n_z) + 0.5, 8-bit.

    Args:
        normals: (H, W, 3) camera-frame unit normals; NaN where undefined.
        background: grey level for NaN pixels.

    Returns:
        (H, W, 3) uint8.
    """
    n = np.asarray(normals, dtype=np.float32)
    rgb = 0.5 * n * np.array([1.0, -1.0, -1.0], np.float32) + 0.5
    out = np.clip(np.round(rgb * 255.0), 0, 255)
    bad = ~np.all(np.isfinite(n), axis=-1)
    out[bad] = background
    return out.astype(np.uint8)


def rgb_to_normals(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normals_to_rgb` (up to 8-bit quantisation), renormalised."""
    c = np.asarray(rgb, dtype=np.float32) / 255.0
    n = (c - 0.5) * 2.0 * np.array([1.0, -1.0, -1.0], np.float32)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (H, W, C) image at (N, 2) pixel positions (u, v).

    Positions outside the image, or touching a NaN pixel, give NaN.
    """
    img = np.asarray(image, np.float64)
    H, W = img.shape[:2]
    u, v = uv[:, 0], uv[:, 1]
    ok = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u <= W - 1) & (v <= H - 1)
    out = np.full((uv.shape[0],) + img.shape[2:], np.nan)
    u0 = np.clip(np.floor(u[ok]).astype(np.int64), 0, W - 2)
    v0 = np.clip(np.floor(v[ok]).astype(np.int64), 0, H - 2)
    fu, fv = (u[ok] - u0)[:, None], (v[ok] - v0)[:, None]
    out[ok] = ((1 - fu) * (1 - fv) * img[v0, u0] + fu * (1 - fv) * img[v0, u0 + 1]
               + (1 - fu) * fv * img[v0 + 1, u0] + fu * fv * img[v0 + 1, u0 + 1])
    return out


def block_sum_2x2(X: np.ndarray, lead: int = 0) -> np.ndarray:
    """Sums of the 2x2 pixel blocks of ``X`` in float64: axes ``lead`` and ``lead + 1`` are
    H and W (odd sizes padded with zeros), the result has ``ceil(H / 2)``, ``ceil(W / 2)``
    there. Four strided additions: 3-4x faster than a reshape summed over two non-adjacent
    axes, and the input is never copied to float64 as a whole (a 1600x1200 3-light image
    stack is 138 MB in float64)."""
    X = np.asarray(X)
    H, W = X.shape[lead], X.shape[lead + 1]
    if H % 2 or W % 2:
        pad = [(0, 0)] * lead + [(0, H % 2), (0, W % 2)] + [(0, 0)] * (X.ndim - lead - 2)
        X = np.pad(X, pad)
    lead_ix = (slice(None),) * lead
    out = X[lead_ix + (slice(0, None, 2), slice(0, None, 2))].astype(np.float64)
    out += X[lead_ix + (slice(1, None, 2), slice(0, None, 2))]
    out += X[lead_ix + (slice(0, None, 2), slice(1, None, 2))]
    out += X[lead_ix + (slice(1, None, 2), slice(1, None, 2))]
    return out
