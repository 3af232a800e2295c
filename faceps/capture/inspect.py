"""A human check of a capture: a text summary and a contact sheet of all images.

The contact sheet shows one tile per image, tone-mapped for display (each image is scaled
so that its 99th-percentile luminance lands at :data:`DISPLAY_WHITE`, then sRGB-encoded),
so dark near-light images are visible; the gain is printed next to the light name.
Saturated pixels are tinted red, landmarks are green dots and the mask outline is drawn
in cyan.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from faceps.capture.session import Capture, load_session
from faceps.core.atomic import save_png
from faceps.core.color import linear_to_srgb
from faceps.core.imageio import to_uint8

__all__ = ["inspect_session", "contact_sheet", "display_gain", "TILE_SIZE", "DISPLAY_WHITE"]

log = logging.getLogger(__name__)

#: longest side of one tile's image area in the contact sheet, pixels
TILE_SIZE = 360
#: linear display level the 99th-percentile luminance of each image is mapped to
DISPLAY_WHITE = 0.8
#: percentile of the luminance used for the automatic exposure
EXPOSURE_PERCENTILE = 99.0
#: height of the label bar above each tile, pixels
LABEL_HEIGHT = 22
#: gap between tiles, pixels
PAD = 6
#: maximum number of tiles per row
MAX_COLUMNS = 4
#: radius of the landmark dots in the sheet, pixels
LANDMARK_RADIUS = 2

_BACKGROUND = (32, 32, 32)
_SATURATED_RGB = np.array([255.0, 0.0, 0.0], np.float32)
_SATURATED_ALPHA = 0.6
_LANDMARK_RGB = (0, 255, 0)
_MASK_RGB = (0, 255, 255)
_TEXT_RGB = (255, 255, 255)


def display_gain(image: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Exposure gain that maps an image's bright pixels to :data:`DISPLAY_WHITE`.

    Args:
        image: (H, W, 3) linear float image.
        valid: optional (H, W) bool pixels to measure (e.g. inside the mask, unsaturated).

    Returns:
        a positive gain; 1 for an image without positive values.
    """
    lum = np.asarray(image, dtype=np.float32).mean(axis=-1)
    values = lum[valid] if valid is not None and np.any(valid) else lum.ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    ref = float(np.percentile(values, EXPOSURE_PERCENTILE))
    if not ref > 0:
        ref = float(values.max())
    return DISPLAY_WHITE / ref if ref > 0 else 1.0


