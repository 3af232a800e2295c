"""Benchmark: the built-in mean face's profile against real faces.

The built-in model (``faceps-builtin``) is procedural: its mean face was drawn from
anthropometric profiles, not measured. This registers real faces to it with
``faceps synth register`` (non-rigid ICP of the built-in mean; ``--region`` as the
command's, default the face crop) and prints, for each face:

- the profile depths of the mean and of the registered face, in the built-in model's frame
  (the registration's similarity removed, so sizes are the built-in's): how far the nose
  tip, the subnasale, the mouth corners and the chin stand in front of the outer eye
  corners (mm, along the face's forward axis);
- the registration's scale to the built-in's size and the RMS of its coefficient fit.

The fitted coefficients themselves are not printed: the named components and the random
fields overlap, and the split between them moves with the registered region (a scan's
``face_depth`` came out +0.8 with the whole template and -2.4 with the face crop), while
the profile depths move by a few mm.

Inputs: scans (OBJ/PLY, e.g. ``../shared/data/scans/lee-perry-smith-head.obj``, units
detected) and the mean faces of other morphable models (contract-5 ``.npz``, e.g. from
``faceps model import sfm ../shared/data/sfm --out sfm.npz``; the mean of a model built from
scans is an average real face).

Run: ``.venv/bin/python bench/bench_face_proportions.py --scans SCAN.obj --models sfm.npz``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from faceps.model import load_model
from faceps.synth.register import RegistrationConfig, Scan, load_scan, register_scan

#: iBUG-68 indices of the points measured: outer eye corners, nose tip, subnasale, mouth
#: corners, chin
EYES_OUTER = (36, 45)
POINTS = {"nose tip": (30,), "subnasale": (33,), "mouth corners": (48, 54), "chin": (8,)}


def profile_depths(vertices: np.ndarray, landmarks68: np.ndarray) -> dict[str, float]:
    """How far each point of :data:`POINTS` stands in front of the outer eye corners
    (mm along +z of the model frame) on ``vertices`` (model topology, model frame)."""
    def z(ids):
        return float(np.mean([vertices[landmarks68[i], 2] for i in ids]))

    eye = z(EYES_OUTER)
    return {name: z(ids) - eye for name, ids in POINTS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="*", default=[], help="scan meshes (OBJ or PLY)")
    ap.add_argument("--models", nargs="*", default=[],
                    help="other morphable models (.npz) whose mean faces to register")
    ap.add_argument("--region", default="crop", choices=("all", "face", "crop"),
                    help="template part to register (as `faceps synth register --region`)")
    args = ap.parse_args()
    if not args.scans and not args.models:
        ap.error("give at least one of --scans and --models")
    builtin = load_model("builtin")
    lm = np.asarray(builtin.landmarks68)
    rows = [("built-in mean", profile_depths(builtin.mean.astype(float), lm), None, None)]
    # scans in their own units (detected); a model's mean face is a scan in mm
    inputs = [(Path(s).stem, load_scan(s), "auto") for s in args.scans]
    for m in args.models:
        model = load_model(m)
        inputs.append((f"{Path(m).stem} mean", Scan(model.mean, model.triangles, path=m), 1.0))
    for name, scan, scale in inputs:
        reg = register_scan(scan, builtin, config=RegistrationConfig(
            scan_scale=scale, template_region=args.region))
        # the registered template back in the model frame: shape at the built-in's size
        full = np.full((builtin.n_vertices, 3), np.nan)
        full[reg.vertex_ids] = reg.similarity.inverse().apply(reg.vertices)
        rows.append((name, profile_depths(full, lm), reg.similarity.scale,
                     reg.coefficient_residual))
        print(f"{name}: registered in {reg.timings['total']:.1f} s, coefficient fit "
              f"{reg.coefficient_residual:.2f} mm RMS, scale {reg.similarity.scale:.3f}",
              flush=True)

    print("\n### Profile depths: in front of the outer eye corners (mm, built-in model "
          "frame and size)\n")
    print("| face | " + " | ".join(POINTS) + " | scale to the built-in | coefficient fit (mm) |")
    print("|---|" + "---|" * (len(POINTS) + 2))
    for name, d, scale, res in rows:
        extra = "- | - |" if scale is None else f"{1 / scale:.3f} | {res:.2f} |"
        print(f"| {name} | " + " | ".join(f"{d[k]:.1f}" for k in POINTS) + f" | {extra}")


if __name__ == "__main__":
    main()
