"""torch_threads: a block of work with a given torch thread count, restored after."""

import numpy as np
import pytest
import torch

from faceps.core.errors import ConfigError
from faceps.core.threads import torch_threads
from faceps.optimize.photometric_proxy import PhotometricConfig


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored on errors too
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n must be >= 1"), torch_threads(0):
        pass


def test_photometric_fit_threads_option_is_checked():
    assert PhotometricConfig().threads == 1
    assert PhotometricConfig(threads=None).threads is None
    with pytest.raises(ConfigError, match="threads"):
        PhotometricConfig(threads=0)


def _blas_threads_now():
    from threadpoolctl import threadpool_info

    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_blas_threads_sets_and_restores_also_as_decorator():
    from faceps.core.threads import blas_threads

    before = _blas_threads_now()
    assert before, "numpy's BLAS is not visible to threadpoolctl"
    with blas_threads(1):
        assert _blas_threads_now() == [1] * len(before)
    assert _blas_threads_now() == before

    @blas_threads(1)
    def inside():
        return _blas_threads_now()

    assert inside() == [1] * len(before) and _blas_threads_now() == before
    with pytest.raises(ValueError, match="n must be >= 1"), blas_threads(0):
        pass
    with blas_threads(None):
        assert _blas_threads_now() == before


def test_reconstruction_runs_with_one_blas_thread(monkeypatch):
    # The normal update's own row-block threads must not sit on a BLAS pool.
    import faceps.optimize.normal_albedo as na

    seen = []
    real = na._for_row_blocks

    def spy(fn, blocks):
        seen.append(_blas_threads_now())
        return real(fn, blocks)

    monkeypatch.setattr(na, "_for_row_blocks", spy)
    rng = np.random.default_rng(0)
    H = W = 24
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    points = np.stack([xx - W / 2, yy - H / 2, np.full((H, W), 500.0)], -1)
    normals = np.zeros((H, W, 3))
    normals[..., 2] = -1.0
    lights = na.PointLights(positions=np.array([[-300.0, 0, 0], [0, 0, 0], [300.0, 0, 0]]),
                            intensities=np.full((3, 3), 3e5))
    images = rng.uniform(0.2, 0.4, (3, H, W, 3))
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # as on a multi-core machine
        na.update_normals_albedo(images, points, normals, np.ones((H, W), bool), lights)
    assert seen and all(s and set(s) == {1} for s in seen)