def _tile(capture: Capture, index: int, scale: float) -> tuple[np.ndarray, float]:
    """One tile: (LABEL_HEIGHT + h, w, 3) uint8 RGB and the display gain used."""
    import cv2

    image = capture.images[index]
    sat = capture.saturated[index]
    valid = ~sat if capture.mask is None else (capture.mask & ~sat)
    gain = display_gain(image, valid)
    disp = to_uint8(linear_to_srgb(np.clip(image * np.float32(gain), 0.0, 1.0)))
    if sat.any():
        mixed = (1.0 - _SATURATED_ALPHA) * disp[sat] + _SATURATED_ALPHA * _SATURATED_RGB
        disp[sat] = np.round(mixed).astype(np.uint8)
    w = max(1, round(capture.width * scale))
    h = max(1, round(capture.height * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    disp = np.ascontiguousarray(cv2.resize(disp, (w, h), interpolation=interp))
    if capture.mask is not None:
        small = cv2.resize(capture.mask.astype(np.uint8), (w, h),
                           interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(disp, contours, -1, _MASK_RGB, 1)
    if capture.landmarks is not None:
        radius = LANDMARK_RADIUS
        for u, v in (capture.landmarks + 0.5) * scale - 0.5:
            if np.isfinite(u) and np.isfinite(v):
                cv2.circle(disp, (int(round(u)), int(round(v))), radius, _LANDMARK_RGB, -1,
                           cv2.LINE_AA)
    tile = np.empty((LABEL_HEIGHT + h, w, 3), np.uint8)
    tile[:LABEL_HEIGHT] = 0
    tile[LABEL_HEIGHT:] = disp
    label = f"{capture.light_names[index]}  x{gain:.3g}"
    cv2.putText(tile, label, (4, LABEL_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                _TEXT_RGB, 1, cv2.LINE_AA)
    return tile, gain


def contact_sheet(capture: Capture) -> np.ndarray:
    """The contact sheet of a capture as an image.

    Args:
        capture: the capture to show.

    Returns:
        (H', W', 3) uint8 RGB sheet: up to :data:`MAX_COLUMNS` tiles per row, each a label
        bar with the light name and display gain above the tone-mapped image.
    """
    scale = TILE_SIZE / max(capture.height, capture.width)
    tiles = [_tile(capture, i, scale)[0] for i in range(capture.n_images)]
    th, tw = tiles[0].shape[:2]
    cols = min(capture.n_images, MAX_COLUMNS)
    rows = math.ceil(capture.n_images / cols)
    sheet = np.empty((rows * th + (rows + 1) * PAD, cols * tw + (cols + 1) * PAD, 3), np.uint8)
    sheet[:] = _BACKGROUND
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = PAD + r * (th + PAD), PAD + c * (tw + PAD)
        sheet[y:y + th, x:x + tw] = tile
    return sheet


def inspect_session(capture: Capture | str | os.PathLike, out_png: str | os.PathLike) -> str:
    """Summarise a capture and write its contact sheet.

    Args:
        capture: a loaded :class:`Capture`, or a session path passed to
            :func:`~faceps.capture.session.load_session`.
        out_png: where to write the contact sheet (atomically).

    Returns:
        a multi-line summary: folder, image count and size, bit depth, encoding, camera
        intrinsics, per image the light name, file, mean and max linear intensity and the
        percentage of saturated pixels, mask coverage, landmarks, lights and labels.

    Raises:
        SessionError: when ``capture`` is a path to an invalid session.
    """
    if not isinstance(capture, Capture):
        capture = load_session(capture)
    cam = capture.camera
    depth = capture.bit_depth if capture.bit_depth == "float" else f"{capture.bit_depth}-bit"
    lines = [
        f"session:    {capture.root}",
        f"images:     {capture.n_images} x {capture.width}x{capture.height} px (W x H), "
        f"{depth}, encoding {capture.encoding}",
        f"camera:     fx={cam.K[0, 0]:.2f} fy={cam.K[1, 1]:.2f} "
        f"cx={cam.K[0, 2]:.2f} cy={cam.K[1, 2]:.2f} px",
    ]
    names = list(capture.light_names)
    files = [p.name for p in capture.image_paths] or ["-"] * capture.n_images
    nw = max(5, *(len(n) for n in names))
    fw = max(4, *(len(f) for f in files))
    channels = capture.saturated_channels
    lines.append(f"  {'light':<{nw}}  {'file':<{fw}}  {'mean':>10}  {'max':>10}  "
                 f"{'saturated':>9}" + ("  (red / green / blue)" if channels is not None
                                        else ""))
    n_pixels = capture.height * capture.width
    for i, (name, fname) in enumerate(zip(names, files)):
        img = capture.images[i]
        sat = 100.0 * np.count_nonzero(capture.saturated[i]) / n_pixels
        line = (f"  {name:<{nw}}  {fname:<{fw}}  {float(img.mean()):>10.4g}  "
                f"{float(img.max()):>10.4g}  {sat:>7.2f} %")
        if channels is not None:
            per = [100.0 * np.count_nonzero(channels[i, ..., c]) / n_pixels for c in range(3)]
            line += "  (" + " / ".join(f"{v:.2f}" for v in per) + " %)"
        lines.append(line)
    if capture.mask is None:
        lines.append("mask:       none")
    else:
        cover = 100.0 * np.count_nonzero(capture.mask) / n_pixels
        lines.append(f"mask:       {cover:.1f} % of the image")
    if capture.landmarks is None:
        lines.append("landmarks:  no")
    else:
        lines.append(f"landmarks:  yes ({capture.landmarks.shape[0]} points)")
    if capture.lights is None:
        lines.append("lights:     to be calibrated")
    else:
        lines.append(f"lights:     given ({len(capture.lights)}: "
                     f"{', '.join(capture.lights.names)})")
    lines.append(f"subject:    {capture.subject if capture.subject is not None else '-'}")
    lines.append(f"expression: {capture.expression if capture.expression is not None else '-'}")

    path = save_png(Path(out_png), contact_sheet(capture))
    log.info("wrote contact sheet %s", path)
    return "\n".join(lines)
