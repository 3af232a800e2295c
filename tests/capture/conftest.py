"""Small capture sessions built with faceps' own writer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faceps.capture import write_session
from faceps.core import Camera, PointLights

WIDTH, HEIGHT = 40, 32
LIGHT_NAMES = ("left", "front", "right")


def make_camera(size: tuple[int, int] = (WIDTH, HEIGHT), distortion=None) -> Camera:
    """A camera with fx != fy and an off-centre principal point."""
    W, H = size
    K = np.array([[1.5 * W, 0.0, 0.52 * (W - 1)], [0.0, 1.45 * W, 0.47 * (H - 1)],
                  [0.0, 0.0, 1.0]])
    return Camera(K, (W, H), distortion)


def make_images(n: int = 3, size: tuple[int, int] = (WIDTH, HEIGHT), seed: int = 0,
                peak: float = 0.8) -> np.ndarray:
    """(n, H, W, 3) float32 smooth linear images in [0.01, peak]."""
    W, H = size
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, W), np.linspace(0, 1, H))
    out = np.empty((n, H, W, 3), np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = 0.5 + 0.5 * np.sin(3 * a * u + 2 * b * v + c)
        for ch in range(3):
            out[i, ..., ch] = 0.01 + (peak - 0.01) * base * rng.uniform(0.6, 1.0)
    return out


def make_landmarks(size: tuple[int, int] = (WIDTH, HEIGHT), seed: int = 1) -> np.ndarray:
    """(68, 2) float64 points inside the image, with fractional coordinates."""
    W, H = size
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.2 * W, 0.8 * W, 68), rng.uniform(0.2 * H, 0.8 * H, 68)],
                    axis=1)


def make_mask(size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """(H, W) bool ellipse."""
    W, H = size
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    return ((u - W / 2) / (0.35 * W)) ** 2 + ((v - H / 2) / (0.4 * H)) ** 2 < 1


def make_lights(names=LIGHT_NAMES) -> PointLights:
    n = len(names)
    positions = np.stack([np.linspace(-150, 150, n), np.full(n, -20.0), np.full(n, 10.0)], 1)
    intensities = np.linspace(8e4, 1.2e5, 3 * n).reshape(n, 3)
    return PointLights(positions, intensities, names=tuple(names))


def read_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "session.json").read_text())


def write_json(folder: Path, data: Any) -> None:
    (Path(folder) / "session.json").write_text(json.dumps(data, indent=1, allow_nan=True))


@pytest.fixture
def images() -> np.ndarray:
    return make_images()


@pytest.fixture
def session_dir(tmp_path: Path, images: np.ndarray) -> Path:
    """An 8-bit sRGB session with mask, landmarks, lights and labels."""
    return write_session(tmp_path / "session", images, make_camera(), light_names=LIGHT_NAMES,
                         lights=make_lights(), landmarks=make_landmarks(), mask=make_mask(),
                         subject="s001", expression="neutral")


@pytest.fixture
def minimal_dir(tmp_path: Path, images: np.ndarray) -> Path:
    """An 8-bit session with only the required fields (and the encoding)."""
    return write_session(tmp_path / "minimal", images, make_camera(), light_names=LIGHT_NAMES)


@pytest.fixture
def edit_session() -> Callable[[Path, Callable[[dict], Any]], Path]:
    """Apply ``change(data)`` to a session's JSON in place and return the folder."""

    def edit(folder: Path, change: Callable[[dict], Any]) -> Path:
        data = read_json(folder)
        change(data)
        write_json(folder, data)
        return folder

    return edit
