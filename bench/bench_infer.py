"""Benchmark: ``faceps infer`` per stage, for 1, 2 and 3 images at 800x600 and 1600x1200.

Synthetic sessions (one per size) are rendered into a temporary folder and read with
``load_session``; the networks are loaded once (start-up, reported separately) and every
measured call passes them preloaded, so the ``session`` column is the time from an
ingested capture to the result. Without ``--weights`` the networks are the full-size
architectures (ResNet-18 ProxyNet, NormalNet widths (32, 64, 128)) with random weights and
a 256 px crop (``crop.json``): the time does not depend on the weight values. Each cell is
the median of ``--repeat`` calls after one warm-up call (``session (min)``: the fastest
call, the least disturbed by other programs on a shared machine). Prints a markdown table;
``read session`` (decoding the image files) is outside ``session``. Use one torch thread
on a loaded machine: with more, OpenMP's spinning barriers make every stage several times
slower when the cores are busy.

Run: ``.venv/bin/python bench/bench_infer.py [--repeat 3] [--threads 1]
[--depth-resolution crop]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from faceps.capture import load_session
from faceps.core.memory import retain_freed_memory
from faceps.learn.checkpoint import build_network, network_config, save_weights
from faceps.learn.infer import CROP_FILE, CROP_FORMAT, InferConfig, infer, load_networks
from faceps.model import load_model
from faceps.synth.session import SessionSynthConfig, synth_session

STAGES = ("landmarks", "crop", "proxynet", "render", "normalnet", "paste", "height_field",
          "albedo", "session")


def random_weights(folder: Path, crop_size: int) -> Path:
    """Full-size networks with random weights in the shipped layout (proxy.pt, normal.pt,
    crop.json)."""
    model = load_model("builtin")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for kind in ("proxy", "normal"):
        net = build_network(kind, network_config(kind, {}, model)).eval()
        save_weights(folder / f"{kind}.pt", kind=kind, network=net, model=model,
                     config={"model": "builtin"})
    (folder / CROP_FILE).write_text(json.dumps({"format": CROP_FORMAT, "size": crop_size,
                                                "scale": 1.6}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["800x600", "1600x1200"])
    ap.add_argument("--images", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="weights folder (default: random "
                    "full-size networks)")
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--depth-resolution", default="crop")
    ap.add_argument("--integrate", default="gn")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or str(random_weights(Path(tmp) / "weights", args.crop_size))
        base = InferConfig(weights=weights, depth_resolution=args.depth_resolution,
                           integrate=args.integrate)
        t = time.perf_counter()
        nets = load_networks(base)
        startup = time.perf_counter() - t
        for size in args.sizes:
            W, H = (int(v) for v in size.split("x"))
            folder = Path(tmp) / f"s{W}"
            synth_session(folder, seed=args.seed, config=SessionSynthConfig(size=(W, H)))
            t = time.perf_counter()
            capture = load_session(folder)
            t_read = time.perf_counter() - t
            for k in args.images:
                cfg = base.replace(num_images=k)
                infer(capture, cfg, networks=nets)                  # warm-up
                runs = [infer(capture, cfg, networks=nets) for _ in range(args.repeat)]
                med = {s: float(np.median([r.timings[s] for r in runs])) for s in STAGES}
                best = min(r.timings["session"] for r in runs)
                last = runs[-1]
                rows.append((size, k, t_read, med, best, last.report["working_size"],
                             int(last.mask.sum()), last.report["crops"]["normal"]["box"][2]))
    print(f"start-up (load networks and model): {startup:.2f} s; torch threads "
          f"{args.threads}; depth resolution {args.depth_resolution!r}; integrate "
          f"{args.integrate!r}; median of {args.repeat}\n")
    head = ["size", "images", "read session"] + list(STAGES[:-1]) + [
        "**session**", "session (min)", "working size", "face px", "crop side"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for size, k, t_read, med, best, work, px, side in rows:
        cells = [size, str(k), f"{t_read:.2f}"] + [f"{med[s]:.3f}" for s in STAGES[:-1]] + [
            f"**{med['session']:.3f}**", f"{best:.3f}", "x".join(str(v) for v in work),
            str(px), str(side)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
