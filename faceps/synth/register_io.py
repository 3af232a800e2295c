"""Register a scan and write what the dataset builder and people need.

Outputs of :func:`register_and_export` in one folder:

* ``scan_face.npz`` — the scan in the model frame with its correspondence and fitted
  coefficients (:class:`faceps.synth.scanface.ScanFace`), the input of
  ``faceps synth dataset --scan``;
* ``registered.ply`` — the registered template (model topology) in the scan frame (mm);
* ``fitted.ply`` — the model with the fitted coefficients, the coarse proxy (mm);
* ``registration.json`` — distances, coefficients, per-level history, timings, config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from faceps.core.atomic import save_json, save_ply
from faceps.core.errors import ConfigError
from faceps.model.morphable import MorphableModel
from faceps.synth.register import RegistrationConfig, ScanError, load_scan, register_scan
from faceps.synth.scanface import scan_face_from_registration

__all__ = ["register_and_export", "read_scan_landmarks"]


def read_scan_landmarks(path: str | os.PathLike) -> np.ndarray:
    """68 [x, y, z] scan points from a JSON file (null rows allowed: unknown points)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        pts = np.array([[np.nan] * 3 if row is None else row for row in data], dtype=np.float64)
    except (OSError, ValueError, TypeError) as exc:
        raise ScanError(f"{p}: not a JSON list of 68 [x, y, z] points ({exc})") from None
    if pts.shape != (68, 3):
        raise ScanError(f"{p}: expected 68 [x, y, z] points; got shape {pts.shape}")
    return pts


def register_and_export(scan_path: str | os.PathLike, model: MorphableModel,
                        out_dir: str | os.PathLike, *, landmarks: str | None = None,
                        scale: str | float = "auto", region: str = "crop",
                        name: str | None = None, progress: bool = False) -> str:
    """Register ``model``'s template to a scan and write the folder described above.

    Returns:
        a short human-readable summary.
    """
    try:
        scale_value: str | float = scale if scale == "auto" else float(scale)
    except ValueError:
        raise ConfigError(f"--scale must be a number or 'auto'; got '{scale}'") from None
    scan = load_scan(scan_path)
    lm = None if landmarks is None else read_scan_landmarks(landmarks)
    config = RegistrationConfig(scan_scale=scale_value, template_region=region)
    reg = register_scan(scan, model, scan_landmarks=lm, config=config, progress=progress)
    out = Path(out_dir)
    label = name or Path(scan_path).stem
    face = scan_face_from_registration(scan, reg, model, label)
    face.save(out / "scan_face.npz")
    tris = np.asarray(reg.triangles)
    save_ply(out / "registered.ply", _mesh(reg.vertices, tris))
    save_ply(out / "fitted.ply", _mesh(reg.fitted_vertices, tris))
    summary = reg.summary()
    save_json(out / "registration.json", {"scan": str(scan_path), "name": label,
                                          "model": model.name, **summary})
    return (f"registered {label}: mean distance {summary['mean_distance_mm']:.2f} mm, "
            f"median {summary['median_distance_mm']:.2f} mm, coefficient fit "
            f"{summary['coefficient_residual_mm']:.2f} mm RMS, "
            f"{'converged' if summary['converged'] else 'NOT converged'} in "
            f"{summary['timings'].get('total', float('nan')):.1f} s -> {out}")


def _mesh(vertices: np.ndarray, triangles: np.ndarray):
    import trimesh

    return trimesh.Trimesh(np.asarray(vertices, np.float64), triangles, process=False)
