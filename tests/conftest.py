"""Fixtures shared by the test packages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module: OpenMP's spinning barriers make two threads
    many times slower on a loaded 2-core machine, and the tests' tensors are small."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
