import numpy as np
import pytest

from faceps.core import Camera, ShapeError, project_torch
from tests.tolerances import assert_close


def make_camera():
    K = np.array([[1200.0, 0.0, 799.5], [0.0, 1180.0, 601.0], [0.0, 0.0, 1.0]])
    return Camera(K, (1600, 1200))


def test_project_backproject_round_trip():
    cam = make_camera()
    rng = np.random.default_rng(0)
    depth = rng.uniform(400, 700, size=(cam.height, cam.width))
    pts = cam.backproject(depth)
    assert pts.shape == (1200, 1600, 3)
    assert_close(pts[..., 2], depth, name="z")
    uv = cam.project(pts)
    assert_close(uv, cam.pixel_grid(), atol=1e-8, name="uv")


def test_project_known_point():
    cam = make_camera()
    uv = cam.project(np.array([10.0, -20.0, 500.0]))
    assert_close(uv, [1200 * 10 / 500 + 799.5, 1180 * -20 / 500 + 601.0])
    assert np.all(np.isnan(cam.project(np.array([1.0, 1.0, -5.0]))))


def test_rays_have_unit_z_and_unit_rays_are_normalised():
    cam = make_camera()
    r = cam.rays()
    assert_close(r[..., 2], np.ones(r.shape[:2]))
    assert_close(np.linalg.norm(cam.unit_rays(), axis=-1), np.ones(r.shape[:2]))
    # the principal point looks straight ahead
    assert_close(cam.rays(np.array([799.5, 601.0])), [0.0, 0.0, 1.0], atol=1e-12)


def test_scaled_camera_maps_pixel_edges_consistently():
    cam = make_camera()
    half = cam.scaled((800, 600))
    X = np.array([35.0, 12.0, 530.0])
    u_full, v_full = cam.project(X)
    u_half, v_half = half.project(X)
    # pixel-centre convention: continuous coordinate c maps to (c + 0.5) * s - 0.5
    assert_close([u_half, v_half], [(u_full + 0.5) * 0.5 - 0.5, (v_full + 0.5) * 0.5 - 0.5])
    assert half.image_size == (800, 600)


def test_cropped_shifts_principal_point():
    cam = make_camera()
    c = cam.cropped(100, 50, 256, 256)
    X = np.array([5.0, 3.0, 450.0])
    assert_close(c.project(X), cam.project(X) - np.array([100, 50]))


def test_undistort_image_moves_pixels_like_opencv():
    import cv2

    K = np.array([[500.0, 0, 159.5], [0, 500.0, 119.5], [0, 0, 1]])
    cam = Camera(K, (320, 240), np.array([-0.3, 0.1, 0.0, 0.0, 0.0]))
    img = np.zeros((240, 320), np.float32)
    # a bright dot at a distorted location
    pd = np.array([[[300.0, 220.0]]])
    img[220, 300] = 1.0
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    und = cam.undistort_image(img)
    expected = cv2.undistortPoints(pd, K, cam.distortion, P=K)[0, 0]
    peak = np.unravel_index(np.argmax(und), und.shape)
    assert abs(peak[1] - expected[0]) <= 1.5 and abs(peak[0] - expected[1]) <= 1.5
    assert not cam.undistorted().has_distortion


@pytest.mark.parametrize(
    "K",
    [np.eye(2), np.array([[0, 0, 1], [0, 1, 1], [0, 0, 1.0]]),
     np.array([[1, 0, 1], [0, 1, 1], [0, 1, 1.0]]), np.full((3, 3), np.nan)],
)
def test_bad_K_is_rejected(K):
    with pytest.raises(ShapeError):
        Camera(K, (10, 10))


def test_torch_projection_agrees_with_numpy():
    torch = pytest.importorskip("torch")
    cam = make_camera()
    pts = np.random.default_rng(1).uniform([-80, -80, 400], [80, 80, 700], size=(2, 50, 3))
    uv_t = project_torch(torch.tensor(pts, dtype=torch.float32),
                         torch.tensor(cam.K, dtype=torch.float32))
    assert_close(uv_t, cam.project(pts), rtol=1e-5, atol=2e-3, name="uv")
