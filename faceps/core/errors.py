"""Project errors and the runtime shape check used by every public function.

Every error a user can cause derives from :class:`FacepsError`; the command line turns
it into one line on stderr and exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "FacepsError",
    "SessionError",
    "ModelError",
    "ShapeError",
    "DatasetError",
    "ConfigError",
    "FitError",
    "check_shape",
    "check_finite",
]


class FacepsError(Exception):
    """Base class of all errors raised on purpose by faceps."""


class SessionError(FacepsError):
    """A capture session (contract 1) is missing, unreadable or malformed.

    The message names the file and, where there is one, the field.
    """

    def __init__(self, message: str, *, path: object | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if field is not None:
            parts.append(f"field '{field}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelError(FacepsError):
    """A morphable model file (contract 5) or an import source is malformed."""


class ShapeError(FacepsError, ValueError):
    """An array argument has the wrong shape or dtype."""


class DatasetError(FacepsError):
    """An HDF5 dataset (contract 4) is missing, corrupt or inconsistent."""


class ConfigError(FacepsError, ValueError):
    """An option or configuration value is invalid."""


class FitError(FacepsError):
    """An optimisation could not produce a usable result (diverged, no data)."""


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_shape(
    array: object,
    name: str,
    shape: Sequence[int | str | None],
    *,
    leading: bool = False,
) -> dict[str, int]:
    """Check ``array.shape`` against a pattern and return the sizes bound to names.

    Args:
        array: a numpy array or torch tensor (anything with ``.shape`` and ``.ndim``).
        name: the argument name, used in the error message.
        shape: one entry per trailing axis: an int (exact size), ``None`` (any size), or a
            string naming a size that must agree wherever the same name appears.
        leading: when True any number of extra leading (batch) axes is allowed.

    Returns:
        a dict from the named sizes to their values.

    Raises:
        ShapeError: naming the argument, the expected and the actual shape.
    """
    actual = tuple(getattr(array, "shape", ()))
    if not hasattr(array, "shape"):
        raise ShapeError(f"expected {name} to be an array of shape {_fmt_shape(shape)}; "
                         f"got {type(array).__name__}")
    n = len(shape)
    if (len(actual) < n) if leading else (len(actual) != n):
        raise ShapeError(
            f"expected {name} to have shape {'(..., ' if leading else ''}"
            f"{_fmt_shape(shape)[1:] if leading else _fmt_shape(shape)}; got {actual}"
        )
    bound: dict[str, int] = {}
    tail = actual[len(actual) - n:] if n else ()
    for want, got in zip(shape, tail):
        if want is None:
            continue
        if isinstance(want, str):
            if want in bound and bound[want] != got:
                raise ShapeError(f"expected {name} to have shape {_fmt_shape(shape)} with "
                                 f"consistent '{want}'; got {actual}")
            bound[want] = int(got)
        elif int(want) != got:
            raise ShapeError(f"expected {name} to have shape {_fmt_shape(shape)}; got {actual}")
    return bound


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise :class:`ShapeError` if ``array`` holds NaN or infinite values."""
    if not np.all(np.isfinite(np.asarray(array))):
        raise ShapeError(f"expected {name} to be finite; it holds NaN or infinite values")
