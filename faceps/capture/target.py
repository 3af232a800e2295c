"""Target-based light calibration from a description file (``faceps calibrate``).

A lab photographs a matte sphere or plane of known geometry in one or more poses, each
pose a capture session (contract 1: same camera, one image per light). A JSON file
describes the target::

    {"target": "sphere",
     "poses": [{"session": "pose1", "centre": [0, 0, 500], "radius": 40.0},
               {"session": "pose2", "centre": [30, -10, 520], "radius": 40.0}],
     "albedo": 0.8}

or ``"target": "plane"`` with ``"point"`` and ``"normal"`` per pose (mm, camera frame).
``albedo`` (one number or RGB) is optional: without it the intensities are relative.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from faceps.capture.calibrate import (
    CalibrationResult,
    PlaneTarget,
    SphereTarget,
    calibrate_from_target,
)
from faceps.capture.session import load_session
from faceps.core.errors import SessionError

__all__ = ["calibrate_target_file"]


def _positive(x: object) -> bool:
    """True for a finite number > 0 (not a bool)."""
    return (isinstance(x, int | float) and not isinstance(x, bool) and bool(np.isfinite(x))
            and x > 0)


def _vec(entry: Mapping, key: str, n: int, path: Path, where: str) -> np.ndarray:
    v = entry.get(key)
    if (not isinstance(v, list) or len(v) != n
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)):
        raise SessionError(f"expected a list of {n} numbers; got {v!r}", path=path,
                           field=f"{where}.{key}")
    arr = np.asarray(v, np.float64)
    if not np.all(np.isfinite(arr)):
        raise SessionError("values must be finite", path=path, field=f"{where}.{key}")
    return arr


def calibrate_target_file(path: str | os.PathLike, *, fit_led: bool | None = None
                          ) -> CalibrationResult:
    """Calibrate the lights from a target description (see the module docstring).

    Raises:
        SessionError: naming the file and the field for a malformed description or
            pose sessions that disagree (camera, light names).
    """
    p = Path(path)
    try:
        desc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise SessionError(f"not a readable JSON file ({exc})", path=p) from None
    if not isinstance(desc, dict):
        raise SessionError("expected a JSON object", path=p)
    kind = desc.get("target")
    if kind not in ("sphere", "plane"):
        raise SessionError(f"expected 'sphere' or 'plane'; got {kind!r}", path=p, field="target")
    poses = desc.get("poses")
    if not isinstance(poses, list) or not poses:
        raise SessionError("expected a non-empty list", path=p, field="poses")
    albedo = desc.get("albedo")
    if albedo is not None and not (_positive(albedo) or (
            isinstance(albedo, list) and len(albedo) == 3 and all(map(_positive, albedo)))):
        raise SessionError(f"expected a positive number or 3 positive numbers; got {albedo!r}",
                           path=p, field="albedo")
    images, saturated, targets, camera, names = [], [], [], None, None
    for k, entry in enumerate(poses):
        where = f"poses[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("session"), str):
            raise SessionError("expected an object with a 'session' folder", path=p,
                               field=where)
        cap = load_session(p.parent / entry["session"])
        if camera is None:
            camera, names = cap.camera, cap.light_names
        elif (cap.camera.image_size != camera.image_size
              or not np.allclose(cap.camera.K, camera.K) or cap.light_names != names):
            raise SessionError("camera or light names differ from the first pose", path=p,
                               field=f"{where}.session")
        images.append(cap.images)
        saturated.append(cap.saturated)
        if kind == "sphere":
            r = entry.get("radius")
            if not _positive(r):
                raise SessionError(f"expected a positive number; got {r!r}", path=p,
                                   field=f"{where}.radius")
            targets.append(SphereTarget(_vec(entry, "centre", 3, p, where), float(r), albedo))
        else:
            targets.append(PlaneTarget(_vec(entry, "point", 3, p, where),
                                       _vec(entry, "normal", 3, p, where), albedo))
    return calibrate_from_target(images, targets, camera, fit_led=fit_led,
                                 saturated=saturated, names=names)
