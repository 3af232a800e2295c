"""Ray casting against analytic answers and a slow per-ray reference."""

import numpy as np
import pytest
import trimesh

from faceps.core import Camera, ShapeError, vertex_normals
from faceps.core.raycast import MAP_KEYS, RayCaster, render_maps
from tests.tolerances import assert_close

RADIUS = 50.0
DEPTH = 500.0


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(subdivisions=6, radius=RADIUS)
    V = np.asarray(s.vertices) + [0.0, 0.0, DEPTH]
    return V, np.asarray(s.faces)


@pytest.fixture(scope="module")
def camera():
    return Camera.from_fov((161, 121), 20.0)


def moller_trumbore(o, d, V, F):
    """Slow, obvious reference: the nearest hit of one ray, testing every triangle
    (Moller-Trumbore written out, vectorised only over the triangles)."""
    v0, v1, v2 = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    e1, e2 = v1 - v0, v2 - v0
    p = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / det
        s = o - v0
        u = np.einsum("ij,ij->i", s, p) * inv
        q = np.cross(s, e1)
        v = (q @ d) * inv
        t = np.einsum("ij,ij->i", e2, q) * inv
        ok = (np.abs(det) > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-9)
    if not ok.any():
        return np.inf, -1, 0.0, 0.0
    k = int(np.argmin(np.where(ok, t, np.inf)))
    return t[k], k, u[k], v[k]


