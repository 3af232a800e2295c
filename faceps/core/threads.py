"""Thread counts of torch's and BLAS's pools for a block of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["torch_threads", "blas_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (restored after).

    Small tensors (a proxy of some thousand vertices, a 128 px crop) gain nothing from
    torch's thread pool, and on a machine whose cores are busy its spinning threads make
    the same work several times slower (measured on a loaded 2-core machine: a proxy
    raster 8.7 ms with 1 thread against 29 ms with 2; the photometric proxy fit of a
    1600x1200 session 3.8 s against 33.6 s). Results do not depend on the count.

    Args:
        n: threads inside the block; None leaves torch's setting alone.
    """
    if n is None:
        yield
        return
    import torch

    if int(n) < 1:
        raise ValueError(f"torch_threads: n must be >= 1; got {n}")
    old = torch.get_num_threads()
    if old == int(n):
        yield
        return
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run numpy's and scipy's BLAS (OpenBLAS, MKL, BLIS) with ``n`` threads inside the
    block (restored after; through ``threadpoolctl``). Also usable as a decorator.

    The reconstruction's arrays are long and thin ((M, 3) by (3, 3) products, small
    systems per pixel) and it runs its own worker threads over row blocks. A BLAS pool
    on top of them only oversubscribes the cores, and OpenBLAS's threads spin between
    calls. ``faceps reconstruct`` on two 1600x1200 sessions (two cores, three runs each)
    used 8.8 / 11.9 s of CPU instead of 11.6 / 15.2 with one BLAS thread, for the same
    wall time or slightly less (8.9 / 11.9 s against 9.2 / 12.0). Results are equal up
    to BLAS's summation order (normals within 1e-6).

    Args:
        n: BLAS threads inside the block; None leaves them alone.
    """
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"blas_threads: n must be >= 1; got {n}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield
