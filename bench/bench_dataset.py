"""Throughput of the synthetic dataset builder and the cost of its HDF5 compression.

Builds n samples (default 64 at 256 x 256, 3 lights, cast shadows, default sheen and noise)
with 1 and 2 workers and prints markdown tables: end-to-end samples/s, where the time goes
(render stages from ``RenderedFace.timings`` summed over samples, HDF5 writing and waiting
in the main process), the bytes per sample of each dataset, and gzip levels 1-4 (with the
shuffle filter) measured on the same samples.

    python bench/bench_dataset.py [--n 64] [--size 256] [--workers 1 2] [--levels 1 2 3 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from faceps.core.memory import retain_freed_memory
from faceps.datasets.build import DatasetConfig, build_dataset
from faceps.datasets.schema import SAMPLES, create_file

STAGES = ("crop", "detail", "raycast", "shading", "sensor", "proxy", "pack", "compress")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_builds(root: Path, n: int, size: int, workers: list[int], shard_size: int):
    rows = []
    last = None
    for w in workers:
        out = root / f"w{w}" / "data.h5"
        load = os.getloadavg()[0]
        cpu0 = _cpu_seconds()
        result = build_dataset(out, n, size=size, seed=0, workers=w, shard_size=shard_size,
                               config=DatasetConfig(n_lights=3))
        rows.append((w, result, _cpu_seconds() - cpu0, load))
        last = result
    print(f"\n### Throughput: n={n}, {size}x{size}, 3 lights, cast shadows, sheen, noise\n")
    print("| workers | samples/s | wall s | first sample s | main: write ms/sample "
          "| main: wait ms/sample | MiB/sample | CPU ms/sample (all processes) "
          "| load average at start |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, r, cpu, load in rows:
        t = r.timings
        first = t.get("first_sample", 0.0)
        print(f"| {w} | {r.samples_per_second:.2f} | {r.seconds:.1f} | {first:.1f} | "
              f"{1e3 * t['write'] / n:.1f} | {1e3 * t['wait'] / n:.1f} | "
              f"{r.file_bytes / n / 2**20:.2f} | {1e3 * cpu / n:.0f} | {load:.1f} |")
    print("\n### Render stages (ms per sample, CPU time in the rendering process)\n")
    print("| workers | " + " | ".join(STAGES) + " | total |")
    print("|---:|" + "---:|" * (len(STAGES) + 1))
    for w, r, _, _ in rows:
        vals = [1e3 * r.timings.get(s, 0.0) / n for s in STAGES]
        print(f"| {w} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals):.1f} |")
    return last


def bench_storage(result, levels: list[int], size: int) -> None:
    """Per-dataset bytes of the built shards, then gzip levels re-measured on the samples."""
    per: dict[str, int] = {}
    raw: dict[str, int] = {}
    for shard in result.shards:
        with h5py.File(shard, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    per[name] = per.get(name, 0) + obj.id.get_storage_size()
                    raw[name] = raw.get(name, 0) + obj.size * obj.dtype.itemsize
            f[SAMPLES].visititems(visit)
    n = result.n
    print(f"\n### Storage per sample at gzip level of the build (n={n})\n")
    print("| dataset | KiB/sample | raw KiB/sample | ratio |")
    print("|---|---:|---:|---:|")
    for name in sorted(per, key=lambda k: -per[k]):
        ratio = raw[name] / per[name] if per[name] else float("nan")
        print(f"| {name} | {per[name] / n / 1024:.1f} | {raw[name] / n / 1024:.1f} | "
              f"{ratio:.2f} |")
    print(f"| **total** | {sum(per.values()) / n / 1024:.1f} | {sum(raw.values()) / n / 1024:.1f}"
          f" | {sum(raw.values()) / max(sum(per.values()), 1):.2f} |")

    samples = []
    with h5py.File(result.path, "r") as f:
        g = f[SAMPLES]
        names = []
        g.visititems(lambda k, o: names.append(k) if isinstance(o, h5py.Dataset) else None)
        for i in range(n):
            samples.append({k: (g[k].asstr()[i] if h5py.check_string_dtype(g[k].dtype)
                                else g[k][i]) for k in names})
        dims = (g["images"].shape[1], g["params/id"].shape[1], g["params/exp"].shape[1],
                g["params/albedo"].shape[1])
        attrs = dict(f.attrs)
    print(f"\n### gzip level (shuffle on), same {n} samples, written in one process\n")
    print("| level | MiB/sample | write ms/sample | images KiB/sample |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for level in levels:
            path = Path(tmp) / f"l{level}.h5"
            t0 = time.perf_counter()
            with create_file(path, n, dims[0], size, size, *dims[1:], attrs,
                             compression=level) as f:
                for i, s in enumerate(samples):
                    for k, v in s.items():
                        if not (isinstance(v, np.ndarray) and v.size == 0):
                            f[SAMPLES][k][i] = v
            dt = time.perf_counter() - t0
            with h5py.File(path, "r") as f:
                img = f[f"{SAMPLES}/images"].id.get_storage_size()
            print(f"| {level} | {path.stat().st_size / n / 2**20:.3f} | {1e3 * dt / n:.1f} | "
                  f"{img / n / 1024:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--shard-size", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_builds(Path(tmp), args.n, args.size, args.workers, args.shard_size)
        bench_storage(result, args.levels, args.size)


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
