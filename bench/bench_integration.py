"""Benchmark: depth from the learned normals by each integrator of ``faceps infer``.

For synthetic sessions (built-in faces, near lights, seeds ``--seeds``), ``faceps infer``
runs once per integrator on the same network output:

- ``gn``: our Gauss-Newton height field (eq. 7) with the proxy depth as prior (default);
- ``wls``: weighted least squares of the log-depth gradients on the staggered grid of the
  WLS paper, unweighted (``--wls-lambda 0``);
- ``wls+W``: the same weighted by ``1 / (1 + lambda W)`` with W the depth-gradient
  magnitude the network predicts (a NormalNet trained with ``grad_head``; lambda 0.1, the
  paper's);
- ``fc``: Frankot-Chellappa.

Depth error: the mean absolute difference (mm) to the ground-truth depth over the pixels
both cover, after removing the median difference (the integrators' depth is fixed only up
to the proxy's placement, which is the same for all); also the RMS and the solve time.

Run: ``.venv/bin/python bench/bench_integration.py --normal-weights runs/normal_grad
[--seeds 1 2 3] [--size 640x480] [--images 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from faceps.capture import load_session
from faceps.learn.infer import InferConfig, infer, load_networks
from faceps.synth.session import SessionSynthConfig, synth_session

METHODS = {"gn": {"integrate": "gn"},
           "wls": {"integrate": "wls", "wls_lambda": 0.0},
           "wls+W": {"integrate": "wls", "wls_lambda": 0.1},
           "fc": {"integrate": "fc"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--normal-weights", required=True,
                    help="a NormalNet run or .pt trained with grad_head")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--images", type=int, default=3)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    nets = load_networks(InferConfig(normal_weights=args.normal_weights))
    if not getattr(nets.normal.network.config, "grad_head", False):
        raise SystemExit(f"{args.normal_weights}: this network does not predict W "
                         f"(train it with grad_head)")
    errs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"s{seed}"
            synth_session(folder, seed=seed, config=SessionSynthConfig(size=(w, h)))
            cap = load_session(folder)
            gt = np.load(folder / "ground_truth" / "depth.npy")
            for name, opts in METHODS.items():
                inf = infer(cap, InferConfig(num_images=args.images, **opts), networks=nets)
                m = inf.mask & np.isfinite(inf.depth) & np.isfinite(gt)
                d = inf.depth[m] - gt[m]
                d = d - np.median(d)
                t = float(inf.report["height_field"].get("timings", {}).get("total", np.nan))
                errs[name].append((float(np.mean(np.abs(d))), float(np.sqrt(np.mean(d * d))),
                                   t))
    print(f"{len(args.seeds)} sessions {w}x{h}, {args.images} image(s), network "
          f"{args.normal_weights}\n")
    print("| integrator | depth mean abs (mm) | depth RMS (mm) | solve (s) | per session |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in errs.items():
        a = np.asarray(rows)
        print(f"| {name} | {a[:, 0].mean():.3f} | {a[:, 1].mean():.3f} | "
              f"{np.nanmean(a[:, 2]):.2f} | {', '.join(f'{v:.2f}' for v in a[:, 0])} |")


if __name__ == "__main__":
    main()
