"""Benchmark: the closed-form 3x3 eigen-decomposition against LAPACK, and the normal step's
sphere-constrained solve that uses it.

Prints, for stacks of random symmetric 3x3 matrices, the time of ``numpy.linalg.eigh`` and
of :func:`faceps.core.eig3.eigh3` (best of ``--repeat``; both run on one core), their ratio and
the largest eigenvalue difference; then :func:`faceps.optimize.normal_albedo.
sphere_quadratic_min` against the LAPACK-based version it replaced, on problems shaped
like the normal step's (a data matrix of three
rank-one light terms, one of them often missing, plus the prior).
Run: ``.venv/bin/python bench/bench_eig3.py [--sizes 30000 240000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from faceps.core.eig3 import eigh3
from faceps.core.memory import retain_freed_memory
from faceps.optimize.normal_albedo import sphere_quadratic_min


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sphere_min_lapack(A: np.ndarray, c: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """The previous ``sphere_quadratic_min``: LAPACK eigh on the whole stack, then Newton on
    the secular equation over the elements still iterating (the baseline of the ratio)."""
    lam, Q = np.linalg.eigh(0.5 * (A + np.swapaxes(A, 1, 2)))
    gap = lam - lam[:, :1]
    z = np.einsum("mki,mk->mi", Q, c)
    floor = np.maximum(1e-12 * np.linalg.norm(c, axis=1), 1e-300)
    z[:, 0] = np.where(np.abs(z[:, 0]) < floor, np.where(z[:, 0] < 0, -floor, floor), z[:, 0])
    lo = np.abs(z[:, 0])
    hi = np.maximum(np.linalg.norm(z, axis=1), lo)
    t = lo.copy()
    act = np.arange(t.size)
    for _ in range(max_iter):
        den = gap[act] + t[act, None]
        p = z[act] / den
        pn = np.linalg.norm(p, axis=1)
        f = 1.0 / pn - 1.0
        df = np.einsum("mk,mk->m", p * p, 1.0 / den) / pn**3
        t[act] = np.clip(t[act] - f / df, lo[act], hi[act])
        act = act[np.abs(f) > 1e-14]
        if act.size == 0:
            break
    n = np.einsum("mik,mk->mi", Q, z / (gap + t[:, None]))
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[30000, 240000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| matrices | numpy eigh (ms) | eigh3 (ms) | speed-up | max eigenvalue diff |")
    print("|---|---|---|---|---|")
    for M in args.sizes:
        B = rng.standard_normal((M, 3, 3))
        A = B + B.transpose(0, 2, 1)
        t_np = best_of(lambda A=A: np.linalg.eigh(A), args.repeat)
        t_e3 = best_of(lambda A=A: eigh3(A), args.repeat)
        diff = float(np.abs(eigh3(A)[0] - np.linalg.eigvalsh(A)).max())
        print(f"| {M} | {1e3 * t_np:.1f} | {1e3 * t_e3:.1f} | {t_np / t_e3:.1f}x | "
              f"{diff:.1e} |")
    print("\n| elements | LAPACK-based (ms) | sphere_quadratic_min (ms) | speed-up | "
          "max angle between them (deg) |")
    print("|---|---|---|---|---|")
    for M in args.sizes:
        g = rng.standard_normal((M, 3, 3))
        w = (rng.random((M, 3)) > 0.3).astype(float)           # some lights missing
        A = np.einsum("ml,mli,mlj->mij", w, g, g)
        n0 = rng.standard_normal((M, 3))
        n0 /= np.linalg.norm(n0, axis=1, keepdims=True)
        c = np.einsum("ml,mli->mi", w, g) + 0.1 * n0
        t_ref = best_of(lambda A=A, c=c: sphere_min_lapack(A, c), args.repeat)
        t = best_of(lambda A=A, c=c: sphere_quadratic_min(A, c), args.repeat)
        cos = np.einsum("mi,mi->m", sphere_min_lapack(A, c), sphere_quadratic_min(A, c))
        ang = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).max())
        print(f"| {M} | {1e3 * t_ref:.1f} | {1e3 * t:.1f} | {t_ref / t:.1f}x | {ang:.1e} |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
