import numpy as np
import pytest

from faceps.core.imageio import block_sum_2x2


def _reference(X: np.ndarray, lead: int) -> np.ndarray:
    """2x2 block sums by padding and reshaping, in float64."""
    X = np.asarray(X, np.float64)
    H, W = X.shape[lead], X.shape[lead + 1]
    H2, W2 = (H + 1) // 2, (W + 1) // 2
    pad = [(0, 0)] * lead + [(0, 2 * H2 - H), (0, 2 * W2 - W)] + [(0, 0)] * (X.ndim - lead - 2)
    shape = X.shape[:lead] + (H2, 2, W2, 2) + X.shape[lead + 2:]
    return np.pad(X, pad).reshape(shape).sum(axis=(lead + 1, lead + 3))


@pytest.mark.parametrize("shape,lead", [((6, 8), 0), ((7, 9, 3), 0), ((2, 5, 4, 3), 1),
                                        ((3, 1, 1), 1), ((3, 8, 7), 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, bool])
def test_block_sum_2x2_matches_the_reshaped_sum(shape, lead, dtype):
    rng = np.random.default_rng(len(shape) + lead)
    X = rng.normal(size=shape)
    X = (X > 0) if dtype is bool else X.astype(dtype)
    out = block_sum_2x2(X, lead=lead)
    ref = _reference(X, lead)
    assert out.dtype == np.float64 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_block_sum_2x2_keeps_nan_in_its_block_only():
    X = np.zeros((4, 4))
    X[0, 1] = np.nan
    out = block_sum_2x2(X)
    assert np.isnan(out[0, 0]) and np.isfinite(out).sum() == 3
