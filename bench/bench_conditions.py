"""Benchmark: `faceps reconstruct` under harder capture conditions than the default.

Real captures are darker, brighter, noisier and shinier than the default synthetic
session. For each condition this script renders the same faces (seeds) with one thing
changed in the synthetic capture (the sensor's exposure, its noise, vignetting, the
strength of the skin's sheen or none, the encoding), reconstructs them with every
default and the session's lights, and prints how the normals, the coverage and the
depth hold up, with what the images looked like: the median level of the face in the
brightest image (as an 8-bit sRGB code), the share of face pixels with a clipped channel
in some image, the share black (8-bit sRGB code 2 or less) in all images but one or
more, and the images' noise relative to their level as the normal update measures it
(``image_noise_level``).

Run: ``.venv/bin/python bench/bench_conditions.py [--size 1600x1200] [--seeds 0 1 2]
[--conditions default dark ...] [--variant NAME JSON ...]`` (``--variant`` as in
``bench_reconstruct.py``: configurations compared on the same sessions).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reconstruct import overridden, score, visible_face  # noqa: E402

from faceps.capture import load_session  # noqa: E402
from faceps.core.errors import FacepsError  # noqa: E402
from faceps.core.memory import retain_freed_memory  # noqa: E402
from faceps.model import load_model  # noqa: E402
from faceps.optimize.normal_albedo import image_noise_level  # noqa: E402
from faceps.optimize.reconstruct import ReconstructConfig, reconstruct  # noqa: E402
from faceps.synth.session import SessionSynthConfig, synth_session  # noqa: E402

#: name -> (what it means, overrides of SessionSynthConfig as nested dicts)
CONDITIONS: dict[str, tuple[str, dict]] = {
    "default": ("the default session: the brightest image's 99th percentile of the face "
                "at 0.8 of full scale", {}),
    "dark": ("exposure for 0.25 of full scale (about 2 stops under)",
             {"sensor": {"auto_target": 0.25}}),
    "very dark": ("exposure for 0.06 of full scale (about 4 stops under)",
                  {"sensor": {"auto_target": 0.06}}),
    "bright": ("exposure for 1.6 of full scale (1 stop over: highlights clip)",
               {"sensor": {"auto_target": 1.6}}),
    "very bright": ("exposure for 3.2 of full scale (2 stops over)",
                    {"sensor": {"auto_target": 3.2}}),
    "noisy": ("a small sensor: full well 2000 e-, read noise 0.01 of full scale",
              {"sensor": {"full_well": 2000.0, "read_noise": 0.01}}),
    "vignetting": ("40 % light loss at the image corners",
                   {"sensor": {"vignetting": 0.4}}),
    "shiny": ("a sheen 3x as strong and wider (specular 0.09, shininess 20)",
              {"shading": {"specular": 0.09, "shininess": 20.0}}),
    "16-bit": ("16-bit linear PNGs instead of 8-bit sRGB",
               {"encoding": "linear", "bit_depth": 16}),
    "lambertian": ("no sheen at all (eq. 1 alone)", {"shading": {"lambertian": True}}),
}


def image_stats(cap, gt: Path) -> dict:
    """What the face looks like in the images: the median level of the face in the
    brightest image as an 8-bit sRGB code, the share of face pixels clipped in some image,
    and the share at most at code 2 of 8-bit sRGB (black) in all images but one or more."""
    face = visible_face(gt)
    mean = np.asarray(cap.images, np.float32)[:, face].mean(-1)    # (L, M) linear
    level = float(np.max(np.median(mean, 1)))
    srgb = 255.0 * (1.055 * level ** (1 / 2.4) - 0.055 if level > 0.0031308
                    else 12.92 * level)
    clipped = np.asarray(cap.saturated)[:, face].any(0)
    black = (mean <= 2.0 / 255 / 12.92).sum(0) >= len(mean) - 1
    noise = image_noise_level(cap.images, face, saturated=cap.saturated)
    return {"level": srgb, "clipped": 100.0 * float(clipped.mean()),
            "black": 100.0 * float(black.mean()),
            "noise": float("nan") if noise is None else noise}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1600x1200")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS),
                    choices=list(CONDITIONS))
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"),
                    help="a reconstruction configuration to compare on the same sessions: "
                    "overrides of ReconstructConfig as nested JSON; repeatable (default: "
                    "the defaults)")
    args = ap.parse_args()
    variants = [(name, overridden(ReconstructConfig(), json.loads(text)))
                for name, text in (args.variant or [("defaults", "{}")])]
    size = tuple(int(v) for v in args.size.split("x"))
    model = load_model("builtin")
    base = SessionSynthConfig(size=size, landmark_noise_px=2.0, include_lights=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.conditions:
            config = overridden(base, CONDITIONS[name][1])
            for seed in args.seeds:
                d = Path(tmp) / f"{name.replace(' ', '_')}{seed}"
                synth_session(d, seed=seed, model=model, config=config)
                cap = load_session(d)
                stats = image_stats(cap, d / "ground_truth")
                for vname, variant in variants:
                    t = time.perf_counter()
                    try:
                        rec = reconstruct(cap, model, variant)
                    except FacepsError as exc:
                        rows.append((name, vname, seed, stats, None, str(exc),
                                     time.perf_counter() - t))
                        print(f"{name}, {vname}, seed {seed}: failed: {exc}", flush=True)
                        continue
                    wall = time.perf_counter() - t
                    s = score(rec, model, cap, d / "ground_truth")
                    rows.append((name, vname, seed, stats, s, len(rec.report["warnings"]),
                                 wall))
                    print(f"{name}, {vname}, seed {seed}: {s['mean']:.2f} deg, {wall:.1f} s",
                          flush=True)
    print(f"\n### `reconstruct` under capture conditions, {size[0]}x{size[1]}, session "
          "lights\n")
    print("| condition | configuration | seed | face level (8-bit) | clipped | black in "
          ">= L-1 images | measured noise | normal err mean (deg) | median | fitted proxy | "
          "coverage | depth err (mm) | warnings | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, vname, seed, st, s, extra, wall in rows:
        head = (f"| {name} | {vname} | {seed} | {st['level']:.0f} | {st['clipped']:.1f} % | "
                f"{st['black']:.1f} % | {st['noise']:.3f} |")
        if s is None:
            print(head + f" failed: {extra} | | | | | | {wall:.1f} |")
        else:
            print(head + f" {s['mean']:.2f} | {s['median']:.2f} | "
                  f"{s['proxy']:.2f} | {s['coverage']:.1f} % | {s['depth']:.3f} | {extra} | "
                  f"{wall:.1f} |")
    print("\n| condition | what changed | configuration | normal err mean, median of seeds "
          "(deg) | fitted proxy | coverage | depth err (mm) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.conditions:
        for vname, _ in variants:
            sel = [r for r in rows if r[0] == name and r[1] == vname]
            ok = [r[4] for r in sel if r[4] is not None]
            failed = len(sel) - len(ok)
            note = f" ({failed} failed)" if failed else ""
            if not ok:
                print(f"| {name} | {CONDITIONS[name][0]} | {vname} | all failed | | | |")
                continue
            print(f"| {name} | {CONDITIONS[name][0]} | {vname} | "
                  f"{np.median([s['mean'] for s in ok]):.2f}{note} | "
                  f"{np.median([s['proxy'] for s in ok]):.2f} | "
                  f"{np.median([s['coverage'] for s in ok]):.1f} % | "
                  f"{np.median([s['depth'] for s in ok]):.3f} |")
    print("\n" + json.dumps({"size": list(size), "seeds": args.seeds}))


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
