import numpy as np
import pytest

from faceps.core import (
    MODEL_TO_CAMERA,
    euler_to_matrix,
    euler_to_matrix_torch,
    matrix_to_euler,
    pose_rotation,
    pose_rotation_torch,
    pose_to_euler,
)
from tests.tolerances import assert_close


def test_round_trip_random_angles():
    rng = np.random.default_rng(0)
    ang = rng.uniform([-1.5, -1.5, -3.0], [1.5, 1.5, 3.0], size=(500, 3))
    R = euler_to_matrix(ang)
    assert_close(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    assert_close(np.linalg.det(R), np.ones(500))
    assert_close(matrix_to_euler(R), ang, atol=1e-9)
    assert_close(pose_to_euler(pose_rotation(ang)), ang, atol=1e-9)


def test_frontal_pose_is_the_axis_flip():
    assert_close(pose_rotation(np.zeros(3)), np.diag([1.0, -1.0, -1.0]))
    assert_close(MODEL_TO_CAMERA, np.diag([1.0, -1.0, -1.0]))


def test_documented_example_rotations():
    # yaw +90 deg turns the face direction (model +z) to model +x, i.e. camera +x
    R = pose_rotation(np.array([0.0, np.pi / 2, 0.0]))
    assert_close(R @ [0, 0, 1.0], [1.0, 0, 0], atol=1e-12)
    # positive pitch: the face looks down (model +z goes toward model -y; camera +y is down)
    Rp = euler_to_matrix(np.array([0.3, 0.0, 0.0]))
    assert_close(Rp @ [0, 0, 1.0], [0, -np.sin(0.3), np.cos(0.3)], atol=1e-12)
    # roll rotates +x toward +y
    Rr = euler_to_matrix(np.array([0.0, 0.0, 0.2]))
    assert_close(Rr @ [1.0, 0, 0], [np.cos(0.2), np.sin(0.2), 0], atol=1e-12)
    # order: pitch first, then yaw, then roll
    a = np.array([0.1, 0.2, 0.3])
    Rx = euler_to_matrix(np.array([0.1, 0, 0]))
    Ry = euler_to_matrix(np.array([0, 0.2, 0]))
    Rz = euler_to_matrix(np.array([0, 0, 0.3]))
    assert_close(euler_to_matrix(a), Rz @ Ry @ Rx, atol=1e-12)


def test_torch_agrees_with_numpy_and_has_gradients():
    torch = pytest.importorskip("torch")
    ang = np.random.default_rng(2).uniform(-1, 1, size=(7, 3))
    t = torch.tensor(ang, dtype=torch.float64, requires_grad=True)
    assert_close(euler_to_matrix_torch(t), euler_to_matrix(ang))
    Rt = pose_rotation_torch(t)
    assert_close(Rt, pose_rotation(ang))
    Rt.sum().backward()
    # gradient against central differences
    eps = 1e-6
    num = np.zeros_like(ang)
    for i in range(7):
        for j in range(3):
            d = np.zeros_like(ang)
            d[i, j] = eps
            num[i, j] = (pose_rotation(ang + d).sum() - pose_rotation(ang - d).sum()) / (2 * eps)
    assert_close(t.grad, num, atol=1e-6, name="grad")
