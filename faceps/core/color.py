"""Colour encodings: sRGB and pure gamma to and from linear radiometry.

Images in memory are float32 linear (DESIGN conventions). ``decode`` turns stored code
values (already scaled to [0, 1]) into linear values according to a session's
``encoding`` string: ``linear``, ``srgb`` or ``gamma:<g>``.
"""

from __future__ import annotations

import re

import numpy as np

from faceps.core.errors import ConfigError

__all__ = [
    "srgb_to_linear",
    "linear_to_srgb",
    "gamma_to_linear",
    "linear_to_gamma",
    "parse_encoding",
    "decode",
    "encode",
    "srgb_to_linear_torch",
]

_GAMMA_RE = re.compile(r"^gamma:([0-9]*\.?[0-9]+)$")


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB decoding of values in [0, 1] (float32 out; values outside are
    extended by odd symmetry so negative noise survives a round trip)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    lin = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return (np.sign(x) * lin).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`srgb_to_linear` (float32, not clipped)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    enc = np.where(a <= 0.0031308, a * 12.92, 1.055 * np.power(a, 1.0 / 2.4) - 0.055)
    return (np.sign(x) * enc).astype(np.float32)


def gamma_to_linear(x: np.ndarray, gamma: float) -> np.ndarray:
    """Pure power-law decoding ``sign(x) |x|^gamma``."""
    x = np.asarray(x, dtype=np.float32)
    return (np.sign(x) * np.abs(x) ** np.float32(gamma)).astype(np.float32)


def linear_to_gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """Inverse of :func:`gamma_to_linear`."""
    x = np.asarray(x, dtype=np.float32)
    return (np.sign(x) * np.abs(x) ** np.float32(1.0 / gamma)).astype(np.float32)


def parse_encoding(encoding: str) -> tuple[str, float | None]:
    """Parse ``linear``, ``srgb`` or ``gamma:<g>`` into (kind, gamma).

    Raises:
        ConfigError: for any other string or a non-positive gamma.
    """
    if not isinstance(encoding, str):
        raise ConfigError(f"encoding must be a string, got {type(encoding).__name__}")
    enc = encoding.strip().lower()
    if enc in ("linear", "srgb"):
        return enc, None
    m = _GAMMA_RE.match(enc)
    if m:
        g = float(m.group(1))
        if g > 0:
            return "gamma", g
    raise ConfigError(f"unknown encoding '{encoding}' (expected linear, srgb or gamma:<g>)")


def decode(x: np.ndarray, encoding: str) -> np.ndarray:
    """Code values in [0, 1] -> linear float32, for an encoding string."""
    kind, g = parse_encoding(encoding)
    if kind == "linear":
        return np.asarray(x, dtype=np.float32)
    if kind == "srgb":
        return srgb_to_linear(x)
    return gamma_to_linear(x, g)


def encode(x: np.ndarray, encoding: str) -> np.ndarray:
    """Linear -> code values, the inverse of :func:`decode`."""
    kind, g = parse_encoding(encoding)
    if kind == "linear":
        return np.asarray(x, dtype=np.float32)
    if kind == "srgb":
        return linear_to_srgb(x)
    return linear_to_gamma(x, g)


def srgb_to_linear_torch(x):
    """Torch version of :func:`srgb_to_linear`."""
    import torch

    a = x.abs()
    lin = torch.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return torch.sign(x) * lin
