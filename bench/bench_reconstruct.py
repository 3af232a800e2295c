"""Benchmark: `faceps reconstruct` on synthetic sessions against their ground truth.

For each seed, a synthetic session (sheen, noise, 8-bit sRGB, 2 px landmark noise) is
reconstructed with the session's lights and, with ``--self-calibrate``, without them.
Prints per seed and as medians: mean/median normal error over the visible face, the
error of the fitted proxy on the same pixels, coverage of the visible face, depth error
after removing the median offset, and time per stage; and the tilt of the depth error
(the slopes of its best-fit plane as pitch and yaw angles, the proxy's pitch too) with
the error left after removing that plane.

The per-stage times are of ``reconstruct`` in this (warm) process. ``--cli`` also runs
the command a user types, ``faceps reconstruct SESSION --out DIR``, as a fresh process on
each session with the session's lights and prints its wall time from start to exit
(interpreter start, imports, reading the PNGs, the reconstruction, writing contract 2)
and its peak resident memory.

``--ceiling`` asks what the height field makes of better normals: on each session it
integrates the ground-truth normals with the fitted proxy's depth as the prior (as the
reconstruction does), the same normals with the true depth as the prior, and the eq. 7
normals of the true depth itself (exactly integrable) with the proxy's depth, with the
default height-field options, and prints the depth error (and its tilt) of each beside the
reconstruction's.

Run: ``.venv/bin/python bench/bench_reconstruct.py [--size 1600x1200] [--seeds 0 1 2]
[--self-calibrate] [--cli] [--ceiling]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import is_dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from faceps.capture import load_session
from faceps.core.memory import retain_freed_memory
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.fit import proxy_maps
from faceps.optimize.heightfield import height_field_normals, solve_height_field
from faceps.optimize.reconstruct import ReconstructConfig, reconstruct
from faceps.synth.session import SessionSynthConfig, synth_session


def overridden(config, changes: dict):
    """``config`` (a dataclass) with the fields of ``changes`` replaced, nested dicts
    applied to nested dataclasses."""
    fields = {}
    for key, value in changes.items():
        if not hasattr(config, key):
            raise SystemExit(f"unknown option {key!r} of {type(config).__name__}")
        current = getattr(config, key)
        fields[key] = (overridden(current, value) if isinstance(value, dict)
                       and is_dataclass(current) else value)
    return replace(config, **fields)


def visible_face(gt: Path) -> np.ndarray:
    """(H, W) bool: the face pixels the camera sees, from a session's ground truth."""
    return (cv2.imread(str(gt / "face_mask.png"), 0) > 0) & \
        (cv2.imread(str(gt / "mask.png"), 0) > 0)


def score(rec, model, cap, gt: Path, ceiling: bool = False) -> dict:
    """Errors of a reconstruction against a session's ground truth; with ``ceiling`` also
    (key ``ceiling``) the depth error, pitch and error without the plane of the
    reconstruction and of the height field given better normals (module docstring)."""
    gtn = np.load(gt / "normals.npy")
    vis = visible_face(gt)
    m = vis & rec.mask & np.all(np.isfinite(gtn), -1)
    err = angular_error_deg(rec.normals[m], gtn[m])
    pmaps = proxy_maps(model, rec.fit.proxy, cap)
    pn = pmaps["normals"]
    pm = m & np.all(np.isfinite(pn), -1)
    perr = angular_error_deg(pn[pm], gtn[pm])
    gz = np.load(gt / "depth.npy").astype(np.float64)
    # the factor that would put the fitted proxy at the true distance, and the one the
    # distance search chose (1: no search)
    true_scale = float(np.nanmedian((gz / pmaps["depth"])[pm]))
    scale = (rec.report.get("distance") or {}).get("scale", 1.0)
    # the depth error's plane: its slopes are the tilt of the reconstruction, and of the
    # proxy (scaled as the search did)
    depth, pitch, yaw, flat = depth_error(rec.depth.astype(np.float64), gz, m, cap.camera)
    _, ppitch, _, _ = depth_error(pmaps["depth"] * scale, gz, pm, cap.camera)
    out = {"mean": float(np.mean(err)), "median": float(np.median(err)),
           "proxy": float(np.mean(perr)), "coverage": 100.0 * m.sum() / max(vis.sum(), 1),
           "depth": depth,
           "scale": float(scale), "true_scale": true_scale, "pitch": pitch, "yaw": yaw,
           "depth_flat": flat, "proxy_pitch": ppitch}
    if ceiling:
        region = m & np.isfinite(gz) & np.isfinite(pmaps["depth"])
        proxy = np.where(region, pmaps["depth"] * scale, np.nan)
        truth = np.where(region, gz, np.nan)
        out["ceiling"] = [(depth, pitch, flat)]
        for normals, prior in ((gtn, proxy), (gtn, truth),
                               (height_field_normals(truth, cap.camera), proxy)):
            normals = np.where(region[..., None], normals, np.nan)
            z = solve_height_field(normals, prior, region, cap.camera).depth
            e, p, _, f = depth_error(z, gz, region, cap.camera)
            out["ceiling"].append((e, p, f))
    return out


