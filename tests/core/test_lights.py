import numpy as np
import pytest

from faceps.core import (
    Camera,
    DirectionalLights,
    PointLights,
    ShapeError,
    point_irradiance,
    point_irradiance_torch,
    shade_directional,
    shade_point,
    shade_point_torch,
)
from tests.tolerances import assert_close


def sphere_maps(cam: Camera, centre, radius):
    """Analytic ray-sphere intersection per pixel: points, normals, mask."""
    d = cam.unit_rays()
    c = np.asarray(centre, float)
    b = d @ c
    disc = b**2 - (c @ c - radius**2)
    mask = disc > 0
    t = np.where(mask, b - np.sqrt(np.maximum(disc, 0)), np.nan)
    P = d * t[..., None]
    N = (P - c) / radius
    return P, N, mask


def eq1_by_hand(V, n, rho, P, beta):
    """The paper's eq. 1 written out for one point and one light, as plain Python."""
    lx, ly, lz = P[0] - V[0], P[1] - V[1], P[2] - V[2]
    dist = (lx * lx + ly * ly + lz * lz) ** 0.5
    dot = n[0] * lx + n[1] * ly + n[2] * lz
    return [rho[k] * beta[k] * max(0.0, dot) / dist**3 for k in range(3)]


def test_sphere_under_point_lights_matches_eq1_at_chosen_points():
    cam = Camera(np.array([[300.0, 0, 63.5], [0, 300.0, 47.5], [0, 0, 1]]), (128, 96))
    P, N, mask = sphere_maps(cam, [0, 0, 500], 60)
    lights = PointLights([[-250, -50, 100], [0, -200, 0], [260, 0, 150]],
                         [[9e6, 8e6, 7e6], [5e6, 5e6, 5e6], [1e7, 9e6, 1.1e7]],
                         names=("left", "front", "right"))
    albedo = np.zeros_like(P)
    albedo[mask] = [0.6, 0.45, 0.35]
    imgs = shade_point(np.where(mask[..., None], P, 0), np.where(mask[..., None], N, 0),
                       albedo, lights)
    assert imgs.shape == (3, 96, 128, 3) and imgs.dtype == np.float32
    for (v, u) in [(47, 63), (30, 40), (60, 90), (47, 35), (20, 70)]:
        assert mask[v, u]
        for j in range(3):
            want = eq1_by_hand(P[v, u], N[v, u], albedo[v, u], lights.positions[j],
                               lights.intensities[j])
            assert_close(imgs[j, v, u], want, rtol=1e-5, atol=1e-7,
                         name=f"light {j} pixel {(u, v)}")
    # attached shadows: the left light does not reach the sphere's far right
    far_right = (47, int(np.nonzero(mask[47])[0].max()))
    assert np.all(imgs[0][far_right] == 0)


def test_led_anisotropy_factor():
    V = np.array([[0.0, 0.0, 500.0], [100.0, 0.0, 500.0]])
    n = np.array([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    iso = PointLights([[0, 0, 0]], [1.0])
    led = PointLights([[0, 0, 0]], [1.0], directions=[[0, 0, 1]], anisotropy=[4.0])
    e_iso = point_irradiance(V, n, iso)[0]
    e_led = point_irradiance(V, n, led)[0]
    cos_off_axis = 500 / np.hypot(100, 500)
    assert_close(e_led, e_iso * np.array([1.0, cos_off_axis**4]))


def test_directional_lights():
    n = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    lights = DirectionalLights([[0, 0, -2.0]], [[1.0, 2.0, 3.0]])
    img = shade_directional(n, np.ones((2, 3)) * 0.5, lights)
    assert_close(img[0], [[0.5, 1.0, 1.5], [0, 0, 0]])


def test_lights_schema_round_trip():
    lights = PointLights([[-1, 2, 3], [4, 5, 6]], [2.0, 3.0], directions=[[0, 0, 2], [0, 0, 0]],
                         anisotropy=[1.5, 0.0], names=("left", "right"))
    d = lights.to_dict()
    assert d["left"]["intensity"] == [2.0, 2.0, 2.0] and "direction" not in d["right"]
    again = PointLights.from_dict(d, order=["right", "left"])
    assert again.names == ("right", "left")
    assert_close(again.positions, lights.positions[::-1])
    rows = lights.to_array()
    assert rows.shape == (2, 11) and rows.dtype == np.float32
    back = PointLights.from_array(np.vstack([rows, np.zeros((1, 11))]))
    assert len(back) == 2
    assert_close(back.directions, lights.directions, atol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"positions": [[0, 0, 0]], "intensities": [-1.0]},
    {"positions": [[0, 0, np.nan]], "intensities": [1.0]},
    {"positions": [[0, 0, 0]], "intensities": [1.0], "anisotropy": [2.0]},
    {"positions": [[0, 0, 0]], "intensities": [[1.0, 2.0]]},
])
def test_bad_lights_are_rejected(kwargs):
    with pytest.raises(ShapeError):
        PointLights(**kwargs)


def test_numpy_and_torch_imaging_model_agree():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    V = rng.uniform([-80, -80, 450], [80, 80, 550], size=(40, 30, 3))
    n = rng.normal(size=V.shape)
    n[..., 2] = -np.abs(n[..., 2]) - 0.5
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    A = rng.uniform(0.1, 0.9, size=V.shape)
    lights = PointLights(rng.uniform([-300, -300, 0], [300, 300, 200], size=(4, 3)),
                         rng.uniform(1e6, 1e7, size=(4, 3)),
                         directions=np.tile([0, 0, 1.0], (4, 1)), anisotropy=[0, 1, 2.5, 0])
    ref = shade_point(V, n, A, lights)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    out = shade_point_torch(t(V), t(n), t(A), t(lights.positions), t(lights.intensities),
                            t(lights.directions), t(lights.anisotropy))
    assert_close(out, ref, rtol=2e-4, atol=1e-6, name="shading")
    e = point_irradiance_torch(t(V), t(n), t(lights.positions))
    assert e.shape == (4, 40, 30)
