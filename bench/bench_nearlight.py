"""Benchmark: the per-pixel near-light least-squares baseline against synthetic truth.

For a few seeds and three image-formation settings (Lambertian noise-free 16-bit,
Lambertian with noise 8-bit, the default with sheen), solves near-light least squares with
the true lights and positions from the true depth, and prints the mean / median normal
error over the face region. Run: ``.venv/bin/python bench/bench_nearlight.py``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from faceps.capture import load_session
from faceps.core.memory import retain_freed_memory
from faceps.model import load_model
from faceps.optimize import angular_error_deg, nearlight_least_squares, normal_stats
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.session import SessionSynthConfig, synth_session

SETTINGS = {
    "Lambertian, no noise, 16-bit": dict(
        encoding="linear", bit_depth=16, shading=ShadingConfig(lambertian=True),
        sensor=SensorConfig(full_well=0, read_noise=0)),
    "Lambertian, noise, 8-bit": dict(shading=ShadingConfig(lambertian=True)),
    "default (sheen, noise, 8-bit)": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 12])
    args = ap.parse_args()
    model = load_model("builtin")
    print("| seed | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cells = []
            for kw in SETTINGS.values():
                d = Path(tmp) / f"s{seed}"
                r = synth_session(d, seed=seed, model=model, overwrite=True,
                                  config=SessionSynthConfig(size=(800, 600), **kw))
                cap = load_session(d)
                depth = np.load(d / "ground_truth" / "depth.npy")
                res = nearlight_least_squares(cap.images, cap.camera.backproject(depth),
                                              cap.lights, r.rendered.face_mask,
                                              saturated=cap.saturated)
                s = normal_stats(angular_error_deg(res.normals, r.rendered.normals))
                cells.append(f"{s['mean']:.2f} / {s['median']:.2f}")
            print(f"| {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
