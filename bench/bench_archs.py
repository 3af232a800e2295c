"""Benchmark: every normal-estimation architecture on the same held-out test sets.

Each trained run (``NAME=RUN``, a run folder or ``.pt`` file of ``faceps train normal``) is
scored by ``faceps evaluate`` (:func:`faceps.learn.evaluate.evaluate`) on every test set
given (``LABEL=DATA``, e.g. a near-light and an in-the-wild split), with one input image
(the single-image rows ``S1``, ``S2``, ... pooled: every image of the file is used, one at
a time: evaluate's row ``S*``) and, for networks that read several images,
with all of them. Errors are angular errors in degrees pooled over the pixels of the
evaluation region (the face region covered by the proxy, the same pixels for every
architecture): mean +- std, median, and the share of pixels below 20, 25 and 30 degrees,
as the papers report. Then the parameter count (inference path) and the CPU time of one
forward pass on one 128 x 128 image (batch 1, median of ``--repeats`` after a warm-up, with
1 and 2 torch threads).

Run: ``.venv/bin/python bench/bench_archs.py --run facepsnet=runs/normal9
--run casfne=runs/casfne --data near=data/split_id15/test.json
--data wild=data/split_wild/test.json [--max-samples N]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from faceps.learn.checkpoint import load_network
from faceps.learn.evaluate import POOLED_SINGLE, evaluate
from faceps.learn.normalnet import default_passes


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if "=" not in v:
            raise SystemExit(f"--{what} needs NAME=PATH; got {v!r}")
        name, path = v.split("=", 1)
        out.append((name, path))
    return out


def inference_parameters(net: torch.nn.Module) -> int:
    """Parameters used at inference: all but a training-only discriminator."""
    skip = {id(p) for name, m in net.named_children() if "discriminator" in name
            for p in m.parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in skip)


def time_forward(net: torch.nn.Module, size: int, threads: int, repeats: int,
                 passes: int = 1) -> float:
    """Median milliseconds of one forward pass on one image (batch 1; ``passes`` passes of
    a network that refines its own estimate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        img = torch.rand(1, 1, 3, size, size, generator=g)
        proxy = torch.zeros(1, 3, size, size)
        proxy[:, 2] = -1
        mask = torch.ones(1, size, size)
        times = []
        with torch.inference_mode():
            kw = {"passes": passes} if passes > 1 else {}
            net(img, proxy, None, mask, **kw)
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(img, proxy, None, mask, **kw)
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN (repeatable)")
    ap.add_argument("--data", action="append", required=True, help="LABEL=DATA (repeatable)")
    ap.add_argument("--max-samples", type=int, help="first N samples of each test set")
    ap.add_argument("--size", type=int, default=128, help="timing crop size (default 128)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--images", type=int, default=3,
                    help="the many-image row of multi-image networks (default 3)")
    args = ap.parse_args()
    runs, datas = _pairs(args.run, "run"), _pairs(args.data, "data")

    print("| network | arch | images | test set | mean +- std (deg) | median | < 20 (%) | "
          "< 25 (%) | < 30 (%) | stages t=0..T mean (deg) |")
    print("|" + " --- |" * 10)
    costs = []
    for name, run in runs:
        loaded = load_network(run, kind="normal")
        net = loaded.network
        arch = str(getattr(net.config, "arch", "facepsnet"))
        counts = [1] if getattr(net, "single_image", False) else [1, None]
        for label, data in datas:
            for k in counts:
                res = evaluate(run, data, n_images=[1] if k == 1 else [args.images],
                               write=False,
                               n_maps=0, max_samples=args.max_samples, device="cpu")
                if k == 1:
                    row = res.rows.get(POOLED_SINGLE) or res.rows["S1"]
                    n_img = "1"
                else:
                    key = max((r for r in res.rows if r.startswith("S") and r != POOLED_SINGLE),
                              key=lambda r: r.count("&"))
                    row, n_img = res.rows[key], str(key.count("&") + 1)
                stages = ("" if not res.stages else
                          ", ".join(f"{v['mean_deg']:.2f}" for v in res.stages.values()))
                print(f"| {name} | {arch} | {n_img} | {label} | {row['mean_deg']:.2f} +- "
                      f"{row['std_deg']:.2f} | {row['median_deg']:.2f} | "
                      f"{row['below_20_pct']:.1f} | {row['below_25_pct']:.1f} | "
                      f"{row['below_30_pct']:.1f} | {stages} |", flush=True)
        net.eval()
        passes = default_passes(loaded.train_config) if arch == "facepsnet" else 1
        costs.append((name, arch, inference_parameters(net),
                      time_forward(net, args.size, 1, args.repeats, passes),
                      time_forward(net, args.size, 2, args.repeats, passes)))
    print()
    print(f"| network | arch | parameters | ms / image, {args.size} px, 1 thread | "
          f"2 threads |")
    print("| --- | --- | --- | --- | --- |")
    for name, arch, n_par, t1, t2 in costs:
        print(f"| {name} | {arch} | {n_par:,} | {t1:.1f} | {t2:.1f} |")


if __name__ == "__main__":
    main()
