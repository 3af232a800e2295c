"""Benchmark: `faceps infer` on synthetic sessions of other morphable models.

The shipped networks learn from faces of the built-in model; this measures how they do on
faces they have never seen the like of: sessions rendered from other models (any contract-5
``.npz``, e.g. ``faceps model import sfm ../shared/data/sfm --out sfm.npz``) next to
built-in faces of the same seeds. Errors are mean angular errors (degrees) at the full
input resolution over the visible face region, against the session's detailed ground
truth:

- ``net``: the inferred normals (what ``faceps infer`` writes);
- ``proxy``: the proxy ``faceps infer`` used (ProxyNet's, or with ``--proxy landmarks`` the
  built-in model fitted to the landmarks), ray cast;
- ``own coarse``: the face's own coarse surface (its model without fine detail), i.e. the
  best a proxy of that model could do;
- ``net, own proxy`` (with ``--own-proxy``): NormalNet given that own coarse surface as its
  proxy input instead of ProxyNet's (resampled to its crop): how much of the error is the
  proxy's and how much the image path's.

It first prints how far each model's random expressions move its face region at the
expression scale used. Models whose components are whole expressions move much further at
the same scale than the built-in model's (the Surrey model's six emotions 2.7x as far:
grimaces with the mouth wide open at the default scale 0.7); ``--exp-rms MM`` draws every
model's expressions at the scale that moves its face region by MM mm RMS, so that the
faces compared are equally expressive.

Where the landmarks come from matters to a proxy fitted to them: ``--landmarks dlib`` runs
the detector even where the session has landmarks, and ``--landmark-noise PX`` sets the
noise of the landmarks written into the built-in faces' sessions (other models' sessions
carry none when their model lacks some of the 68).

Run: ``.venv/bin/python bench/bench_other_models.py --models sfm.npz [--seeds 21 22 23]
[--weights DIR | --normal-weights RUN] [--own-proxy] [--proxy proxynet|landmarks]
[--landmarks auto|dlib] [--landmark-noise PX] [--exp-scale S | --exp-rms MM]``;
without ``--models`` only built-in faces.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from faceps.capture import load_session
from faceps.core.camera import Camera
from faceps.core.memory import retain_freed_memory
from faceps.learn.infer import InferConfig, infer, load_networks, map_pixels
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.fit import proxy_maps
from faceps.synth.faces import FaceConfig, expression_rms_mm, expression_scale
from faceps.synth.session import SessionSynthConfig, synth_session


class _ProxySwap(torch.nn.Module):
    """NormalNet with its proxy input replaced by ``proxy`` (normals (1, 3, S, S), mask
    (1, S, S)) while that is set."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.proxy: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, images, proxy_normals, extra, proxy_mask, **kw):
        if self.proxy is not None:
            proxy_normals, proxy_mask = self.proxy
        return self.network(images, proxy_normals, extra, proxy_mask, **kw)


