"""Benchmark: the normal/albedo update (eq. 5-6) against synthetic truth.

For each seed, renders a synthetic session in memory (sheen, sensor noise; the images are
quantised to 8-bit sRGB and decoded, as a session on disk would be), and with the
ground-truth lights compares normals over the face region (``face_mask`` and the solved
mask) for:

- the proxy alone (the coarse model surface: exact coefficients and pose, no detail);
- classic distant-light least squares (Woodham; ``distant_light_least_squares``: the lights
  as directions and irradiances from the median proxy position of the face);
- per-pixel near-light least squares without prior (``nearlight_least_squares``, positions
  from the proxy depth; 3 usable lights needed, so it covers only part of the face);
- the update in the pixel domain (``update_normals_albedo``), with its default
  coarse-to-fine levels and, with ``--compare-levels``, at the full resolution only;
- the update in the triangle domain (``update_normals_albedo_mesh`` on the proxy mesh),
  transferred to pixels; and, in its own domain, per triangle against the true normal at
  the projected centroid, beside the proxy's face normals.

Prints a markdown table of mean / median angular error (degrees), the share of the face
each method solves, and seconds. Run:
``.venv/bin/python bench/bench_normal_albedo.py --size 800x600 --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from faceps.core.color import decode
from faceps.core.imageio import sample_bilinear
from faceps.core.memory import retain_freed_memory
from faceps.core.mesh import face_normals
from faceps.model import load_model
from faceps.optimize import (
    angular_error_deg,
    distant_light_least_squares,
    nearlight_least_squares,
)
from faceps.optimize.normal_albedo import (
    NormalAlbedoConfig,
    update_normals_albedo,
    update_normals_albedo_mesh,
)
from faceps.synth.faces import default_camera, sample_face
from faceps.synth.render import quantise
from faceps.synth.session import SessionSynthConfig, render_session


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def proxy_mesh(model, seed: int, config: SessionSynthConfig) -> np.ndarray:
    """The coarse proxy of a session in the camera frame (what ``render_session`` draws)."""
    camera = default_camera(config.size, config.fov_x_deg)
    sample = sample_face(np.random.default_rng(seed), model, camera, config.face)
    coarse = model.geometry(sample.coefficients.id, sample.coefficients.exp)
    return coarse @ sample.rotation.T + sample.translation


def stats(normals: np.ndarray, truth: np.ndarray, region: np.ndarray) -> tuple[float, float,
                                                                              float]:
    """(mean, median, % of the region solved) of the angular error over ``region``."""
    err = angular_error_deg(normals, truth)[region]
    ok = np.isfinite(err)
    if not ok.any():
        return float("nan"), float("nan"), 0.0
    return float(err[ok].mean()), float(np.median(err[ok])), 100.0 * float(ok.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=_size, default=(1600, 1200), help="W x H, e.g. 800x600")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None,
                    help="outer iterations (default: the config's)")
    ap.add_argument("--compare-levels", action="store_true",
                    help="also run the pixel domain at the full resolution only (levels=1)")
    args = ap.parse_args()
    model = load_model("builtin")
    cfg_kw = {} if args.iterations is None else {"iterations": args.iterations}
    pix_cfg = NormalAlbedoConfig(**cfg_kw)
    tri_cfg = NormalAlbedoConfig(domain="triangle", **cfg_kw)
    methods = ["proxy", "Woodham (distant lights)", "near-light LS (no prior)", "ours, pixel",
               "ours, triangle"]
    if args.compare_levels:
        methods.insert(4, "ours, pixel, 1 level")
    rows = []
    for seed in args.seeds:
        config = SessionSynthConfig(size=args.size)
        r, _, _ = render_session(model, seed, config)
        camera = default_camera(config.size, config.fov_x_deg)
        images = decode(quantise(r.images, "srgb", 8) / 255.0, "srgb")
        points = camera.backproject(r.proxy_depth)
        region = r.face_mask & r.proxy_mask
        cells = {}
        cells["proxy"] = (*stats(r.proxy_normals, r.normals, region), 0.0)
        t = time.perf_counter()
        centre = np.median(points[region], axis=0)
        wd = distant_light_least_squares(images, centre, r.lights, region,
                                         saturated=r.saturated)
        cells["Woodham (distant lights)"] = (*stats(wd.normals, r.normals, region),
                                            time.perf_counter() - t)
        t = time.perf_counter()
        nl = nearlight_least_squares(images, points, r.lights, region, saturated=r.saturated)
        cells["near-light LS (no prior)"] = (*stats(nl.normals, r.normals, region),
                                            time.perf_counter() - t)
        t = time.perf_counter()
        pix = update_normals_albedo(images, points, r.proxy_normals, r.proxy_mask, r.lights,
                                    pix_cfg, saturated=r.saturated)
        cells["ours, pixel"] = (*stats(pix.normals, r.normals, region),
                                time.perf_counter() - t)
        if args.compare_levels:
            t = time.perf_counter()
            one = update_normals_albedo(images, points, r.proxy_normals, r.proxy_mask,
                                        r.lights, replace(pix_cfg, levels=1),
                                        saturated=r.saturated)
            cells["ours, pixel, 1 level"] = (*stats(one.normals, r.normals, region),
                                             time.perf_counter() - t)
        t = time.perf_counter()
        V, F = proxy_mesh(model, seed, config), model.triangles
        tri = update_normals_albedo_mesh(images, camera, V, F, r.lights, tri_cfg,
                                         saturated=r.saturated, region=r.face_mask)
        cells["ours, triangle"] = (*stats(tri.normals, r.normals, region),
                                   time.perf_counter() - t)
        # the triangle domain itself: true normal at each solved triangle's centroid
        tm = tri.triangle_mask
        truth = sample_bilinear(r.normals, camera.project(V[F[tm]].mean(axis=1)))
        truth /= np.linalg.norm(truth, axis=1, keepdims=True)
        per_tri = (stats(tri.triangle_normals[tm], truth, np.ones(len(truth), bool))[:2]
                   + stats(face_normals(V, F)[tm], truth, np.ones(len(truth), bool))[:2])
        rows.append((seed, cells, pix.iterations, tri.iterations, per_tri))

    W, H = args.size
    print(f"Normal error over the face region (deg), {W}x{H}, ground-truth lights, "
          f"sheen + noise, 8-bit sRGB\n")
    print("| seed | " + " | ".join(f"{m}: mean / median (% solved), s" for m in methods)
          + " | per triangle: ours / proxy faces | iterations (pixel / triangle) |")
    print("|---|" + "---|" * (len(methods) + 2))
    for seed, cells, ip, it, pt in rows:
        txt = []
        for m in methods:
            mean, med, cov, sec = cells[m]
            txt.append(f"{mean:.2f} / {med:.2f} ({cov:.0f} %), {sec:.1f}")
        print(f"| {seed} | " + " | ".join(txt)
              + f" | {pt[0]:.2f} / {pt[1]:.2f} vs {pt[2]:.2f} / {pt[3]:.2f} | {ip} / {it} |")
    means = {m: np.mean([row[1][m][0] for row in rows]) for m in methods}
    meds = {m: np.mean([row[1][m][1] for row in rows]) for m in methods}
    secs = {m: np.mean([row[1][m][3] for row in rows]) for m in methods}
    pt = np.mean([row[4] for row in rows], axis=0)
    print("| mean | " + " | ".join(f"{means[m]:.2f} / {meds[m]:.2f}, {secs[m]:.1f}"
                                   for m in methods)
          + f" | {pt[0]:.2f} / {pt[1]:.2f} vs {pt[2]:.2f} / {pt[3]:.2f} | |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
