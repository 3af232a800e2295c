"""``faceps demo``: the end-to-end run on built-in data, no network access.

It: builds the built-in morphable model and renders a preview grid; synthesizes a
three-light near-light capture session with ground truth; ingests it with the session
reader every command uses and writes a contact sheet; checks the images against the
imaging model (eq. 1) with the ground truth; fits the model to the session's landmarks
(the coarse proxy) and solves per-pixel near-light photometric stereo with the session's
lights and positions from the proxy surface; reconstructs the session by optimisation
(``faceps reconstruct``: proxy, normal/albedo update, height field) into
``reconstruction/``; reconstructs it again with the shipped networks from one image (the
front one) and from all three (``faceps infer``) into ``infer-1/`` and ``infer-3/`` (skipped,
with a note, when the weights are not installed); scores every result against the ground
truth; and writes ``report.html``, one self-contained page comparing the methods (inputs,
normal, albedo and depth maps, error maps, mesh renders, errors and time per stage), plus
a ``report.html`` in each reconstruction folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from faceps.core.atomic import save_json, save_png
from faceps.core.errors import FacepsError
from faceps.core.imageio import normals_to_rgb
from faceps.core.lights import PointLights, shade_point
from faceps.core.viz import error_map, grid, label, tonemap

if TYPE_CHECKING:
    from faceps.learn.infer import InferenceNetworks
    from faceps.model.morphable import MorphableModel
    from faceps.optimize.reconstruct import ReconstructConfig

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo"]

#: names of the compared methods on the page and in ``summary.json``
OPTIMISATION = "optimisation"
NETWORK_1 = "network, 1 image"
NETWORK_3 = "network, 3 images"
PROXY = "proxy (optimisation)"


@dataclass
class DemoResult:
    """What the demo produced: output folder, files, numbers, timings and notes."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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
        methods = m.get("methods", {})
        if methods:
            lines += ["", f"{'method':22s} {'mean':>6s} {'median':>6s} {'<11.25':>7s} "
                          f"{'<30':>6s} {'cover':>6s} {'depth':>7s} {'time':>7s}",
                      f"{'':22s} {'deg':>6s} {'deg':>6s} {'%':>7s} {'%':>6s} {'%':>6s} "
                      f"{'MAE mm':>7s} {'s':>7s}"]
            for name, s in methods.items():
                def num(key: str, width: int, digits: int = 2, s: dict = s) -> str:
                    v = s.get(key)
                    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"
                lines.append(f"{name:22s} {num('mean', 6)} {num('median', 6)} "
                             f"{num('below_11.25', 7, 1)} {num('below_30', 6, 1)} "
                             f"{num('coverage', 6, 1)} {num('depth_mae_mm', 7)} "
                             f"{num('seconds', 7, 1)}")
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append("")
        lines.append("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        lines.append("files:   " + ", ".join(str(p.relative_to(self.out))
                                             for p in self.files.values()))
        if "report" in self.files:
            lines.append(f"open {self.files['report']} in a browser")
        return "\n".join(lines)


def _networks_or_note(weights: str | None, model: MorphableModel
                      ) -> tuple[InferenceNetworks | None, str | None]:
    """Load the inference networks, or return why not (the demo goes on without them)."""
    from faceps.learn.infer import InferConfig, default_weights_dir, load_networks

    if weights is None:
        try:
            default_weights_dir()
        except FacepsError as exc:
            # the first clause names the folder and the missing files; the rest of the
            # message is about options of `faceps infer`
            return None, (f"the network reconstructions were skipped: "
                          f"{str(exc).split(';')[0]} (the trained weights go there)")
    try:
        return load_networks(InferConfig(weights=weights), model=model), None
    except FacepsError as exc:
        return None, f"the network reconstructions were skipped: the weights cannot be " \
                     f"used: {exc}"


