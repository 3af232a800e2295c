"""How the process's C allocator treats large arrays (glibc on Linux).

faceps works on arrays of hundreds of thousands to millions of elements (a 1600x1200
session's per-pixel maps, (L, M, 3) sample stacks of the normal/albedo update), and numpy
allocates a new one for nearly every intermediate result. glibc's ``malloc`` serves every
request above its mmap threshold (at most 32 MB by default) with a fresh ``mmap`` and
returns it to the system on ``free``, so each such temporary is faulted in page by page
again: on the 2-core VM of ``bench/RESULTS.md`` a fresh 50 MB array cost about 150 ms
the first time and 14 ms after (transparent huge pages), against 7 ms for the same
``np.sqrt`` into memory the process already has; ``faceps reconstruct`` of a 1600x1200
session went from 14.1-14.7 s to 12.3-12.5 s with freed memory kept.

:func:`retain_freed_memory` raises glibc's mmap and trim thresholds so that large blocks
come from the heap and freed ones stay there for the next array, and keeps every thread
on that one heap (``M_ARENA_MAX`` 1): a thread's own arena is a chain of 64 MB heaps, so
its larger arrays were still mapped and unmapped one by one (the normal update's row-block
threads, the session reader). With the single arena, ``faceps reconstruct`` of two
1600x1200 sessions had 173k / 184k page faults instead of 235k / 270k and took 9.1 / 11.9
s instead of 9.4 / 12.0 (three runs each, alternating). numpy's few, large allocations
make the shared arena's lock no bottleneck; Python's small objects do not use it.

The price is that the process keeps its peak memory until it exits (the heap above the
trim threshold is still returned). The ``faceps`` command line and its worker processes
apply it; library users may call it themselves. ``FACEPS_RETAIN_MEMORY=0`` in the
environment turns it off. On other C libraries or systems it does nothing.

With freed memory kept, what is left of the cost is the first touch: a fresh process
still faults in every page of its heap once, on the 2-core VM of bench/RESULTS.md most
of a second of a core per GiB (the kernel zeroing 4 KiB pages one fault at a time; less
where it has huge pages free). :func:`prefault_heap` pays it ahead, in a background
thread, on memory the command is about to need: a fresh ``faceps reconstruct`` of a
1600x1200 session spent 1.2-1.5 s longer in its reconstruction than the same call run a
second time in one process, most of it in the first height field (bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

__all__ = ["RETAIN_ENV", "available_memory", "prefault_heap", "retain_freed_memory"]

RETAIN_ENV = "FACEPS_RETAIN_MEMORY"
_M_TRIM_THRESHOLD = -1   # mallopt parameters of glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_LIMIT = 2**31 - 1       # mallopt takes an int: 2 GiB - 1
_PREFAULT_BLOCK = 2**28  # 256 MiB per block: far below the mmap threshold set here

#: the thresholds set by :func:`retain_freed_memory` (0: not set)
_retained_limit = 0


def _glibc() -> ctypes.CDLL | None:
    """This process's glibc, or None (another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        libc.mallopt  # noqa: B018 - raises AttributeError where absent
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def retain_freed_memory(limit: int = _LIMIT) -> bool:
    """Keep large freed blocks in the process for the next arrays (see the module doc).

    Call it early, before the process starts threads: threads that already have an arena
    of their own keep it.

    Args:
        limit: the mmap and trim thresholds in bytes (requests above it are still
            mapped and unmapped one by one); between 1 MiB and 2 GiB - 1.

    Returns:
        True when the allocator was set, False when it was left alone (not glibc, or
        ``FACEPS_RETAIN_MEMORY`` is ``0``, ``no``, ``false`` or ``off``).

    Raises:
        ValueError: ``limit`` out of range.
    """
    if not 2**20 <= int(limit) <= _LIMIT:
        raise ValueError(f"retain_freed_memory: limit must be in [1 MiB, 2 GiB - 1]; "
                         f"got {limit!r}")
    if os.environ.get(RETAIN_ENV, "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    global _retained_limit
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(int(limit))) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(int(limit))) == 1
          and libc.mallopt(_M_ARENA_MAX, ctypes.c_int(1)) == 1)
    if not ok:
        log.debug("glibc refused the malloc thresholds; the allocator is unchanged")
    _retained_limit = int(limit) if ok else 0
    return ok


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable`` of
    ``/proc/meminfo``), or None where that is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _prefault(nbytes: int) -> None:
    import numpy as np

    blocks = []
    try:
        # a lower priority for this thread only (Linux threads have their own nice
        # value): it should take a core nobody else wants, not slow the command down
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass
    try:
        left = nbytes
        while left > 0:
            size = min(left, _PREFAULT_BLOCK)
            block = np.empty(size, np.uint8)
            blocks.append(block)
            # zeros written through ctypes, which releases the GIL: each page is
            # faulted in by its first write. (madvise(MADV_POPULATE_WRITE) faults a
            # range in one call but holds the memory-map lock meanwhile, and the imports
            # beside it, which map shared libraries, waited for it: 0.5-1.2 s longer.)
            ctypes.memset(block.ctypes.data, 0, size)
            left -= size
    except MemoryError:
        pass
    finally:
        # freed next to each other, the blocks merge into one free region of the heap
        # that the trim threshold keeps in the process
        del blocks


def prefault_heap(nbytes: int, *, max_fraction: float = 0.25) -> threading.Thread | None:
    """Fault in about ``nbytes`` of heap memory in a background thread and free it again,
    so that the large arrays that follow take pages the process already has.

    Only useful, and only done, after :func:`retain_freed_memory` succeeded (otherwise
    freed memory goes back to the system). The thread is a daemon at a lower priority;
    the work it saves the caller is done by a core the caller leaves idle (most of
    faceps' stages are single-threaded), and on a busy machine it costs what the first
    touch would have cost anyway, as long as ``nbytes`` does not exceed what the caller
    goes on to use. The process keeps the memory until it exits, like any memory it
    retains.

    Args:
        nbytes: bytes to fault in; capped at ``max_fraction`` of the available memory.
        max_fraction: the largest share of :func:`available_memory` to take.

    Returns:
        the started thread, or None when nothing was done (allocator not set, nothing to
        do, or the memory is not known to be available).
    """
    if _retained_limit == 0:           # set only where glibc took the thresholds
        return None
    free = available_memory()
    if free is None:
        return None
    nbytes = int(min(max(int(nbytes), 0), max_fraction * free))
    if nbytes < _PREFAULT_BLOCK // 4:
        return None
    thread = threading.Thread(target=_prefault, args=(nbytes,), name="faceps-prefault",
                              daemon=True)
    thread.start()
    return thread
