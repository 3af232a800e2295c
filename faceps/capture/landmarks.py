"""68-point iBUG landmarks of a capture: from the session, or from a detector.

The detector backend is dlib's HOG face detector with the 68-point shape predictor that
the PyPI package ``face-recognition-models`` ships (the ``landmarks`` extra); it runs
offline. Near-light captures are dark and low in contrast, so detection runs on a
tone-mapped, contrast-normalised (CLAHE), downscaled grey image of the sum of the lights,
then of the brightest single light, with more upsampling when nothing is found.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceps.capture.session import Capture
from faceps.core.color import linear_to_srgb
from faceps.core.errors import ConfigError, FacepsError, FitError

log = logging.getLogger(__name__)

__all__ = ["LandmarkResult", "DlibLandmarks", "get_landmarks", "detection_image",
           "predictor_path", "default_detector", "needs_detector"]

EXTRA_HINT = "install the 'landmarks' extra: pip install 'faceps[landmarks]'"


@dataclass(frozen=True)
class LandmarkResult:
    """Landmarks of a capture.

    Attributes:
        points: (68, 2) float64 pixels (u, v) of the full-resolution image.
        score: detector confidence (HOG SVM score; NaN for session landmarks).
        source: ``session`` or ``dlib``.
        box: (x0, y0, x1, y1) full-resolution face box, or None.
        image_used: what the detector looked at.
    """

    points: np.ndarray
    score: float
    source: str
    box: tuple[float, float, float, float] | None = None
    image_used: str = ""


def predictor_path() -> Path:
    """The 68-point shape predictor file of ``face-recognition-models``, found without
    importing that package (its ``__init__`` needs ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacepsError(f"the landmark detector needs face-recognition-models; {EXTRA_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "models" / "shape_predictor_68_face_landmarks.dat"
        if p.is_file():
            return p
    raise FacepsError(f"face-recognition-models has no 68-point predictor file; {EXTRA_HINT}")


def detection_image(linear: np.ndarray, max_side: int = 800) -> tuple[np.ndarray, float]:
    """8-bit grey image for detection, and its scale relative to the input.

    Args:
        linear: (H, W, 3) linear image (any exposure).
        max_side: the longer side after downscaling.

    Returns:
        (image (h, w) uint8, scale s = h / H).
    """
    import cv2

    img = np.nan_to_num(np.asarray(linear, np.float32), nan=0.0)
    grey = img @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    ref = float(np.percentile(grey, 99.5))
    grey = np.clip(grey * (0.9 / ref if ref > 0 else 1.0), 0.0, 1.0)
    code = np.round(linear_to_srgb(grey) * 255).astype(np.uint8)
    H, W = code.shape
    s = min(1.0, max_side / max(H, W))
    if s < 1.0:
        code = cv2.resize(code, (max(1, round(W * s)), max(1, round(H * s))),
                          interpolation=cv2.INTER_AREA)
        s = code.shape[0] / H
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    return clahe.apply(code), s


class DlibLandmarks:
    """dlib HOG detector + 68-point shape predictor (offline)."""

    def __init__(self, upsample: int = 1, max_side: int = 800, threshold: float = -0.2):
        try:
            import dlib
        except ImportError:
            raise FacepsError(f"the landmark detector needs dlib; {EXTRA_HINT}") from None
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path()))
        self.upsample = int(upsample)
        self.max_side = int(max_side)
        self.threshold = float(threshold)

    def _detect(self, img: np.ndarray, upsample: int):
        boxes, scores, _ = self.detector.run(img, upsample, self.threshold)
        if not boxes:
            return None
        k = int(np.argmax(scores))
        return boxes[k], float(scores[k])

    def detect(self, capture: Capture) -> LandmarkResult:
        """Landmarks of the face in ``capture``; FitError when no face is found."""
        candidates = [("sum of the lights", capture.image_sum())]
        bright = int(np.argmax([np.nanmean(im) for im in capture.images]))
        candidates.append((f"brightest light ({capture.light_names[bright]})",
                           capture.images[bright]))
        tried = []
        for upsample in (self.upsample, self.upsample + 1):
            for name, linear in candidates:
                img, s = detection_image(linear, self.max_side)
                found = self._detect(img, upsample)
                tried.append(f"{name}, upsample {upsample}")
                if found is None:
                    continue
                box, score = found
                shape = self.predictor(img, box)
                pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], float)
                full = (pts + 0.5) / s - 0.5
                b = ((box.left() + 0.5) / s - 0.5, (box.top() + 0.5) / s - 0.5,
                     (box.right() + 0.5) / s - 0.5, (box.bottom() + 0.5) / s - 0.5)
                log.info("face found on the %s (score %.2f)", name, score)
                return LandmarkResult(full, score, "dlib", b, f"{name}, upsample {upsample}")
        raise FitError(f"no face found in {capture.root} (tried: {'; '.join(tried)})")


_DEFAULT: DlibLandmarks | None = None
_DEFAULT_LOCK = threading.Lock()


def default_detector() -> DlibLandmarks:
    """The process's detector with the default settings, made on first use and kept:
    reading the 68-point predictor file (~100 MB) takes most of a second, the detection
    itself a tenth, so a process that finds many faces reads it once."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = DlibLandmarks()
        return _DEFAULT


def needs_detector(capture: Capture, method: str = "auto") -> bool:
    """Whether :func:`get_landmarks` with ``method`` runs the detector on ``capture``."""
    if method not in ("auto", "session", "dlib"):
        raise ConfigError(f"unknown landmark method '{method}' (auto, session or dlib)")
    return method == "dlib" or (method == "auto" and capture.landmarks is None)


def get_landmarks(capture: Capture, method: str = "auto",
                  detector: DlibLandmarks | None = None) -> LandmarkResult:
    """Landmarks from the session (``session``), the detector (``dlib``), or the session
    when it has them and the detector otherwise (``auto``). Without ``detector`` the
    process's :func:`default_detector` is used."""
    if not needs_detector(capture, method):
        if capture.landmarks is None:
            raise FitError(f"{capture.root}: the session has no landmarks")
        return LandmarkResult(np.asarray(capture.landmarks, np.float64), float("nan"),
                              "session", None, "session file")
    return (detector or default_detector()).detect(capture)
