"""Pictures for people: tone mapping, error maps with a colour bar, labelled grids."""

from __future__ import annotations

import numpy as np

from faceps.core.color import linear_to_srgb

__all__ = ["tonemap", "error_map", "label", "hstack_tiles", "grid"]


def tonemap(linear: np.ndarray, mask: np.ndarray | None = None, percentile: float = 99.5,
            target: float = 0.9) -> np.ndarray:
    """Linear RGB (H, W, 3) -> 8-bit sRGB with automatic exposure (NaN -> black)."""
    x = np.nan_to_num(np.asarray(linear, np.float32), nan=0.0)
    sel = x[mask] if mask is not None and mask.any() else x.reshape(-1, x.shape[-1])
    ref = float(np.percentile(sel.max(-1), percentile)) if sel.size else 1.0
    gain = target / ref if ref > 0 else 1.0
    return np.round(np.clip(linear_to_srgb(np.clip(x * gain, 0, 1)), 0, 1) * 255).astype(np.uint8)


def _colormap(t: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB (inferno)."""
    import cv2

    idx = np.round(np.clip(t, 0, 1) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(idx, cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(bgr.reshape(idx.shape + (3,))[..., ::-1])


def error_map(err: np.ndarray, vmax: float, unit: str = "deg", bar_width: int = 84,
              background: int = 40) -> np.ndarray:
    """(H, W) error -> (H, W + bar, 3) uint8 colour image with a labelled colour bar.

    NaN pixels are drawn grey.
    """
    import cv2

    e = np.asarray(err, np.float32)
    H, W = e.shape
    rgb = _colormap(np.nan_to_num(e / vmax, nan=0.0))
    rgb[~np.isfinite(e)] = background
    bar = np.full((H, bar_width, 3), 255, np.uint8)
    top, bottom = max(int(0.08 * H), 24) + 8, H - int(0.08 * H) - 8
    ramp = np.linspace(1, 0, max(bottom - top, 2))[:, None].repeat(14, 1)
    bar[top:bottom, 6:20] = _colormap(ramp)[: bottom - top]
    scale = max(0.3, min(0.5, H / 800))
    for frac in (0.0, 0.5, 1.0):
        y = int(bottom - frac * (bottom - top))
        text = f"{frac * vmax:g}" + (f" {unit}" if frac == 1.0 else "")
        cv2.putText(bar, text, (22, y + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([rgb, bar], axis=1)


def label(img: np.ndarray, text: str, scale: float | None = None) -> np.ndarray:
    """A copy of an 8-bit RGB image with ``text`` in its top-left corner."""
    import cv2

    out = np.ascontiguousarray(img.copy())
    s = scale or max(0.35, min(1.0, out.shape[0] / 500))
    th = max(1, int(round(s * 2)))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, s, th)
    cv2.rectangle(out, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
    cv2.putText(out, text, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, s, (255, 255, 255), th,
                cv2.LINE_AA)
    return out


def _fit(img: np.ndarray, h: int) -> np.ndarray:
    import cv2

    if img.shape[0] == h:
        return img
    w = max(1, int(round(img.shape[1] * h / img.shape[0])))
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def hstack_tiles(tiles: list[np.ndarray], height: int | None = None, gap: int = 4) -> np.ndarray:
    """Tiles side by side at one height, separated by white gaps."""
    h = height or max(t.shape[0] for t in tiles)
    parts = []
    for i, t in enumerate(tiles):
        if i:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(_fit(t, h))
    return np.concatenate(parts, axis=1)


def grid(rows: list[list[np.ndarray]], height: int, gap: int = 4) -> np.ndarray:
    """Rows of tiles (each row like :func:`hstack_tiles`), left-aligned on white."""
    lines = [hstack_tiles(r, height, gap) for r in rows]
    W = max(r.shape[1] for r in lines)
    out = []
    for i, r in enumerate(lines):
        if i:
            out.append(np.full((gap, W, 3), 255, np.uint8))
        pad = np.full((r.shape[0], W - r.shape[1], 3), 255, np.uint8)
        out.append(np.concatenate([r, pad], axis=1))
    return np.concatenate(out, axis=0)
