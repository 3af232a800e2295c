"""Benchmark: proxy fitting and light calibration from scratch, and the landmark detector.

For synthetic 1600x1200 sessions (2 px landmark noise, lights left out of the session)
prints, per seed: the worst light's direction error (seen from the face centre), position
error and relative intensity error against the ground truth after ``fit_session``, the
landmark RMSE and the time; then the dlib detector's success and RMSE against the model's
landmark vertices. Run: ``.venv/bin/python bench/bench_fit.py [--seeds 6]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from faceps.capture import load_session
from faceps.core import FacepsError, PointLights
from faceps.core.memory import retain_freed_memory
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.fit import fit_session, proxy_maps
from faceps.optimize.photometric_proxy import refine_photometric
from faceps.optimize.proxy import fit_landmarks
from faceps.synth.session import SessionSynthConfig, synth_session


def light_errors(got: PointLights, gt: PointLights, centre: np.ndarray) -> tuple[float, ...]:
    def dirs(L: PointLights) -> np.ndarray:
        v = L.positions - centre
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    ang = np.degrees(np.arccos(np.clip(np.sum(dirs(got) * dirs(gt), axis=1), -1, 1))).max()
    pos = np.linalg.norm(got.positions - gt.positions, axis=1).max()
    rel_got = got.intensities / got.intensities.mean(0, keepdims=True)
    rel_gt = gt.intensities / gt.intensities.mean(0, keepdims=True)
    return float(ang), float(pos), float(100 * np.abs(rel_got / rel_gt - 1).max())


def proxy_error(model, fit, cap, face: np.ndarray, gt_normals: np.ndarray) -> float:
    """Mean angle (deg) between the proxy's and the true normals over the face."""
    n = proxy_maps(model, fit, cap)["normals"]
    return float(np.nanmean(angular_error_deg(n[face], gt_normals[face])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--size", default="1600x1200")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    model = load_model("builtin")
    rows, det, proxy_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            d = Path(tmp) / f"s{seed}"
            synth_session(d, seed=seed, model=model, config=SessionSynthConfig(
                size=size, landmark_noise_px=2.0, include_lights=False))
            cap = load_session(d)
            t = time.perf_counter()
            r = fit_session(cap, model)
            dt = time.perf_counter() - t
            gt_lights = PointLights.from_dict(json.loads(
                (d / "ground_truth" / "lights.json").read_text())["lights"],
                order=cap.light_names)
            depth = np.load(d / "ground_truth" / "depth.npy")
            centre = np.nanmedian(cap.camera.backproject(depth).reshape(-1, 3), axis=0)
            rows.append((seed, *light_errors(r.lights, gt_lights, centre),
                         r.proxy.landmark_rmse_px, dt))
            # the proxy stages alone, with the true lights
            gt_normals = np.load(d / "ground_truth" / "normals.npy")
            face = cv2.imread(str(d / "ground_truth" / "face_mask.png"), 0) > 0


            t = time.perf_counter()
            lfit = fit_landmarks(model, cap.landmarks, cap.camera)
            t_lm = time.perf_counter() - t
            t = time.perf_counter()
            pfit = refine_photometric(model, cap, lfit, gt_lights)
            t_ph = time.perf_counter() - t
            e0 = proxy_error(model, lfit, cap, face, gt_normals)
            e1 = proxy_error(model, pfit, cap, face, gt_normals)
            proxy_rows.append((seed, lfit.landmark_rmse_px, e0, 1e3 * t_lm,
                               pfit.landmark_rmse_px, e1, t_ph))
            gt_lm = np.array(json.loads((d / "ground_truth" / "landmarks.json").read_text()))
            try:
                from faceps.capture.landmarks import DlibLandmarks

                found = DlibLandmarks().detect(cap)
                det.append((seed, True, found.score,
                            float(np.sqrt(np.mean((found.points - gt_lm) ** 2)))))
            except FacepsError as exc:
                det.append((seed, False, float("nan"), float("nan")))
                print(f"seed {seed}: detector: {exc}")
    print(f"### Proxy stages with the true lights ({size[0]}x{size[1]}, 2 px landmark "
          "noise)\n")
    print("| seed | landmark fit: RMSE (px) | proxy normal error (deg) | time (ms) "
          "| + photometric: RMSE (px) | proxy normal error (deg) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for s_, r0, e0, t0, r1, e1, t1 in proxy_rows:
        print(f"| {s_} | {r0:.2f} | {e0:.2f} | {t0:.0f} | {r1:.2f} | {e1:.2f} | {t1:.1f} |")
    print()
    print(f"### Fit from scratch ({size[0]}x{size[1]}, 2 px landmark noise, lights "
          "calibrated)\n")
    print("| seed | direction (deg) | position (mm) | rel. intensity | landmark RMSE (px) "
          "| time (s) |")
    print("|---|---|---|---|---|---|")
    for s, a, p, i, lm, dt in rows:
        print(f"| {s} | {a:.2f} | {p:.1f} | {i:.1f} % | {lm:.2f} | {dt:.1f} |")
    arr = np.array([r[1:] for r in rows])
    print(f"| median | {np.median(arr[:, 0]):.2f} | {np.median(arr[:, 1]):.1f} | "
          f"{np.median(arr[:, 2]):.1f} % | {np.median(arr[:, 3]):.2f} | "
          f"{np.median(arr[:, 4]):.1f} |\n")
    print("### dlib landmark detector on the same sessions\n")
    print("| seed | found | score | RMSE vs model landmark vertices (px) |")
    print("|---|---|---|---|")
    for s, ok, score, rmse in det:
        print(f"| {s} | {'yes' if ok else 'no'} | {score:.2f} | {rmse:.1f} |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