def _own_proxy_at_crop(cap, own: np.ndarray, crop: Camera, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The session's own coarse normals (H, W, 3) resampled (nearest) to NormalNet's crop
    camera (the one ``infer`` used, ``Inference.crop_camera``), as (normals, mask)
    tensors."""
    S = crop.width
    v, u = np.mgrid[0:S, 0:S]
    uv = map_pixels(np.stack([u.ravel(), v.ravel()], 1).astype(np.float64), crop, cap.camera)
    iu = np.clip(np.round(uv[:, 0]).astype(int), 0, cap.width - 1)
    iv = np.clip(np.round(uv[:, 1]).astype(int), 0, cap.height - 1)
    n = own[iv, iu].reshape(S, S, 3)
    ok = np.all(np.isfinite(n), -1)
    n = np.where(ok[..., None], n, 0.0).astype(np.float32)
    return (torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))[None].to(device),
            torch.from_numpy(ok.astype(np.float32))[None].to(device))


def expression_displacement_mm(model, face_cfg: FaceConfig, n: int = 200, seed: int = 0
                                ) -> tuple[float, float, float]:
    """How far the random expressions of ``model`` move its face region with ``face_cfg``:
    (the expression scale used, mean RMS vertex displacement from the neutral mean
    (:func:`faceps.synth.faces.expression_rms_mm`), median over ``n`` draws of the largest
    displacement), mm; identity at the mean."""
    scale = (face_cfg.exp_scale if face_cfg.exp_rms_mm is None
             else expression_scale(model, face_cfg.exp_rms_mm))
    rng = np.random.default_rng(seed)
    region = np.asarray(model.region, np.float64) > 0.5
    zero_id = np.zeros(model.n_id)
    neutral = model.geometry(zero_id, np.zeros(model.n_exp)).reshape(-1, 3)
    peak = [np.linalg.norm(model.geometry(zero_id, model.sample(
        rng, id_scale=0.0, exp_scale=scale, albedo_scale=0.0).exp).reshape(-1, 3) - neutral,
        axis=1)[region].max() for _ in range(n)]
    return scale, expression_rms_mm(model, scale), float(np.median(peak))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[],
                    help="other models (.npz); the built-in model is always measured too")
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 3],
                    help="numbers of images given to the networks (default 1 and 3)")
    ap.add_argument("--weights", help="weights folder (default: the shipped weights)")
    ap.add_argument("--normal-weights", help="NormalNet run or .pt instead of the shipped one")
    ap.add_argument("--proxy-weights", help="ProxyNet run or .pt instead of the shipped one")
    ap.add_argument("--own-proxy", action="store_true",
                    help="also run NormalNet with the face's own coarse surface as its proxy")
    ap.add_argument("--exp-scale", type=float, default=None,
                    help="expression strength of the random faces (FaceConfig.exp_scale, "
                         "default its default); 0: neutral faces")
    ap.add_argument("--exp-rms", type=float, default=None, metavar="MM",
                    help="expression strength as the face region's mean RMS displacement "
                         "(FaceConfig.exp_rms_mm): every model's faces move as far (the "
                         "built-in model at its default scale: about 4.5 mm)")
    ap.add_argument("--proxy", default="proxynet", choices=("proxynet", "landmarks"),
                    help="where `faceps infer` takes its proxy from (InferConfig.proxy)")
    ap.add_argument("--landmarks", default="auto", choices=("auto", "dlib"),
                    help="the session's landmarks when it has them, else the detector "
                         "(auto), or always the detector (dlib)")
    ap.add_argument("--landmark-noise", type=float, default=0.0, metavar="PX",
                    help="noise (px) of the landmarks written into the sessions (default 0)")
    ap.add_argument("--passes", type=int,
                    help="NormalNet passes (InferConfig.passes; default: what the network "
                         "was trained for)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.exp_scale is not None and args.exp_rms is not None:
        ap.error("give --exp-scale or --exp-rms, not both")
    face_cfg = (FaceConfig(exp_rms_mm=args.exp_rms) if args.exp_rms is not None
                else FaceConfig() if args.exp_scale is None
                else FaceConfig(exp_scale=args.exp_scale))
    base = InferConfig(weights=args.weights, normal_weights=args.normal_weights,
                       proxy_weights=args.proxy_weights, proxy=args.proxy,
                       landmarks=args.landmarks, passes=args.passes)
    nets = load_networks(base)
    swap = _ProxySwap(nets.normal.network)
    nets.normal.network = swap
    builtin = load_model("builtin")
    models = [("built-in", builtin)] + [(Path(m).stem, load_model(m)) for m in args.models]
    for name, model in models:
        scale, rms, peak = expression_displacement_mm(model, face_cfg)
        print(f"{name}: expressions at scale {scale:.3g} move the face region by "
              f"{rms:.1f} mm RMS (largest displacement {peak:.1f} mm, median of draws)",
              flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models:
            for seed in args.seeds:
                s = Path(tmp) / f"{name}-{seed}"
                synth_session(s, seed=seed, model=model,
                              config=SessionSynthConfig(size=size, face=face_cfg,
                                                        landmark_noise_px=args.landmark_noise))
                cap = load_session(s)
                gt = np.load(s / "ground_truth/normals.npy")
                face = cv2.imread(str(s / "ground_truth/face_mask.png"), 0) > 0
                own = np.load(s / "ground_truth/proxy_normals.npy")
                for k in args.images:
                    t = time.perf_counter()
                    out = infer(cap, replace(base, num_images=k), networks=nets)
                    wall = time.perf_counter() - t
                    pn = proxy_maps(builtin, out.proxy, cap)["normals"]
                    m = face & np.all(np.isfinite(out.normals), -1) & np.all(np.isfinite(pn), -1)
                    mo = m & np.all(np.isfinite(own), -1)
                    row = (name, seed, k, angular_error_deg(out.normals[m], gt[m]).mean(),
                           angular_error_deg(pn[m], gt[m]).mean(),
                           angular_error_deg(own[mo], gt[mo]).mean(), 100.0 * m.sum() /
                           max(face.sum(), 1), wall)
                    if args.own_proxy:
                        swap.proxy = _own_proxy_at_crop(cap, own, out.crop_camera, nets.device)
                        own_out = infer(cap, replace(base, num_images=k), networks=nets)
                        swap.proxy = None
                        mn = face & np.all(np.isfinite(own_out.normals), -1)
                        row += (angular_error_deg(own_out.normals[mn], gt[mn]).mean(),)
                    rows.append(row)
                    extra = f", net with own proxy {row[8]:.2f}" if args.own_proxy else ""
                    print(f"{name} seed {seed}, {k} image(s): net {row[3]:.2f} deg, "
                          f"proxy {row[4]:.2f}, own coarse {row[5]:.2f}{extra}", flush=True)
    strength = (f"{face_cfg.exp_rms_mm:g} mm RMS" if face_cfg.exp_rms_mm is not None
                else f"scale {face_cfg.exp_scale}")
    print(f"\n### `faceps infer` on faces of other models, {size[0]}x{size[1]}, expression "
          f"{strength}, proxy from {args.proxy}, landmarks {args.landmarks} "
          f"(session noise {args.landmark_noise} px)\n")
    own_head = " net, own proxy (deg) |" if args.own_proxy else ""
    print("| model | seed | images | net mean (deg) | proxy mean (deg) | own coarse (deg) "
          "| coverage | time (s) |" + own_head)
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.own_proxy else ""))
    for r in rows:
        own_cell = f" {r[8]:.2f} |" if args.own_proxy else ""
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | "
              f"{r[6]:.1f} % | {r[7]:.2f} |" + own_cell)
    print()
    for name, _ in models:
        for k in args.images:
            sel = [r for r in rows if r[0] == name and r[2] == k]
            print(f"{name}, {k} image(s): net {np.mean([r[3] for r in sel]):.2f} deg mean "
                  f"over {len(sel)} seeds (proxy {np.mean([r[4] for r in sel]):.2f})")


if __name__ == "__main__":
    retain_freed_memory()  # as the faceps command does
    main()
