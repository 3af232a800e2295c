"""Benchmark: height-field recovery (eq. 7 Gauss-Newton) against integration baselines.

A synthetic face-like surface (an ellipsoidal dome with nose, brows, eye sockets, lips and
~80 small bumps, exact analytic normals) at 450 mm is seen by a 1600x1200 camera with
fx = 2600 (about 300k face pixels). Noise is added to the normals and the prior depth is
the true depth smoothed (Gaussian, 5 mm), scaled and shifted, like a coarse proxy.

Tables: (1) time and error of our Gauss-Newton (``solve_height_field``), weighted least
squares, Frankot-Chellappa and the FacePSNet Adam scheme, with the time per Adam iteration,
its total (measured, or extrapolated to the released 30000 iterations when fewer are run)
and the Adam / Gauss-Newton time ratio from the same run; (2) a size sweep of the
Gauss-Newton solver over 0.5 to 4 MPix images with the face covering the same share.

Errors: depth, mean |dz - median dz| in mm over the mask (the scale and offset come from
the prior in every method); normals, mean angle in degrees between the eq. 7 normals of the
result and the true normals over the mask eroded by 2 px. Times: wall clock and CPU time of
this process (the machine may be shared; CPU time is the better guide then), best of
``--repeats`` after a warm-up solve. Run: ``.venv/bin/python bench/bench_heightfield.py``
(``--adam-iters 500`` for a quick run).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import ndimage

from faceps.core import Camera
from faceps.core.memory import retain_freed_memory
from faceps.optimize.heightfield import (
    HeightFieldConfig,
    height_field_normals,
    solve_height_field,
)
from faceps.optimize.integrate import (
    integrate_adam_facepsnet,
    integrate_frankot_chellappa,
    integrate_wls,
)
from faceps.optimize.nearlight import angular_error_deg

RELEASED_ADAM_ITERS = 30000


# ----------------------------------------------------------------------- the surface
class FaceSurface:
    """z = g(x, y) in the camera frame (mm) with analytic gradients: a dome of half-axes
    (a, b) and relief ``depth`` at distance ``zc``, plus Gaussian features."""

    def __init__(self, zc: float = 450.0, a: float = 48.0, b: float = 60.0,
                 depth: float = 45.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.zc, self.a, self.b, self.depth = zc, a, b, depth
        # (x0, y0, amplitude (mm, negative: toward the camera), sigma_x, sigma_y)
        feats = [(0.0, 2.0, -14.0, 6.0, 11.0),             # nose
                 (0.0, 14.0, -4.0, 4.0, 2.0),              # nose tip
                 (-17.0, -10.0, 6.0, 8.0, 5.0), (17.0, -10.0, 6.0, 8.0, 5.0),    # sockets
                 (-17.0, -20.0, -2.5, 10.0, 2.5), (17.0, -20.0, -2.5, 10.0, 2.5),  # brows
                 (0.0, 30.0, -3.0, 12.0, 3.0), (0.0, 35.0, -2.0, 10.0, 2.5)]       # lips
        n_small = 80
        x0 = rng.uniform(-0.8 * a, 0.8 * a, n_small)
        y0 = rng.uniform(-0.8 * b, 0.8 * b, n_small)
        amp = rng.uniform(-1.0, 1.0, n_small)
        sig = rng.uniform(1.0, 5.0, n_small)
        feats += list(zip(x0, y0, amp, sig, sig))
        self.features = np.array(feats)

    def __call__(self, x, y):
        q = (x / self.a) ** 2 + (y / self.b) ** 2
        t = np.maximum(1.0 - 0.8 * q, 0.05)
        w = np.sqrt(t)
        inside = (1.0 - 0.8 * q) > 0.05
        val = self.zc - self.depth * w
        dw = np.where(inside, 0.4 / w, 0.0)
        gx = self.depth * dw * 2 * x / self.a ** 2
        gy = self.depth * dw * 2 * y / self.b ** 2
        for x0, y0, amp, sx, sy in self.features:
            e = amp * np.exp(-0.5 * (((x - x0) / sx) ** 2 + ((y - y0) / sy) ** 2))
            val = val + e
            gx = gx - e * (x - x0) / sx ** 2
            gy = gy - e * (y - y0) / sy ** 2
        return val, gx, gy


def render(camera: Camera, surface: FaceSurface, margin: float = 1.1):
    """Exact depth (H, W), normals (H, W, 3) and mask of the surface's ellipse; the
    surface is evaluated only inside the projected bounding box."""
    W, H = camera.image_size
    K = camera.K
    half_u = margin * surface.a * K[0, 0] / (surface.zc - surface.depth)
    half_v = margin * surface.b * K[1, 1] / (surface.zc - surface.depth)
    u0, u1 = max(int(K[0, 2] - half_u), 0), min(int(K[0, 2] + half_u) + 1, W)
    v0, v1 = max(int(K[1, 2] - half_v), 0), min(int(K[1, 2] + half_v) + 1, H)
    uu, vv = np.meshgrid(np.arange(u0, u1, dtype=np.float64),
                         np.arange(v0, v1, dtype=np.float64))
    r = camera.rays(np.stack([uu, vv], axis=-1))
    rx, ry = r[..., 0], r[..., 1]
    z = np.full(rx.shape, surface.zc - surface.depth)
    for _ in range(8):                      # Newton on z = g(z rx, z ry)
        val, gx, gy = surface(z * rx, z * ry)
        z = z - (z - val) / (1 - gx * rx - gy * ry)
    val, gx, gy = surface(z * rx, z * ry)
    n = np.stack([gx, gy, -np.ones_like(gx)], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    x, y = z * rx, z * ry
    m = (x / surface.a) ** 2 + (y / surface.b) ** 2 < 1.0
    depth = np.full((H, W), np.nan)
    normals = np.full((H, W, 3), np.nan)
    mask = np.zeros((H, W), bool)
    depth[v0:v1, u0:u1] = z
    normals[v0:v1, u0:u1] = n
    mask[v0:v1, u0:u1] = m
    return depth, normals, mask


def make_case(mpix: float, noise: float, seed: int, smooth_mm: float = 5.0):
    """Camera (4:3, fx = 2600 at 1600 px wide), exact maps, noisy normals, proxy depth."""
    W = int(round(np.sqrt(mpix * 1e6 * 4 / 3)))
    H = int(round(W * 3 / 4))
    f = 2600.0 * W / 1600.0
    cam = Camera(np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2 + 0.1 * H], [0, 0, 1]]),
                 (W, H))
    surface = FaceSurface(seed=seed)
    depth, normals, mask = render(cam, surface)
    rng = np.random.default_rng(seed + 1)
    noisy = normals + rng.normal(0.0, noise, normals.shape)
    noisy /= np.linalg.norm(noisy, axis=-1, keepdims=True)
    noisy[~mask] = np.nan
    sigma_px = smooth_mm * f / surface.zc
    filled = np.where(mask, depth, np.nanmedian(depth[mask]))
    depth0 = ndimage.gaussian_filter(filled, sigma_px) * 1.005 + 2.0
    return cam, depth, normals, mask, noisy, depth0


# ---------------------------------------------------------------------------- metrics
def errors(depth, cam, truth, normals, mask):
    d = (np.asarray(depth, np.float64) - truth)[mask]
    dz = float(np.mean(np.abs(d - np.median(d))))
    inner = ndimage.binary_erosion(mask, iterations=2)
    ang = angular_error_deg(height_field_normals(depth, cam, mask), normals)[inner]
    return dz, float(np.nanmean(ang))


def timed(fn, repeats: int):
    """Best wall and CPU seconds of ``repeats`` calls, and the last result."""
    best_wall, best_cpu, out = np.inf, np.inf, None
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - t)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu, out


def warm_up() -> None:
    """Imports and first-call costs (pyamg, torch) outside the timings."""
    cam, depth, normals, mask, noisy, depth0 = make_case(0.05, 0.0, 99)
    solve_height_field(noisy, depth0, mask, cam)
    integrate_wls(noisy, mask, cam, depth0=depth0)
    integrate_adam_facepsnet(noisy, depth0, mask, cam, iterations=2)


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpix", type=float, default=1.92,
                    help="image size of the comparison in MPix (1.92: 1600x1200)")
    ap.add_argument("--noise", type=float, default=0.02,
                    help="std of the Gaussian noise added to each normal component")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method (best)")
    ap.add_argument("--adam-iters", type=int, default=RELEASED_ADAM_ITERS,
                    help="Adam iterations to run (the total is extrapolated to 30000)")
    ap.add_argument("--sizes", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0],
                    help="image sizes (MPix) of the Gauss-Newton sweep; none to skip")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for the Adam scheme (the other methods use one "
                         "core; several threads stall when the machine is shared)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)

    print(f"load average at start: {os.getloadavg()[0]:.2f} "
          f"(2-core machine: CPU time is the better guide when it is > 1); "
          f"torch threads: {args.torch_threads}\n")
    warm_up()
    cam, depth, normals, mask, noisy, depth0 = make_case(args.mpix, args.noise, args.seed)
    W, H = cam.image_size
    inner = ndimage.binary_erosion(mask, iterations=2)
    noise_deg = float(np.nanmean(angular_error_deg(noisy, normals)[inner]))
    print(f"### {W}x{H}, fx = {cam.K[0, 0]:.0f}, {int(mask.sum())} face pixels, normal noise "
          f"{noise_deg:.2f} deg mean\n")
    print("| method | wall (s) | CPU (s) | iterations | depth err (mm) | normal err (deg) |")
    print("|---|---|---|---|---|---|")
    dz0, ang0 = errors(depth0, cam, depth, normals, mask)
    print(f"| prior depth0 (input) | - | - | - | {dz0:.3f} | {ang0:.2f} |")

    wall, cpu, res = timed(lambda: solve_height_field(noisy, depth0, mask, cam), args.repeats)
    gn_wall, gn_cpu = wall, cpu
    dz, ang = errors(res.depth, cam, depth, normals, mask)
    its = "+".join(str(lv["iterations"]) for lv in res.levels)
    print(f"| Gauss-Newton eq. 7 (ours, default) | {wall:.2f} | {cpu:.2f} | {its} GN "
          f"(levels {'/'.join(str(lv['pixels']) for lv in res.levels)} px) | {dz:.3f} | "
          f"{ang:.2f} |")
    tight = HeightFieldConfig(iterations=6, coarse_iterations=4, tol=1e-7, cg_tol=1e-6,
                              cg_maxiter=500)
    wall, cpu, ref = timed(lambda: solve_height_field(noisy, depth0, mask, cam, tight), 1)
    dz, ang = errors(ref.depth, cam, depth, normals, mask)
    print(f"| Gauss-Newton eq. 7, converged tightly | {wall:.2f} | {cpu:.2f} | "
          f"{'+'.join(str(lv['iterations']) for lv in ref.levels)} GN | {dz:.3f} | "
          f"{ang:.2f} |")

    wall, cpu, r = timed(lambda: integrate_wls(noisy, mask, cam, depth0=depth0), args.repeats)
    dz, ang = errors(r.depth, cam, depth, normals, mask)
    print(f"| WLS, log-depth (AMG-CG) | {wall:.2f} | {cpu:.2f} | {r.iterations} CG | {dz:.3f}"
          f" | {ang:.2f} |")
    wall, cpu, r = timed(lambda: integrate_frankot_chellappa(noisy, mask, cam, depth0=depth0),
                         args.repeats)
    dz, ang = errors(r.depth, cam, depth, normals, mask)
    print(f"| Frankot-Chellappa, log-depth | {wall:.2f} | {cpu:.2f} | - | {dz:.3f} | "
          f"{ang:.2f} |")

    adam_wall, adam_cpu, r = timed(
        lambda: integrate_adam_facepsnet(noisy, depth0, mask, cam, iterations=args.adam_iters),
        1)
    dz, ang = errors(r.depth, cam, depth, normals, mask)
    per_it = adam_wall / max(args.adam_iters, 1)
    total = per_it * RELEASED_ADAM_ITERS
    print(f"| FacePSNet Adam, {args.adam_iters} iterations | {adam_wall:.2f} | {adam_cpu:.2f}"
          f" | {args.adam_iters} | {dz:.3f} | {ang:.2f} |")

    per_it_cpu = adam_cpu / max(args.adam_iters, 1)
    kind = "measured" if args.adam_iters == RELEASED_ADAM_ITERS else "extrapolated"
    print("\n| Adam: ms / iteration (wall / CPU) | Adam: 30000 iterations, wall (s) | "
          "Adam / Gauss-Newton (wall / CPU) |")
    print("|---|---|---|")
    print(f"| {per_it * 1e3:.1f} / {per_it_cpu * 1e3:.1f} | {total:.0f} ({kind}) | "
          f"{total / gn_wall:.0f}x / {per_it_cpu * RELEASED_ADAM_ITERS / gn_cpu:.0f}x |")

    print("\nGauss-Newton default, stages (s, wall):",
          ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))

    if args.sizes:
        print("\n### Gauss-Newton size sweep (default config, face share constant)\n")
        print("| image | MPix | face px | levels | GN iterations | CG iterations | wall (s) |"
              " CPU (s) | CPU s / M face px | depth err (mm) | normal err (deg) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for mp in args.sizes:
            c, d, nrm, m, nz, d0 = make_case(mp, args.noise, args.seed)
            wall, cpu, rs = timed(lambda c=c, m=m, nz=nz, d0=d0: solve_height_field(nz, d0, m, c),
                                  args.repeats)
            dz, ang = errors(rs.depth, c, d, nrm, m)
            cg = "+".join(str(sum(lv["cg_iterations"])) for lv in rs.levels)
            its = "+".join(str(lv["iterations"]) for lv in rs.levels)
            px = int(m.sum())
            print(f"| {c.width}x{c.height} | {c.width * c.height / 1e6:.2f} | {px} | "
                  f"{len(rs.levels)} | {its} | {cg} | {wall:.2f} | {cpu:.2f} | "
                  f"{cpu / px * 1e6:.2f} | {dz:.3f} | {ang:.2f} |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
