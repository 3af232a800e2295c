"""One tolerance table for the test suite and an assert that explains itself."""

from __future__ import annotations

import numpy as np

#: (rtol, atol) per dtype name
TOL = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
}


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None,
                 name: str = "value") -> None:
    """Like ``np.testing.assert_allclose`` with per-dtype defaults from :data:`TOL`; the
    message names the worst element, where it is, and both values."""
    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual)
    e = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected)
    dt = np.result_type(a.dtype, e.dtype)
    r0, a0 = TOL.get(str(dt), TOL["float32"])
    rtol = r0 if rtol is None else rtol
    atol = a0 if atol is None else atol
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    err = np.abs(a64 - e64) - (atol + rtol * np.abs(e64))
    both_nan = np.isnan(a64) & np.isnan(e64)
    err = np.where(both_nan, -1.0, np.nan_to_num(err, nan=np.inf))
    if err.size and err.max() > 0:
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(
            f"{name}: {int((err > 0).sum())} of {err.size} elements differ; worst at {idx}: "
            f"{a64[idx]!r} vs expected {e64[idx]!r} (rtol={rtol}, atol={atol})")