def run_demo(out: str | os.PathLike = "demo-out", *, seed: int = 0,
             size: tuple[int, int] = (800, 600), progress: bool = False,
             weights: str | os.PathLike | None = None,
             reconstruct_config: ReconstructConfig | None = None) -> DemoResult:
    """Run the demo and write its outputs under ``out`` (replacing an earlier demo run).

    Args:
        out: output folder.
        seed: seed of the synthetic face.
        size: capture resolution (W, H).
        progress: show a progress bar.
        weights: network weights folder for the learned reconstructions (default: the
            shipped weights, ``faceps/learn/weights/``; without them those are skipped).
        reconstruct_config: options of the optimisation (default: those of
            ``faceps reconstruct``, at the capture resolution).

    Returns:
        :class:`DemoResult`.
    """
    from faceps.capture import inspect_session, load_session
    from faceps.core.raycast import RayCaster
    from faceps.model import load_model
    from faceps.model.preview import preview_grid
    from faceps.optimize import angular_error_deg, nearlight_least_squares, normal_stats
    from faceps.optimize.proxy import fit_landmarks
    from faceps.optimize.reconstruct import ReconstructConfig, reconstruct, write_reconstruction
    from faceps.report import (
        load_ground_truth,
        load_reconstruction,
        render_proxy,
        score,
        write_comparison,
        write_report,
    )
    from faceps.synth.session import SessionSynthConfig, synth_session

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = DemoResult(out)
    steps = ["model", "synthesize", "ingest", "photometric stereo", "pictures", "reconstruct",
             "networks", "infer 1 image", "infer 3 images", "report"]
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

    # 3. the optimisation pipeline (faceps reconstruct)
    t = step("reconstruct")
    methods: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    rec_dir = out / "reconstruction"
    rec = reconstruct(cap, model, reconstruct_config or ReconstructConfig())
    write_reconstruction(rec_dir, rec, model)
    methods[OPTIMISATION] = rec_dir
    seconds[OPTIMISATION] = float(rec.report["timings"]["total"])
    res.files["reconstruction"] = rec_dir / "report.json"
    res.timings["reconstruct"] = time.perf_counter() - t
    bar.update()

    # 4. the learned pipeline (faceps infer) from the front image and from all three
    t = step("networks")
    for name in ("infer-1", "infer-3"):           # no stale results of an earlier run
        shutil.rmtree(out / name, ignore_errors=True)
    networks, note = _networks_or_note(None if weights is None else str(weights), model)
    load_seconds = time.perf_counter() - t
    if note is not None:
        res.notes.append(note)
    res.timings["load_networks"] = load_seconds
    bar.update()
    one = ("front",) if "front" in cap.light_names else (cap.light_names[0],)
    for name, folder, images in ((NETWORK_1, "infer-1", one),
                                 (NETWORK_3, "infer-3", tuple(cap.light_names[:3]))):
        t = step(f"infer {len(images)} image{'s' if len(images) > 1 else ''}")
        if networks is not None:
            from faceps.learn.infer import InferConfig, infer, write_inference

            try:
                inf = infer(cap, InferConfig(images=images), networks=networks)
            except FacepsError as exc:
                res.notes.append(f"{name} failed: {exc}")
            else:
                write_inference(out / folder, inf, cap)
                methods[name] = out / folder
                seconds[name] = float(inf.timings["total"])
                res.files[folder] = out / folder / "report.json"
            res.timings[folder.replace("-", "_")] = time.perf_counter() - t
        bar.update()

    # 5. scores and the pages
    t = step("report")
    truth = load_ground_truth(gt)
    scored: dict[str, dict] = {}
    prx = render_proxy(rec.fit.proxy.to_dict(), cap.camera, model)
    if prx is not None:
        scored[PROXY] = {**score(prx.normals, prx.depth, truth).stats,
                         "seconds": sum(float(rec.report["timings"].get(k, 0.0))
                                        for k in ("downscale", "fit", "proxy_maps"))}
    for name, folder in methods.items():
        r = load_reconstruction(folder)
        scored[name] = {**score(r.normals, r.depth, truth).stats, "seconds": seconds[name]}
    res.metrics["methods"] = scored
    if networks is not None:
        res.metrics["networks"] = {"load_seconds": load_seconds,
                                   **networks.describe()}
    for folder in methods.values():
        res.files[f"{folder.name}_report"] = write_report(folder, ground_truth=gt,
                                                          session=session_dir, model=model)
    comments = ["Times: each method's own report.json (the optimisation includes fitting "
                "its proxy)."]
    if networks is not None:
        comments.append(f"Loading the networks took {load_seconds:.1f} s, once for both "
                        f"network runs (not in their times).")
    res.files["report"] = write_comparison(
        out / "report.html", methods, ground_truth=gt, session=session_dir,
        proxy_of=OPTIMISATION, model=model, notes=res.notes, comments=comments,
        title=f"faceps demo: one synthetic face ({size[0]} x {size[1]}, seed {seed})")
    res.timings["report"] = time.perf_counter() - t
    bar.update()
    bar.close()

    res.timings = {k: round(v, 3) for k, v in res.timings.items()}
    res.timings["synthesize_detail"] = round(sum(synth.timings.get(k, 0.0) for k in
                                                 ("detail", "raycast", "shading", "sensor")), 3)
    res.files["summary"] = save_json(out / "summary.json",
                                     {"metrics": res.metrics, "timings": res.timings,
                                      "notes": res.notes, "seed": seed, "size": list(size)})
    return res
