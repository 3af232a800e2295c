"""Rotations from and to Euler angles (pitch, yaw, roll), numpy and torch.

Convention (see ``docs/conventions.md``):

* The angles describe the head's rotation in the *model* frame (x toward the subject's
  left, y up, z out of the face): pitch about x (positive rotates +y toward +z: the face
  looks down), yaw about y (positive rotates +z toward +x: the face turns to the subject's
  left), roll about z (positive rotates +x toward +y).
* The head rotation is ``R_head = Rz(roll) @ Ry(yaw) @ Rx(pitch)``: pitch is applied
  first, then yaw, then roll, all about the fixed model axes.
* The *pose* rotation maps model to camera coordinates, ``X_cam = R @ X + t`` with
  ``R = MODEL_TO_CAMERA @ R_head`` and ``MODEL_TO_CAMERA = diag(1, -1, -1)``, so angles
  (0, 0, 0) are a frontal face looking into the camera.

Example: yaw = +90 degrees turns the model's +z (out of the face) into model +x, and
the pose rotation maps it to camera +x: the face looks toward the image's right.
"""

from __future__ import annotations

import numpy as np

from faceps.core.errors import check_shape

__all__ = [
    "MODEL_TO_CAMERA",
    "euler_to_matrix",
    "matrix_to_euler",
    "pose_rotation",
    "pose_to_euler",
    "euler_to_matrix_torch",
    "pose_rotation_torch",
]

MODEL_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


def euler_to_matrix(angles: np.ndarray) -> np.ndarray:
    """Head rotation ``Rz(roll) @ Ry(yaw) @ Rx(pitch)``.

    Args:
        angles: (..., 3) pitch, yaw, roll in radians.

    Returns:
        (..., 3, 3) float64 rotation matrices.
    """
    a = np.asarray(angles, dtype=np.float64)
    check_shape(a, "angles", (3,), leading=True)
    p, y, r = a[..., 0], a[..., 1], a[..., 2]
    cp, sp, cy, sy, cr, sr = np.cos(p), np.sin(p), np.cos(y), np.sin(y), np.cos(r), np.sin(r)
    R = np.empty(a.shape[:-1] + (3, 3))
    R[..., 0, 0] = cr * cy
    R[..., 0, 1] = cr * sy * sp - sr * cp
    R[..., 0, 2] = cr * sy * cp + sr * sp
    R[..., 1, 0] = sr * cy
    R[..., 1, 1] = sr * sy * sp + cr * cp
    R[..., 1, 2] = sr * sy * cp - cr * sp
    R[..., 2, 0] = -sy
    R[..., 2, 1] = cy * sp
    R[..., 2, 2] = cy * cp
    return R


def matrix_to_euler(R: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`; yaw is returned in [-pi/2, pi/2].

    Args:
        R: (..., 3, 3) rotation matrices.

    Returns:
        (..., 3) pitch, yaw, roll in radians (float64).
    """
    R = np.asarray(R, dtype=np.float64)
    check_shape(R, "R", (3, 3), leading=True)
    yaw = np.arctan2(-R[..., 2, 0], np.hypot(R[..., 0, 0], R[..., 1, 0]))
    pitch = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    roll = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    return np.stack([pitch, yaw, roll], axis=-1)


def pose_rotation(angles: np.ndarray) -> np.ndarray:
    """Model-to-camera rotation ``diag(1, -1, -1) @ euler_to_matrix(angles)``."""
    return MODEL_TO_CAMERA @ euler_to_matrix(angles)


def pose_to_euler(R: np.ndarray) -> np.ndarray:
    """Angles (pitch, yaw, roll) of a model-to-camera rotation; inverts :func:`pose_rotation`."""
    return matrix_to_euler(MODEL_TO_CAMERA @ np.asarray(R, dtype=np.float64))


def euler_to_matrix_torch(angles):
    """Torch version of :func:`euler_to_matrix` (differentiable, any dtype/device).

    Args:
        angles: (..., 3) tensor of pitch, yaw, roll in radians.

    Returns:
        (..., 3, 3) tensor.
    """
    import torch

    check_shape(angles, "angles", (3,), leading=True)
    p, y, r = angles.unbind(-1)
    cp, sp, cy, sy, cr, sr = p.cos(), p.sin(), y.cos(), y.sin(), r.cos(), r.sin()
    rows = [
        cr * cy, cr * sy * sp - sr * cp, cr * sy * cp + sr * sp,
        sr * cy, sr * sy * sp + cr * cp, sr * sy * cp - cr * sp,
        -sy, cy * sp, cy * cp,
    ]
    return torch.stack(rows, dim=-1).reshape(angles.shape[:-1] + (3, 3))


def pose_rotation_torch(angles):
    """Torch version of :func:`pose_rotation`."""
    import torch

    flip = torch.tensor([1.0, -1.0, -1.0], dtype=angles.dtype, device=angles.device)
    return flip[:, None] * euler_to_matrix_torch(angles)
