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


# Faults in 256 MiB ahead (or not), then counts the page faults of a fresh 128 MiB array
# written in full.
_PREFAULT_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from faceps.core.memory import prefault_heap, retain_freed_memory

    # 4 KiB pages for numpy's large arrays, so that faults count pages here
    np._core.multiarray._set_madvise_hugepage(False)
    applied = retain_freed_memory() if sys.argv[1] != "plain" else None
    thread = prefault_heap(256 * 2**20) if sys.argv[1] == "prefault" else None
    if thread is not None:
        thread.join()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(128 * 2**20, np.uint8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "started": thread is not None,
                      "faults": faults}))
""")


def _prefault_child(mode: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _PREFAULT_CHILD, mode], capture_output=True,
                         text=True, check=True, env={**os.environ, memory.RETAIN_ENV: "1"})
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC or memory.available_memory() is None,
                    reason="needs glibc and /proc/meminfo")
def test_prefaulted_heap_serves_the_next_arrays_without_faults():
    cold = _prefault_child("retain")
    assert cold["applied"] is True and cold["started"] is False
    if cold["faults"] < 1000:
        pytest.skip("the kernel gives this process huge pages everywhere (THP 'always')")
    warm = _prefault_child("prefault")
    assert warm["started"] is True
    # 128 MiB are 32768 pages of 4 KiB (fewer faults where the kernel gave huge pages);
    # memory the prefault thread touched and freed is taken without faulting again
    assert warm["faults"] < 200
    assert cold["faults"] > 10 * max(warm["faults"], 1)


def test_prefault_needs_the_retained_heap_and_a_sensible_size(monkeypatch):
    monkeypatch.setattr(memory, "_retained_limit", 0)
    assert memory.prefault_heap(2**30) is None           # freed memory would go back
    monkeypatch.setattr(memory, "_retained_limit", memory._LIMIT)
    assert memory.prefault_heap(2**20) is None           # too little to be worth a thread
    assert memory.prefault_heap(-5) is None
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert memory.prefault_heap(2**30) is None           # not known to be there


def test_available_memory_reads_meminfo(monkeypatch, tmp_path):
    free = memory.available_memory()
    assert free is None or free > 0
    import builtins

    real_open = builtins.open

    def fake(path, *a, **k):
        if path == "/proc/meminfo":
            p = tmp_path / "meminfo"
            p.write_text("MemTotal:  100 kB\nMemAvailable:  42 kB\n")
            return real_open(p, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake)
    assert memory.available_memory() == 42 * 1024
