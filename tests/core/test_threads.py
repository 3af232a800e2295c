"""torch_threads: a block of work with a given torch thread count, restored after."""

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
