"""Benchmark: proxy-guided near point-light self-calibration on synthetic sessions.

For each seed, renders an 800x600 synthetic session (default: 8-bit sRGB, skin sheen, sensor
noise, cast shadows), calibrates its lights from the images and the coarse proxy of the true
model coefficients and pose, and compares with the true lights. Prints a markdown table per
seed and a summary (median and max over seeds) of:

- direction error (degrees) of each light seen from the proxy's centroid,
- position error (mm),
- relative intensity error: each light's intensity over the mean of all lights, per colour
  channel (what the images determine), and over the mean of all lights and channels (this
  also includes the colour balance, which the images cannot determine; see
  :mod:`faceps.capture.calibrate`),
- calibration time (seconds).

Run: ``.venv/bin/python bench/bench_calibrate.py [--seeds 10] [--size 800 600]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np

from faceps.capture import load_session
from faceps.capture.calibrate import calibrate_from_proxy
from faceps.core.imageio import read_image
from faceps.core.lights import PointLights
from faceps.core.memory import retain_freed_memory
from faceps.synth.session import SessionSynthConfig, synth_session


def _errors(res, gt: PointLights, centre: np.ndarray) -> dict[str, float]:
    a = res.lights.positions - centre
    b = gt.positions - centre
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    est, true = res.lights.intensities, gt.intensities
    return {
        "direction_deg": float(np.degrees(np.arccos(np.clip(cos, -1, 1))).max()),
        "position_mm": float(np.linalg.norm(res.lights.positions - gt.positions, axis=1).max()),
        "intensity_channel": float(np.abs((est / est.mean(0)) / (true / true.mean(0)) - 1).max()),
        "intensity_all": float(np.abs((est / est.mean()) / (true / true.mean()) - 1).max()),
        "seconds": float(res.timings["total"]),
    }


def calibrate_session(path: Path) -> dict[str, float]:
    cap = load_session(path)
    gt = PointLights.from_dict(
        json.loads((path / "ground_truth" / "lights.json").read_text())["lights"],
        order=cap.light_names)
    depth = np.load(path / "ground_truth" / "proxy_depth.npy")
    normals = np.load(path / "ground_truth" / "proxy_normals.npy")
    face, _ = read_image(path / "ground_truth" / "face_mask.png")
    face = (face[..., 0] if face.ndim == 3 else face) > 0.5
    points = cap.camera.backproject(depth)
    valid = face & np.isfinite(depth) & np.all(np.isfinite(normals), axis=-1)
    res = calibrate_from_proxy(cap.images, points, normals, valid, saturated=cap.saturated,
                               names=cap.light_names)
    out = _errors(res, gt, points[valid].mean(0))
    out["converged"] = float(res.converged)
    out["condition"] = float(res.condition)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--size", type=int, nargs=2, default=(800, 600))
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; "
          f"{args.size[0]}x{args.size[1]} sessions, 3 lights, default synthetic config\n")
    cols = ("direction_deg", "position_mm", "intensity_channel", "intensity_all", "seconds")
    rows = []
    print("| seed | max direction error (deg) | max position error (mm) | max rel. intensity "
          "error, per channel | max rel. intensity error, all channels | time (s) | "
          "converged | condition |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            path = Path(tmp) / f"s{seed}"
            synth_session(path, seed=seed, config=SessionSynthConfig(size=tuple(args.size)))
            e = calibrate_session(path)
            rows.append([e[c] for c in cols])
            print(f"| {seed} | {e['direction_deg']:.2f} | {e['position_mm']:.1f} | "
                  f"{100 * e['intensity_channel']:.1f} % | {100 * e['intensity_all']:.1f} % | "
                  f"{e['seconds']:.2f} | {'yes' if e['converged'] else 'no'} | "
                  f"{e['condition']:.0f} |")
    arr = np.array(rows)
    print("\n| statistic over seeds | direction (deg) | position (mm) | intensity, per channel "
          "| intensity, all channels | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, fn in (("median", np.median), ("max", np.max)):
        v = fn(arr, axis=0)
        print(f"| {name} | {v[0]:.2f} | {v[1]:.1f} | {100 * v[2]:.1f} % | {100 * v[3]:.1f} % "
              f"| {v[4]:.2f} |")
    print("\ntargets: direction < 3 deg, position < 40 mm, relative intensity < 5 %")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
