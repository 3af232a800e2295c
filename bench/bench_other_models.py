"""Benchmark: `faceps infer` on synthetic sessions of other morphable models.

The shipped networks learn from faces of the built-in model; this measures how they do on
faces they have never seen the like of: sessions rendered from other models (any contract-5
``.npz``, e.g. ``faceps model import sfm ../shared/data/sfm --out sfm.npz``) next to
built-in faces of the same seeds. Errors are mean angular errors (degrees) at the full
input resolution over the visible face region, against the session's detailed ground
truth:

- ``net``: the inferred normals (what ``faceps infer`` writes);
- ``proxy``: the proxy ``faceps infer`` used (ProxyNet's, built-in model), ray cast;
- ``own coarse``: the face's own coarse surface (its model without fine detail), i.e. the
  best a proxy of that model could do.

Run: ``.venv/bin/python bench/bench_other_models.py --models sfm.npz [--seeds 21 22 23]
[--weights DIR | --normal-weights RUN]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from faceps.capture import load_session
from faceps.learn.infer import InferConfig, infer, load_networks
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.fit import proxy_maps
from faceps.synth.session import SessionSynthConfig, synth_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True,
                    help="other models (.npz); the built-in model is always measured too")
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 3],
                    help="numbers of images given to the networks (default 1 and 3)")
    ap.add_argument("--weights", help="weights folder (default: the shipped weights)")
    ap.add_argument("--normal-weights", help="NormalNet run or .pt instead of the shipped one")
    ap.add_argument("--proxy-weights", help="ProxyNet run or .pt instead of the shipped one")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    base = InferConfig(weights=args.weights, normal_weights=args.normal_weights,
                       proxy_weights=args.proxy_weights)
    nets = load_networks(base)
    builtin = load_model("builtin")
    models = [("built-in", builtin)] + [(Path(m).stem, load_model(m)) for m in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models:
            for seed in args.seeds:
                s = Path(tmp) / f"{name}-{seed}"
                synth_session(s, seed=seed, model=model, config=SessionSynthConfig(size=size))
                cap = load_session(s)
                gt = np.load(s / "ground_truth/normals.npy")
                face = cv2.imread(str(s / "ground_truth/face_mask.png"), 0) > 0
                own = np.load(s / "ground_truth/proxy_normals.npy")
                for k in args.images:
                    t = time.perf_counter()
                    out = infer(cap, replace(base, num_images=k), networks=nets)
                    wall = time.perf_counter() - t
                    pn = proxy_maps(builtin, out.proxy, cap)["normals"]
                    m = face & np.all(np.isfinite(out.normals), -1) & np.all(np.isfinite(pn), -1)
                    mo = m & np.all(np.isfinite(own), -1)
                    row = (name, seed, k, angular_error_deg(out.normals[m], gt[m]).mean(),
                           angular_error_deg(pn[m], gt[m]).mean(),
                           angular_error_deg(own[mo], gt[mo]).mean(), 100.0 * m.sum() /
                           max(face.sum(), 1), wall)
                    rows.append(row)
                    print(f"{name} seed {seed}, {k} image(s): net {row[3]:.2f} deg, "
                          f"proxy {row[4]:.2f}, own coarse {row[5]:.2f}", flush=True)
    print(f"\n### `faceps infer` on faces of other models, {size[0]}x{size[1]}\n")
    print("| model | seed | images | net mean (deg) | proxy mean (deg) | own coarse (deg) "
          "| coverage | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | "
              f"{r[6]:.1f} % | {r[7]:.2f} |")
    print()
    for name, _ in models:
        for k in args.images:
            sel = [r for r in rows if r[0] == name and r[2] == k]
            print(f"{name}, {k} image(s): net {np.mean([r[3] for r in sel]):.2f} deg mean "
                  f"over {len(sel)} seeds (proxy {np.mean([r[4] for r in sel]):.2f})")


if __name__ == "__main__":
    main()