def depth_error(depth: np.ndarray, gz: np.ndarray, sel: np.ndarray, camera
                ) -> tuple[float, float, float, float]:
    """Depth error (mm) after removing the median offset over ``sel``; the slopes of its
    best-fit plane over the true lateral position in mm, as angles about the camera's x
    axis (pitch) and y axis (yaw) in degrees; the error left without that plane (mm)."""
    sel = sel & np.isfinite(depth) & np.isfinite(gz)
    e = (depth - gz)[sel]
    gp = camera.backproject(gz)[sel]
    A = np.stack([np.ones(e.size), gp[:, 0], gp[:, 1]], 1)
    x, *_ = np.linalg.lstsq(A, e, rcond=None)
    r = e - A @ x
    return (float(np.mean(np.abs(e - np.median(e)))), float(np.degrees(np.arctan(x[2]))),
            float(np.degrees(np.arctan(x[1]))), float(np.mean(np.abs(r - np.median(r)))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1600x1200")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--self-calibrate", action="store_true",
                    help="also reconstruct without the session's lights")
    ap.add_argument("--domain", default="pixel", choices=["pixel", "triangle"])
    ap.add_argument("--refine-passes", type=int, nargs="+", default=None,
                    help="refine_passes values to compare on the same sessions (default: "
                    "the configuration's)")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"),
                    help="a configuration to compare on the same sessions: overrides of "
                    "ReconstructConfig as nested JSON, e.g. fast "
                    "'{\"normal_albedo\": {\"refine_iterations\": 1}}'; repeatable "
                    "(default: the defaults, with each --refine-passes value)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also integrate the true normals (see the module docstring)")
    ap.add_argument("--cli", action="store_true",
                    help="also time `faceps reconstruct` as a fresh process (wall time)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    model = load_model("builtin")
    modes = [True, False] if args.self_calibrate else [True]
    rows = []
    cli_rows = []
    ceiling_rows = []
    config = ReconstructConfig()
    if args.domain != "pixel":
        config = replace(config, normal_albedo=replace(config.normal_albedo,
                                                       domain=args.domain))
    if args.variant:
        variants = [(name, overridden(config, json.loads(text))) for name, text in args.variant]
    else:
        variants = [(str(p), replace(config, refine_passes=p))
                    for p in (args.refine_passes or [config.refine_passes])]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for given in modes:
                d = Path(tmp) / f"s{seed}-{int(given)}"
                synth_session(d, seed=seed, model=model, config=SessionSynthConfig(
                    size=size, landmark_noise_px=2.0, include_lights=given))
                cap = load_session(d)
                for name, variant in variants:
                    t = time.perf_counter()
                    rec = reconstruct(cap, model, variant)
                    wall = time.perf_counter() - t
                    s = score(rec, model, cap, d / "ground_truth", args.ceiling)
                    tm = rec.report["timings"]
                    na = sum(v for k, v in tm.items() if k.startswith("normal_albedo"))
                    hf = sum(v for k, v in tm.items() if k.startswith("height_field"))
                    mode = ("session" if given else "calibrated") + f", {name}"
                    rows.append((seed, mode, s, tm["fit"], tm.get("distance", 0.0), na, hf,
                                 wall))
                    if args.ceiling:
                        ceiling_rows.append((seed, mode, s["ceiling"]))
                    print(f"seed {seed} {mode}: {s['mean']:.2f} deg, {wall:.1f} s", flush=True)
                if args.cli and given:
                    cli_rows.append((seed, *_run_cli(d, Path(tmp) / f"out{seed}")))
                    print(f"seed {seed} faceps reconstruct: {cli_rows[-1][1]:.1f} s", flush=True)
    print(f"\n### `faceps reconstruct`, {size[0]}x{size[1]}, domain {args.domain}\n")
    print("| seed | lights, configuration | depth error plane: pitch (deg) | yaw (deg) "
          "| proxy pitch (deg) | depth err, plane removed (mm) |")
    print("|---|---|---|---|---|---|")
    for seed, mode, s, *_ in rows:
        print(f"| {seed} | {mode} | {s['pitch']:+.2f} | {s['yaw']:+.2f} | "
              f"{s['proxy_pitch']:+.2f} | {s['depth_flat']:.3f} |")
    print()
    label = "configuration" if args.variant else "refine passes"
    print(f"| seed | lights, {label} | normal err mean (deg) | median | fitted proxy mean "
          "| coverage | depth err (mm) | distance factor (true) | fit (s) | distance (s) "
          "| normal/albedo (s) | height field (s) | total (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, mode, s, fit, dist, na, hf, wall in rows:
        print(f"| {seed} | {mode} | {s['mean']:.2f} | {s['median']:.2f} | {s['proxy']:.2f} | "
              f"{s['coverage']:.1f} % | {s['depth']:.3f} | {s['scale']:.4f} "
              f"({s['true_scale']:.4f}) | {fit:.1f} | {dist:.1f} | {na:.1f} | {hf:.1f} | "
              f"{wall:.1f} |")
    for mode in dict.fromkeys(r[1] for r in rows):
        sel = [r for r in rows if r[1] == mode]
        med = {k: float(np.median([r[2][k] for r in sel])) for k in sel[0][2]}
        t = [float(np.median([r[i] for r in sel])) for i in (3, 4, 5, 6, 7)]
        print(f"| median | {mode} | {med['mean']:.2f} | {med['median']:.2f} | "
              f"{med['proxy']:.2f} | {med['coverage']:.1f} % | {med['depth']:.3f} | | "
              f"{t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[3]:.1f} | {t[4]:.1f} |")
    if ceiling_rows:
        print("\nDepth error (mm) after the median offset, (pitch of its plane, deg), error "
              "left without the plane (mm):\n")
        print("| seed | lights, configuration | reconstruction | true normals, proxy depth "
              "prior | true normals, true depth prior | exact normals of the true depth, "
              "proxy depth prior |")
        print("|---|---|---|---|---|---|")
        for seed, mode, errs in ceiling_rows:
            cells = " | ".join(f"{a:.3f} ({b:+.2f}) {c:.3f}" for a, b, c in errs)
            print(f"| {seed} | {mode} | {cells} |")
        med = [float(np.median([r[2][k][0] for r in ceiling_rows])) for k in range(4)]
        print("| median | | " + " | ".join(f"{v:.3f}" for v in med) + " |")
    if cli_rows:
        print("\n| seed | `faceps reconstruct`, wall (s) | of which reconstruct (s) | "
              "normal err mean (deg) | peak memory (GiB) |")
        print("|---|---|---|---|---|")
        for seed, wall, total, err, rss in cli_rows:
            print(f"| {seed} | {wall:.1f} | {total:.1f} | {err:.2f} | {rss:.2f} |")
        print(f"| median | {np.median([r[1] for r in cli_rows]):.1f} | "
              f"{np.median([r[2] for r in cli_rows]):.1f} | | |")


# ``python -m faceps`` that also writes the process's peak resident memory (VmHWM of
# /proc/self/status, kB) to the file named first, at exit (the command's quick exit still
# runs the atexit handlers). Not the rusage of the child: a child forked from this process
# inherits its resident memory at the fork into ``ru_maxrss``, which made the figure this
# benchmark process's peak (about 2 GiB after its in-process runs), not the command's.
_CLI_WITH_PEAK = """
import atexit, sys
def _peak(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM:'))
    with open(path, 'w') as f:
        f.write(str(kb))
atexit.register(_peak)
sys.argv = ['faceps'] + sys.argv[2:]
from faceps.cli import console
console()
"""


def _run_cli(session: Path, out: Path) -> tuple[float, float, float, float]:
    """Wall time of a fresh ``faceps reconstruct`` process, the reconstruction's own total
    from its report, the normal error of what it wrote, and the process's peak resident
    memory (GiB)."""
    log = out.parent / f"{out.name}.log"
    peak = out.parent / f"{out.name}.peak"
    with open(log, "w") as f:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CLI_WITH_PEAK, str(peak), "reconstruct",
                                 str(session), "--out", str(out), "--quiet"],
                                stdout=f, stderr=f)
        status = proc.wait()
        wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"faceps reconstruct {session} failed:\n{log.read_text()}")
    rss_gib = int(peak.read_text()) / 2**20   # kB
    report = json.loads((out / "report.json").read_text())
    gt = session / "ground_truth"
    gtn = np.load(gt / "normals.npy")
    n = np.load(out / "normals.npy")
    m = visible_face(gt) & np.all(np.isfinite(n), -1) & np.all(np.isfinite(gtn), -1)
    err = float(np.mean(angular_error_deg(n[m], gtn[m])))
    return wall, float(report["timings"]["total"]), err, rss_gib


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
