"""Capture sessions (contract 1): ingest, writing and inspection.

:func:`load_session` turns a session folder into a :class:`Capture` (linear, ambient-free,
undistorted images and their metadata); :func:`write_session` writes one;
:func:`inspect_session` summarises a capture and writes a contact sheet;
:func:`calibrate_from_proxy` and :func:`calibrate_from_target` calibrate near point lights.
"""

from faceps.capture.calibrate import (
    CalibrationConfig,
    CalibrationResult,
    PlaneTarget,
    SphereTarget,
    calibrate_from_proxy,
    calibrate_from_target,
)
from faceps.capture.inspect import inspect_session
from faceps.capture.landmarks import LandmarkResult, get_landmarks
from faceps.capture.session import (
    SESSION_FORMAT,
    Capture,
    load_session,
    read_landmarks,
    write_landmarks_pts,
    write_session,
)

__all__ = [
    "Capture",
    "load_session",
    "write_session",
    "read_landmarks",
    "write_landmarks_pts",
    "inspect_session",
    "SESSION_FORMAT",
    "CalibrationConfig",
    "CalibrationResult",
    "SphereTarget",
    "PlaneTarget",
    "calibrate_from_proxy",
    "calibrate_from_target",
    "get_landmarks",
    "LandmarkResult",
]
