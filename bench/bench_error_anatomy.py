"""Benchmark: where the normal error of `faceps reconstruct` sits on synthetic sessions.

For each seed, a synthetic session (as ``bench_reconstruct.py`` makes them: sheen, noise,
8-bit sRGB, 2 px landmark noise, the session's lights) is reconstructed with the default
options, and the angular error over the visible face is broken down:

- the error left after the best global rotation of the normals onto the truth (Kabsch),
  and that rotation's angle: how much of the error is a tilt of the whole face;
- by distance from the border of the solved region (pixels);
- by the number of lights the final normal update used at the pixel (0: no usable sample,
  the prior alone), with each group's share of the pixels and of the summed error;
- on the pixels more than 10 degrees off: how far the final update moved them from its
  prior against how far the truth is, and (where every light was used) the data term of
  eq. 6 of the result against that of the true normals and albedo.

With ``--maps DIR`` it writes, per seed, the front image beside the error map (0-15
degrees, blue to red) cropped to the face: ``DIR/error_seed{S}.png`` (``--map-width``
scales them, ``--jpeg`` writes JPEG).

Run: ``.venv/bin/python bench/bench_error_anatomy.py [--size 1600x1200] [--seeds 0 1 2]
[--maps DIR [--map-width PX] [--jpeg]]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from bench_reconstruct import visible_face  # this folder: run as a script

import faceps.optimize.reconstruct as reconstruct_module
from faceps.capture import load_session
from faceps.core.memory import retain_freed_memory
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.normal_albedo import light_vectors
from faceps.optimize.reconstruct import ReconstructConfig, reconstruct
from faceps.synth.session import SessionSynthConfig, synth_session

BANDS = ((0, 10), (10, 30), (30, 80), (80, None))
MAP_RANGE_DEG = 15.0
FAR_DEG = 10.0


class _LastUpdate:
    """Wraps the normal/albedo update that ``reconstruct`` calls and keeps its last call
    (the final pass's, whose normals are the reconstruction's): result, positions, prior
    normals, lights and configuration."""

    def __init__(self) -> None:
        self.inner = reconstruct_module.update_normals_albedo
        self.result = None

    def __call__(self, images, points, prior, mask, lights, config=None, **kwargs):
        self.points, self.prior, self.lights, self.config = points, prior, lights, config
        self.result = self.inner(images, points, prior, mask, lights, config, **kwargs)
        return self.result


def sheen_data_energy(images: np.ndarray, points: np.ndarray, normals: np.ndarray,
                      albedo: np.ndarray, lights, robust_scale: float) -> np.ndarray:
    """Per pixel, the data term of eq. 6 with the update's default loss (``sheen``: the
    residual's component along the light's colour brighter than predicted costs linearly
    beyond ``robust_scale``), over all L lights, residuals divided by the image scale (the
    median channel mean of the given samples). images (L, K, 3); the rest (K, 3)."""
    G = light_vectors(points, lights)
    beta = lights.intensities
    h = np.einsum("lkc,kc->lk", G, normals)
    r = images - beta[:, None, :] * albedo[None] * h[..., None]
    r = r / float(np.median(images.mean(-1)))
    u = beta / np.linalg.norm(beta, axis=1, keepdims=True)
    m = np.einsum("lc,lkc->lk", u, r)
    k = robust_scale
    perp = np.einsum("lkc,lkc->lk", r, r) - m * m
    return (perp + np.where(m > k, 2 * k * m - k * k, m * m)).sum(0)


def best_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation R minimising sum |R a_i - b_i|^2 (Kabsch)."""
    U, _, Vt = np.linalg.svd(b.T @ a)
    D = np.diag([1.0, 1.0, float(np.sign(np.linalg.det(U @ Vt)))])
    return U @ D @ Vt


def anatomy(normals: np.ndarray, truth: np.ndarray, mask: np.ndarray,
            n_lights: np.ndarray) -> dict:
    a = normals[mask].astype(np.float64)
    b = truth[mask].astype(np.float64)
    err = angular_error_deg(a, b)
    R = best_rotation(a, b)
    rotated = angular_error_deg(a @ R.T, b)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)[mask]
    bands = []
    for lo, hi in BANDS:
        sel = (dist >= lo) & (dist < (np.inf if hi is None else hi))
        bands.append((float(np.mean(err[sel])) if sel.any() else float("nan"),
                      100.0 * float(sel.mean())))
    nl = n_lights[mask]
    lights = []
    for k in range(int(nl.max()) + 1):
        sel = nl == k
        lights.append((float(np.mean(err[sel])) if sel.any() else float("nan"),
                       100.0 * float(sel.mean()), 100.0 * float(err[sel].sum() / err.sum())))
    return {"mean": float(err.mean()), "rotated": float(rotated.mean()), "angle": angle,
            "bands": bands, "lights": lights, "err": err}


