"""The allocator policy of faceps.core.memory."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from faceps.core import memory

GLIBC = memory._glibc() is not None

# Run in a child process: the policy is process-wide. Reports where glibc put a 64 MB
# array: bytes in mmapped blocks and in the heap (mallinfo2, glibc >= 2.33).
_CHILD = textwrap.dedent("""
    import ctypes, json, sys
    import numpy as np
    from faceps.core.memory import retain_freed_memory

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    if sys.argv[2] == "thread":  # allocated by a worker thread (its own arena by default)
        import threading
        box = []
        worker = threading.Thread(target=lambda: box.append(np.ones(8 * 2**20)))
        worker.start()
        worker.join()
    else:
        a = np.ones(8 * 2**20)
    info = libc.mallinfo2()
    print(json.dumps({"applied": applied, "mmapped": info.hblkhd, "heap": info.arena}))
""")


def _child(mode: str, env: dict | None = None, where: str = "main") -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _CHILD, mode, where], capture_output=True,
                         text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_arrays_come_from_the_heap_when_retained():
    size = 64 * 2**20
    plain = _child("plain")
    assert plain["mmapped"] >= size                      # glibc's default: one mmap
    kept = _child("retain", {memory.RETAIN_ENV: "1"})
    assert kept["applied"] is True
    assert kept["mmapped"] < size and kept["heap"] >= size
    off = _child("retain", {memory.RETAIN_ENV: "0"})
    assert off["applied"] is False and off["mmapped"] >= size


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="needs glibc >= 2.33 (mallinfo2)")
def test_worker_threads_share_the_retained_heap():
    size = 64 * 2**20
    env = {memory.RETAIN_ENV: "1", "MALLOC_ARENA_MAX": ""}
    plain = _child("plain", env, where="thread")
    assert plain["mmapped"] >= size                      # a thread arena maps it
    kept = _child("retain", env, where="thread")
    assert kept["applied"] is True
    assert kept["mmapped"] < size and kept["heap"] >= size


def test_limit_is_checked():
    with pytest.raises(ValueError, match="limit"):
        memory.retain_freed_memory(100)
    with pytest.raises(ValueError, match="limit"):
        memory.retain_freed_memory(2**31)


def test_off_switch_and_other_systems(monkeypatch):
    monkeypatch.setenv(memory.RETAIN_ENV, "off")
    assert memory.retain_freed_memory() is False
    monkeypatch.delenv(memory.RETAIN_ENV)
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.retain_freed_memory() is False