def test_sphere_depth_normals_and_area(sphere, camera):
    V, F = sphere
    maps = render_maps(V, F, camera)
    assert set(MAP_KEYS) <= set(maps)
    H, W = camera.height, camera.width
    assert maps["mask"].shape == (H, W) and maps["mask"].dtype == bool
    assert maps["depth"].shape == (H, W) and maps["points"].shape == (H, W, 3)
    assert maps["normals"].shape == (H, W, 3) and maps["barycentric"].shape == (H, W, 3)
    assert maps["triangle"].dtype == np.int64

    # the centre pixel looks straight at the sphere's front pole
    cu, cv = (W - 1) // 2, (H - 1) // 2
    assert abs(maps["depth"][cv, cu] - (DEPTH - RADIUS)) < 0.5

    # rendered normals follow the analytic sphere normals, facing the camera (n_z < 0)
    mask = maps["mask"]
    P, N = maps["points"][mask], maps["normals"][mask]
    analytic = (P - [0.0, 0.0, DEPTH]) / RADIUS
    analytic /= np.linalg.norm(analytic, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", N, analytic), -1.0, 1.0)))
    inner = np.linalg.norm(P[:, :2], axis=1) < 0.9 * RADIUS    # away from the grazing rim
    assert np.percentile(angle[inner], 99) < 1.0
    assert angle[inner].max() < 2.0
    assert np.all(N[:, 2][inner] < 0)
    # hit points lie on the sphere (up to the tessellation's sagitta)
    assert np.abs(np.linalg.norm(P - [0.0, 0.0, DEPTH], axis=1) - RADIUS).max() < 0.1

    # projected disc: a sphere seen from distance D has angular radius asin(r / D)
    f = camera.K[0, 0]
    alpha = np.arcsin(RADIUS / DEPTH)
    disc_area = np.pi * (f * np.tan(alpha)) ** 2
    assert abs(mask.sum() / disc_area - 1.0) < 0.03

    # outside: NaN, -1 and zero weights
    assert np.all(np.isnan(maps["depth"][~mask]))
    assert np.all(maps["triangle"][~mask] == -1)
    assert np.all(np.isnan(maps["normals"][~mask]))
    assert not maps["backface"].any()
    assert_close(maps["barycentric"][mask].sum(axis=1), np.ones(mask.sum()))


def test_plane_at_known_depth():
    z0 = 300.0
    V = np.array([[-500, -500, z0], [500, -500, z0], [500, 500, z0], [-500, 500, z0]], float)
    F = np.array([[0, 2, 1], [0, 3, 2]])     # counter-clockwise seen from the camera
    cam = Camera.from_fov((40, 30), 60.0)
    maps = render_maps(V, F, cam, vertex_attrs={"albedo": np.tile([0.2, 0.4, 0.6], (4, 1)),
                                               "label": np.arange(4.0)})
    assert maps["mask"].all()
    assert_close(maps["depth"], np.full((30, 40), z0), atol=1e-6, name="depth")
    assert_close(maps["points"], cam.backproject(maps["depth"]), atol=1e-9, name="points")
    assert_close(maps["normals"], np.broadcast_to([0.0, 0.0, -1.0], (30, 40, 3)), atol=1e-9)
    assert_close(maps["albedo"], np.broadcast_to([0.2, 0.4, 0.6], (30, 40, 3)), atol=1e-9)
    assert maps["label"].shape == (30, 40)


def test_back_faces_are_flipped_toward_the_camera():
    z0 = 300.0
    V = np.array([[-500, -500, z0], [500, -500, z0], [500, 500, z0], [-500, 500, z0]], float)
    F = np.array([[0, 1, 2], [0, 2, 3]])     # clockwise seen from the camera: its back
    maps = render_maps(V, F, Camera.from_fov((8, 6), 40.0))
    assert maps["backface"].all()
    assert np.all(maps["normals"][..., 2] < 0)


def test_occluded_behind_a_blocker():
    # a blocker square at z = 100 between the origin and points at z = 200
    V = np.array([[-10, -10, 100], [10, -10, 100], [10, 10, 100], [-10, 10, 100]], float)
    F = np.array([[0, 2, 1], [0, 3, 2]])
    rc = RayCaster(V, F)
    origins = np.array([[0, 0, 0], [0, 0, 0], [50, 0, 0], [0, 0, 150.0]])
    targets = np.array([[0, 0, 200], [0, 0, 90], [50, 0, 200], [0, 0, 300.0]])
    blocked = rc.occluded(origins, targets - origins, 1.0)
    assert blocked.tolist() == [True, False, False, False]
    # per-ray bounds with unit directions (t in mm)
    d = targets - origins
    dist = np.linalg.norm(d, axis=1)
    blocked2 = rc.occluded(origins, d / dist[:, None], dist - 1e-3)
    assert blocked2.tolist() == [True, False, False, False]
    # tmin skips the start of a segment
    assert not rc.occluded(origins[:1], d[:1], 1.0, tmin=0.6)[0]
    assert rc.occluded(np.zeros((0, 3)), np.zeros((0, 3)), 1.0).shape == (0,)


def test_cast_agrees_with_slow_moller_trumbore(sphere):
    V, F = sphere
    rng = np.random.default_rng(1)
    # a small random mesh in front of part of the sphere adds occlusion and misses
    Vs = np.concatenate([V, rng.uniform([-40, -40, 420], [40, 40, 440], (12, 3))])
    Fs = np.concatenate([F, len(V) + rng.integers(0, 12, (8, 3))])
    Fs = Fs[np.array([len(set(f)) == 3 for f in Fs])]
    rc = RayCaster(Vs, Fs)
    origins = np.zeros((24, 3))
    dirs = np.concatenate([rng.uniform([-0.12, -0.12, 1], [0.12, 0.12, 1], (20, 3)),
                           [[0.5, 0.0, 1.0], [0, 0, 1.0], [0.099, 0.0, 1.0], [0, 0, -1.0]]])
    hits = rc.cast(origins, dirs)
    for i in range(len(dirs)):
        t, k, u, v = moller_trumbore(origins[i], dirs[i], Vs, Fs)
        if k < 0:
            assert hits.triangle[i] == -1 and np.isinf(hits.t[i])
            continue
        assert hits.triangle[i] == k, f"ray {i}"
        assert_close(hits.t[i], t, rtol=1e-9, atol=1e-9, name=f"t of ray {i}")
        assert_close(hits.barycentric[i], [u, v], atol=1e-9, name=f"uv of ray {i}")
        n = np.cross(Vs[Fs[k, 1]] - Vs[Fs[k, 0]], Vs[Fs[k, 2]] - Vs[Fs[k, 0]])
        assert_close(hits.normal[i], n / np.linalg.norm(n), atol=1e-9)


def test_render_maps_agrees_with_slow_reference_per_pixel(sphere):
    V, F = sphere
    cam = Camera.from_fov((48, 36), 14.0)
    vn = vertex_normals(V, F)
    maps = render_maps(V, F, cam, vertex_normals=vn)
    rays = cam.rays()
    for u, v in [(0, 0), (23, 17), (24, 18), (30, 10), (10, 25), (40, 30), (33, 18)]:
        t, k, bu, bv = moller_trumbore(np.zeros(3), rays[v, u], V, F)
        if k < 0:
            assert not maps["mask"][v, u]
            continue
        w = np.array([1 - bu - bv, bu, bv])
        n = w @ vn[F[k]]
        n /= np.linalg.norm(n)
        assert maps["triangle"][v, u] == k
        assert_close(maps["depth"][v, u], t, rtol=1e-9, atol=1e-9, name=f"depth {(u, v)}")
        assert_close(maps["barycentric"][v, u], w, atol=1e-9)
        assert_close(maps["normals"][v, u], n, atol=1e-9, name=f"normal {(u, v)}")


def test_bad_inputs():
    V = np.zeros((3, 3))
    with pytest.raises(ShapeError):
        RayCaster(V, np.array([[0, 1, 3]]))
    with pytest.raises(ShapeError):
        RayCaster(V, np.zeros((0, 3), int))
    rc = RayCaster(np.eye(3), np.array([[0, 1, 2]]))
    with pytest.raises(ShapeError):
        rc.cast(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ShapeError):
        rc.render(Camera.from_fov((4, 4), 30.0), vertex_attrs={"albedo": np.zeros((2, 3))})
