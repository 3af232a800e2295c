"""Benchmark: synthetic capture rendering.

Prints markdown tables: seconds per stage for full-resolution sessions (1600x1200, 3
lights, cast shadows, sheen, noise), and single-process renders per second at 256x256 face
crops. Run: ``.venv/bin/python bench/bench_synth.py [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from faceps.core.camera import Camera
from faceps.core.memory import retain_freed_memory
from faceps.model import load_model
from faceps.synth.faces import default_camera, render_face, sample_face
from faceps.synth.session import SessionSynthConfig, synth_session

STAGES = ("detail", "raycast", "shading", "sensor", "proxy")


def crop_camera(full: Camera, landmarks: np.ndarray, size: int) -> Camera:
    ok = np.all(np.isfinite(landmarks), axis=1)
    lo, hi = landmarks[ok].min(0), landmarks[ok].max(0)
    c = 0.5 * (lo + hi)
    side = 1.6 * float((hi - lo).max())
    x0, y0 = int(round(c[0] - side / 2)), int(round(c[1] - side / 2))
    s = int(round(side))
    return full.cropped(x0, y0, s, s).scaled((size, size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--crops", type=int, default=20)
    args = ap.parse_args()
    model = load_model("builtin")
    print(f"machine: {platform.machine()}, {platform.python_version()}, "
          f"model {model.name} ({model.n_vertices} vertices)\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synth_session(f"{tmp}/warm", seed=999, model=model,
                      config=SessionSynthConfig(size=(1600, 1200)))
        load = os.getloadavg()[0]
        for seed in range(args.seeds):
            cpu = time.process_time()
            r = synth_session(f"{tmp}/s{seed}", seed=seed, model=model,
                              config=SessionSynthConfig(size=(1600, 1200)))
            rows.append([r.timings.get(k, 0.0) for k in STAGES]
                        + [r.timings["write"], r.timings["total"], time.process_time() - cpu])
    arr = np.array(rows)
    print("### 1600x1200 session, 3 lights (seconds, mean over seeds)\n")
    print(f"load average at start: {load:.1f}; cpu = CPU seconds of all threads\n")
    print("| " + " | ".join(STAGES + ("write", "total", "cpu")) + " |")
    print("|" + "---|" * (len(STAGES) + 3))
    print("| " + " | ".join(f"{v:.2f}" for v in arr.mean(0)) + " |\n")

    full = default_camera((1600, 1200))
    times, stage, cpus = [], [], []
    load = os.getloadavg()[0]
    for i in range(args.crops + 2):
        rng = np.random.default_rng([7, i])
        s = sample_face(rng, model, full)
        from faceps.synth.faces import landmark_pixels

        lm = landmark_pixels(model, model.geometry(s.coefficients.id, s.coefficients.exp),
                             s.rotation, s.translation, full)
        cam = crop_camera(full, lm, 256)
        t = time.perf_counter()
        cpu = time.process_time()
        r = render_face(model, s, cam, rng=rng)
        if i >= 2:
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - cpu)
            stage.append([r.timings.get(k, 0.0) for k in STAGES])
    st = np.array(stage).mean(0)
    print("### 256x256 face crops, 3 lights, one process\n")
    print(f"load average at start: {load:.1f}\n")
    print("| renders/s | " + " | ".join(f"{k} (ms)" for k in STAGES) + " | cpu (ms) |")
    print("|" + "---|" * (len(STAGES) + 2))
    print(f"| {1.0 / np.mean(times):.1f} | " + " | ".join(f"{1000 * v:.0f}" for v in st)
          + f" | {1000 * np.mean(cpus):.0f} |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
