import numpy as np
import pytest

from faceps.core import Camera, FitError, PointLights, shade_point
from faceps.optimize import (
    angular_error_deg,
    distant_light_least_squares,
    nearlight_least_squares,
    normal_stats,
)
from tests.core.test_lights import sphere_maps


@pytest.fixture
def sphere():
    cam = Camera(np.array([[300.0, 0, 47.5], [0, 300.0, 35.5], [0, 0, 1]]), (96, 72))
    P, N, mask = sphere_maps(cam, [0, 0, 450], 60)
    lights = PointLights([[-250, -60, 150], [0, -220, 100], [240, 20, 160], [10, 200, 120]],
                         [[9e6, 8e6, 7e6], [6e6, 6e6, 6e6], [1e7, 9e6, 1.1e7], [5e6, 5e6, 6e6]],
                         directions=np.tile([0, 0, 1.0], (4, 1)), anisotropy=[0, 1.5, 0, 0])
    albedo = np.zeros_like(P)
    albedo[mask] = [0.6, 0.45, 0.35]
    P0 = np.where(mask[..., None], P, 0)
    N0 = np.where(mask[..., None], N, 0)
    imgs = shade_point(P0, N0, albedo, lights)
    return P, N, mask, lights, albedo, imgs


def test_exact_on_a_lambertian_sphere(sphere):
    P, N, mask, lights, albedo, imgs = sphere
    res = nearlight_least_squares(imgs, np.where(mask[..., None], P, np.nan), lights, mask,
                                  dark=1e-9)
    ok = res.valid
    assert ok.sum() > 0.5 * mask.sum()
    err = angular_error_deg(res.normals[ok], N[ok])
    assert err.max() < 0.05  # float32 output: arccos resolution near 0 is ~0.02 deg
    assert np.allclose(res.albedo[ok], albedo[ok], rtol=1e-4)
    # fewer than three lit lights: not solved
    lit = (imgs.mean(-1) > 1e-9).sum(0)
    assert not np.any(res.valid & (lit < 3))
    assert res.normals.dtype == np.float32 and np.all(np.isnan(res.normals[~ok]))


def test_saturated_pixels_are_not_used(sphere):
    P, N, mask, lights, albedo, imgs = sphere
    broken = imgs.copy()
    broken[0] *= 3.0  # a wrong light 0 everywhere ...
    sat = np.zeros(imgs.shape[:3], bool)
    sat[0] = True  # ... but flagged as saturated, so ignored
    res = nearlight_least_squares(broken, np.where(mask[..., None], P, np.nan), lights, mask,
                                  saturated=sat, dark=1e-9)
    ok = res.valid
    assert ok.any()
    assert angular_error_deg(res.normals[ok], N[ok]).max() < 0.05


def test_distant_light_baseline(sphere):
    P, N, mask, lights, albedo, imgs = sphere
    centre = np.array([0.0, 0.0, 390.0])
    # exact for distant lights: images rendered with every pixel lit as from the centre
    flat = shade_point(np.broadcast_to(centre, P.shape).copy(), np.where(mask[..., None], N, 0),
                       albedo, lights)
    res = distant_light_least_squares(flat, centre, lights, mask, dark=1e-9)
    ok = res.valid
    assert ok.sum() > 0.5 * mask.sum()
    assert angular_error_deg(res.normals[ok], N[ok]).max() < 0.05
    # on near-light images it is biased where the near-light solution is exact
    near = distant_light_least_squares(imgs, centre, lights, mask, dark=1e-9)
    ok = near.valid
    assert angular_error_deg(near.normals[ok], N[ok]).mean() > 2.0
    with pytest.raises(FitError, match="centre"):
        distant_light_least_squares(imgs, [np.nan, 0, 0], lights, mask)


def test_errors_and_stats():
    with pytest.raises(FitError):
        nearlight_least_squares(np.zeros((2, 4, 4, 3)), np.zeros((4, 4, 3)),
                                PointLights([[0, 0, 0]], [1.0]), np.ones((4, 4), bool))
    s = normal_stats(np.array([1.0, 5.0, 15.0, 40.0, np.nan]))
    assert s["count"] == 4 and s["mean"] == pytest.approx(15.25) and s["below_11.25"] == 50.0