def far_from_truth(cap, gt: Path, last: _LastUpdate, truth: np.ndarray,
                   mask: np.ndarray) -> dict:
    """On the pixels more than FAR_DEG off: how far the final update moved its normals
    from its prior, against how far the truth is from that prior; and, on those with
    all lights, the data energy of the result against that of the true normals and
    albedo at the update's positions."""
    na = last.result
    ok = mask & np.all(np.isfinite(na.normals), -1) & np.all(np.isfinite(last.prior), -1)
    err = np.full(mask.shape, np.nan)
    err[ok] = angular_error_deg(na.normals[ok], truth[ok])
    far = ok & (err > FAR_DEG)
    out = {"share": 100.0 * far.sum() / max(ok.sum(), 1),
           "moved": float(np.mean(angular_error_deg(na.normals[far], last.prior[far]))),
           "truth": float(np.mean(angular_error_deg(truth[far], last.prior[far])))}
    every = far & (na.n_lights == len(cap.light_names))
    if every.any():
        images = cap.images[:, every].astype(np.float64)
        pts = last.points[every].astype(np.float64)
        scale = (last.config.robust_scale if last.config is not None else 0.003)
        true_albedo = np.load(gt / "albedo.npy")[every].astype(np.float64)
        e_rec = sheen_data_energy(images, pts, na.normals[every].astype(np.float64),
                                  na.albedo[every].astype(np.float64), last.lights, scale)
        e_true = sheen_data_energy(images, pts, truth[every].astype(np.float64),
                                   true_albedo, last.lights, scale)
        out.update(every=100.0 * every.sum() / max(far.sum(), 1),
                   e_rec=float(np.median(e_rec)), e_true=float(np.median(e_true)))
    return out


def error_map(image: np.ndarray, err: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 8-bit front image beside the error map, both cropped to the mask's box."""
    full = np.full(mask.shape, np.nan, np.float32)
    full[mask] = err
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    e = full[box]
    scaled = np.nan_to_num(np.clip(e / MAP_RANGE_DEG, 0, 1) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
    colour[~np.isfinite(e)] = 0
    return np.concatenate([image[box], colour], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1600x1200")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--maps", type=Path, default=None, help="folder for the error maps")
    ap.add_argument("--map-width", type=int, default=None,
                    help="scale the error maps to this width (default: the crop's own)")
    ap.add_argument("--jpeg", action="store_true", help="write the maps as JPEG (quality 90)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    model = load_model("builtin")
    last = _LastUpdate()
    reconstruct_module.update_normals_albedo = last
    if args.maps is not None:
        args.maps.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            d = Path(tmp) / f"s{seed}"
            synth_session(d, seed=seed, model=model, config=SessionSynthConfig(
                size=size, landmark_noise_px=2.0, include_lights=True))
            cap = load_session(d)
            rec = reconstruct(cap, model, ReconstructConfig())
            gt = d / "ground_truth"
            truth = np.load(gt / "normals.npy")
            mask = visible_face(gt) & rec.mask & np.all(np.isfinite(truth), -1)
            a = anatomy(rec.normals, truth, mask, last.result.n_lights)
            a["far"] = far_from_truth(cap, gt, last, truth, mask)
            rows.append((seed, a))
            print(f"seed {seed}: {a['mean']:.2f} deg", flush=True)
            if args.maps is not None:
                names = list(cap.light_names)
                k = names.index("front") if "front" in names else len(names) // 2
                front = cv2.imread(str(cap.image_paths[k]))
                path = args.maps / f"error_seed{seed}.{'jpg' if args.jpeg else 'png'}"
                picture = error_map(front, a["err"], mask)
                if args.map_width:
                    f = args.map_width / picture.shape[1]
                    picture = cv2.resize(picture, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(path), picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"\n### Where the normal error sits, {size[0]}x{size[1]}, session lights\n")
    print("| seed | mean (deg) | after the best global rotation | rotation (deg) | "
          + " | ".join(f"{lo}-{hi if hi else 'inf'} px from the border" for lo, hi in BANDS)
          + " |")
    print("|---|---|---|---|" + "---|" * len(BANDS))
    for seed, a in rows:
        print(f"| {seed} | {a['mean']:.2f} | {a['rotated']:.2f} | {a['angle']:.2f} | "
              + " | ".join(f"{m:.2f} ({p:.0f} %)" for m, p in a["bands"]) + " |")
    kmax = max(len(a["lights"]) for _, a in rows)
    print("\nBy the lights used at the pixel: mean error (deg), share of the pixels, share of "
          "the summed error\n")
    print("| seed | " + " | ".join(f"{k} light{'s' if k != 1 else ''}" for k in range(kmax))
          + " |")
    print("|---|" + "---|" * kmax)
    for seed, a in rows:
        cells = [f"{m:.2f} / {p:.1f} % / {s:.0f} %" for m, p, s in a["lights"]]
        cells += ["-"] * (kmax - len(cells))
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print(f"\nPixels more than {FAR_DEG:g} deg off: how far the final normal update moved them "
          "from its prior, how far the truth is from that prior; on those with every light, "
          "the median data energy (sheen loss) of the result and of the true normals and "
          "albedo\n")
    print("| seed | share of the face | moved from the prior (deg) | truth from the prior "
          "(deg) | with every light | data energy, result | data energy, truth |")
    print("|---|---|---|---|---|---|---|")
    for seed, a in rows:
        f = a["far"]
        print(f"| {seed} | {f['share']:.1f} % | {f['moved']:.1f} | {f['truth']:.1f} | "
              f"{f.get('every', 0.0):.0f} % | {f.get('e_rec', float('nan')):.5f} | "
              f"{f.get('e_true', float('nan')):.5f} |")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
