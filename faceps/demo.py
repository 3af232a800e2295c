"""``faceps demo``: the end-to-end run on built-in data, no network.

Today it: builds the built-in morphable model and renders a preview grid; synthesizes a
three-light near-light capture session with ground truth; ingests it with the session
reader every command uses and writes a contact sheet; checks the images against the
imaging model (eq. 1) with the ground truth; fits the model to the session's landmarks
(the coarse proxy); and solves per-pixel near-light photometric stereo with the session's
calibrated lights and positions from the proxy surface, scoring normals against the
ground truth next to the proxy's own normals.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from faceps.core.atomic import save_json, save_png
from faceps.core.imageio import normals_to_rgb
from faceps.core.lights import PointLights, shade_point
from faceps.core.viz import error_map, grid, label, tonemap

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo produced: output folder, files, numbers and timings."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        lines = [f"faceps demo -> {self.out}", ""]
        if "eq1" in m:
            e = m["eq1"]
            lines.append(f"capture vs eq. 1 (lit, unsaturated pixels): median ratio "
                         f"{e['median_ratio']:.3f}, {e['within_5pct']:.1f} % within 5 %")
        if "landmark_fit" in m:
            lines.append(f"proxy fitted to landmarks: reprojection RMSE "
                         f"{m['landmark_fit']['rmse_px']:.2f} px")
        for key, name in (("proxy", "proxy normals (landmark fit)"),
                          ("nearlight_ls", "near-light least squares (3 lights)")):
            if key in m and m[key].get("count"):
                s = m[key]
                lines.append(f"{name:38s} mean {s['mean']:5.2f} deg, median {s['median']:5.2f}"
                             f" deg, {s['below_11.25']:5.1f} % < 11.25 deg "
                             f"({s['coverage']:.1f} % of face pixels)")
        lines.append("")
        lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        lines.append("files:   " + ", ".join(str(p.relative_to(self.out))
                                             for p in self.files.values()))
        return "\n".join(lines)


def run_demo(out: str | os.PathLike = "demo-out", *, seed: int = 0,
             size: tuple[int, int] = (800, 600), progress: bool = False) -> DemoResult:
    """Run the demo and write its outputs under ``out`` (replacing an earlier demo run).

    Args:
        out: output folder.
        seed: seed of the synthetic face.
        size: capture resolution (W, H).
        progress: show a progress bar.

    Returns:
        :class:`DemoResult`.
    """
    from faceps.capture import inspect_session, load_session
    from faceps.core.raycast import RayCaster
    from faceps.model import load_model
    from faceps.model.preview import preview_grid
    from faceps.optimize import angular_error_deg, nearlight_least_squares, normal_stats
    from faceps.optimize.proxy import fit_landmarks
    from faceps.synth.session import SessionSynthConfig, synth_session

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = DemoResult(out)
    steps = ["model", "synthesize", "ingest", "photometric stereo", "pictures"]
    bar = tqdm(total=len(steps), desc="demo", unit="step", disable=not progress)

    def step(name: str) -> float:
        bar.set_postfix_str(name)
        return time.perf_counter()

    t = step("model")
    model = load_model("builtin")
    res.files["model_preview"] = preview_grid(model, out / "model_preview.png", n=4, seed=seed,
                                              size=200)
    res.timings["model"] = time.perf_counter() - t
    bar.update()

    t = step("synthesize")
    session_dir = out / "session"
    synth = synth_session(session_dir, seed=seed, model=model,
                          config=SessionSynthConfig(size=size), overwrite=True)
    res.files["session"] = session_dir / "session.json"
    res.timings["synthesize"] = time.perf_counter() - t
    bar.update()

    t = step("ingest")
    cap = load_session(session_dir)
    res.files["contact_sheet"] = out / "contact_sheet.png"
    inspect_session(cap, res.files["contact_sheet"])
    res.timings["ingest"] = time.perf_counter() - t
    bar.update()

    t = step("photometric stereo")
    gt = session_dir / "ground_truth"
    n_gt = np.load(gt / "normals.npy")
    depth = np.load(gt / "depth.npy")
    albedo = np.load(gt / "albedo.npy")
    face = synth.rendered.face_mask
    lights: PointLights = cap.lights

    # 0. the coarse proxy: the model fitted to the session's landmarks
    fit = fit_landmarks(model, cap.landmarks, cap.camera)
    pm = RayCaster(fit.geometry(model), model.triangles).render(cap.camera)
    seen = pm["mask"] & ~pm["backface"]
    proxy_n = np.where(seen[..., None], pm["normals"], np.nan).astype(np.float32)
    proxy_d = np.where(seen, pm["depth"], np.nan).astype(np.float32)
    res.metrics["landmark_fit"] = {"rmse_px": fit.landmark_rmse_px,
                                   "iterations": len(fit.history)}
    save_json(out / "proxy.json", fit.to_dict())

    # 1. the capture against eq. 1 evaluated with its ground truth
    pred = shade_point(np.nan_to_num(cap.camera.backproject(depth)), np.nan_to_num(n_gt),
                       np.nan_to_num(albedo), lights)
    rf = synth.rendered
    lit = face[None] & ~rf.shadow & ~cap.saturated & (pred.mean(-1) > 0.05)
    ratio = (cap.images[lit] / pred[lit]).mean(-1)
    res.metrics["eq1"] = {"median_ratio": float(np.median(ratio)),
                          "within_5pct": float(100 * np.mean(np.abs(ratio - 1) < 0.05)),
                          "pixels": int(lit.sum())}

    # 2. near-light least squares with the coarse model surface as positions
    ls = nearlight_least_squares(cap.images, cap.camera.backproject(proxy_d), lights,
                                 face & np.isfinite(proxy_d), saturated=cap.saturated)
    err_ls = angular_error_deg(ls.normals, n_gt)
    err_proxy = angular_error_deg(proxy_n, n_gt)
    err_ls[~face] = np.nan
    err_proxy[~face] = np.nan
    n_face = max(int(face.sum()), 1)
    res.metrics["proxy"] = {**normal_stats(err_proxy),
                            "coverage": 100 * np.isfinite(err_proxy).sum() / n_face}
    res.metrics["nearlight_ls"] = {**normal_stats(err_ls),
                                   "coverage": 100 * np.isfinite(err_ls).sum() / n_face}
    res.timings["photometric_stereo"] = time.perf_counter() - t
    bar.update()

    t = step("pictures")
    H = 300
    inputs = [label(tonemap(cap.images[j], face), cap.light_names[j])
              for j in range(cap.n_images)]
    normals_row = [label(normals_to_rgb(np.where(face[..., None], n_gt, np.nan)),
                         "ground truth"),
                   label(normals_to_rgb(np.where(face[..., None], proxy_n, np.nan)),
                         "proxy (landmark fit)"),
                   label(normals_to_rgb(ls.normals), "near-light LS")]
    errors_row = [label(error_map(err_proxy, 30.0), "error: proxy"),
                  label(error_map(err_ls, 30.0), "error: near-light LS")]
    res.files["overview"] = save_png(out / "overview.png",
                                     grid([inputs, normals_row, errors_row], H))
    res.timings["pictures"] = time.perf_counter() - t
    bar.update()
    bar.close()

    res.timings = {k: round(v, 3) for k, v in res.timings.items()}
    res.timings["synthesize_detail"] = round(sum(synth.timings.get(k, 0.0) for k in
                                                 ("detail", "raycast", "shading", "sensor")), 3)
    res.files["summary"] = save_json(out / "summary.json",
                                     {"metrics": res.metrics, "timings": res.timings,
                                      "seed": seed, "size": list(size)})
    return res
