"""The torch z-buffer rasteriser against the Embree ray caster, a slow per-pixel loop, its
own single-image results (batches), and on empty, outside and invalid inputs."""

import numpy as np
import pytest
import torch
import trimesh

from faceps.core import Camera, ShapeError, vertex_normals
from faceps.core.rasterize import Fragments, interpolate, rasterize, render_normals
from faceps.core.raycast import RayCaster
from faceps.core.rotation import pose_rotation
from tests.tolerances import assert_close

RADIUS = 50.0
DEPTH = 500.0


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    V = np.asarray(s.vertices) + [0.0, 0.0, DEPTH]
    return V, np.asarray(s.faces, np.int64)


@pytest.fixture(scope="module")
def face():
    """The built-in model's mean face, turned a little and placed 550 mm away, with a 128 x 96
    camera that frames it (some of the head leaves the image)."""
    from faceps.model import load_model

    model = load_model("builtin")
    R = pose_rotation(np.radians([8.0, 25.0, -5.0]))
    V = model.mean.astype(np.float64) @ R.T + [10.0, -20.0, 550.0]
    cam = Camera.from_fov((128, 96), 22.0)
    return V, model.triangles.astype(np.int64), cam


def as_t(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def agreement(V, F, cam, dtype=torch.float64):
    """Rasterise and ray-cast the same mesh; return (fragments, ray-cast maps)."""
    Vt, Ft, Kt = as_t(V, F, cam.K)
    frags = rasterize(Vt.to(dtype), Ft, Kt.to(dtype), cam.image_size)
    maps = RayCaster(V, F).render(cam, vertex_normals(V, F))
    return frags, maps


@pytest.mark.parametrize("mesh", ["sphere", "face"])
def test_agrees_with_the_embree_ray_caster(mesh, sphere, face):
    if mesh == "sphere":
        V, F = sphere
        cam = Camera.from_fov((161, 121), 20.0)
    else:
        V, F, cam = face
    frags, maps = agreement(V, F, cam)
    tri = frags.triangle[0].numpy()
    assert tri.shape == (cam.height, cam.width) and tri.dtype == np.int64
    same = tri == maps["triangle"]
    assert same.mean() > 0.995, f"triangle ids agree on {same.mean():.4%} of pixels"
    assert np.array_equal(frags.mask[0].numpy(), tri >= 0)
    m = same & (tri >= 0)
    assert m.sum() > 2000
    assert_close(frags.depth[0].numpy()[m], maps["depth"][m], rtol=1e-9, atol=1e-9,
                 name="depth")
    assert_close(frags.barycentric[0].numpy()[m], maps["barycentric"][m], atol=1e-7,
                 name="barycentric")
    n = interpolate(torch.from_numpy(vertex_normals(V, F)), frags)[0].numpy()
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-300)
    back = frags.backface[0].numpy()
    n[back] *= -1
    assert_close(n[m], maps["normals"][m], atol=1e-7, name="normals")
    assert np.array_equal(back[m], maps["backface"][m])
    # the points are the pixel rays at the depth
    P = interpolate(torch.from_numpy(V), frags)[0].numpy()
    assert_close(P[m], maps["points"][m], atol=1e-7, name="points")
    # background
    assert np.all(frags.depth[0].numpy()[~(tri >= 0)] == 0)
    assert np.all(n[tri < 0] == 0)


@pytest.mark.parametrize("mesh", ["sphere", "face"])
def test_raster_maps_match_the_ray_cast_maps(mesh, sphere, face):
    """raster_maps gives render_maps' dict: same keys, dtypes, masks and values (a few
    pixels on shared edges may take the neighbouring triangle)."""
    from faceps.core.rasterize import raster_maps
    from faceps.core.raycast import render_maps

    if mesh == "sphere":
        V, F = sphere
        cam = Camera.from_fov((161, 121), 20.0)
    else:
        V, F, cam = face
    a = render_maps(V, F, cam)
    b = raster_maps(V, F, cam)
    assert set(b) == set(a)
    for key in a:
        assert b[key].shape == a[key].shape and b[key].dtype == a[key].dtype, key
    assert np.array_equal(a["mask"], b["mask"]) and b["mask"].sum() > 2000
    assert np.array_equal(a["backface"], b["backface"])
    same = a["triangle"] == b["triangle"]
    assert same[a["mask"]].mean() > 0.98 and np.all(b["triangle"][~b["mask"]] == -1)
    m = a["mask"]
    assert_close(b["depth"][m], a["depth"][m], rtol=1e-9, atol=1e-6, name="depth")
    assert_close(b["points"][m], a["points"][m], atol=1e-6, name="points")
    assert_close(b["normals"][m & same], a["normals"][m & same], atol=1e-7, name="normals")
    assert np.all(np.isnan(b["depth"][~m])) and np.all(np.isnan(b["normals"][~m]))
    if mesh == "face":
        assert b["backface"].any() or not a["backface"].any()
    with pytest.raises(ShapeError, match="vertex_normals"):
        raster_maps(V, F, cam, vertex_normals=np.zeros((3, 3)))


def test_float32_agrees_with_float64(face):
    V, F, cam = face
    f64, _ = agreement(V, F, cam)
    f32, _ = agreement(V, F, cam, torch.float32)
    assert f32.weights.dtype == torch.float32 and f32.zbuf.dtype == torch.float32
    same = f32.triangle == f64.triangle
    assert same.float().mean() > 0.999
    m = same & f64.mask
    assert_close(f32.depth[m], f64.depth[m].float(), rtol=1e-5, atol=1e-3, name="depth")


def slow_rasterize(V, F, K, size):
    """The obvious reference: for every pixel centre, every triangle: project, test the
    three edge functions, perspective-correct depth; keep the nearest (then smallest id)."""
    W, H = size
    tri = -np.ones((H, W), np.int64)
    depth = np.zeros((H, W))
    weights = np.zeros((H, W, 3))
    back = np.zeros((H, W), bool)
    uvz = [(K @ (p / p[2]))[:2].tolist() + [p[2]] for p in V]
    for y in range(H):
        for x in range(W):
            best = None
            for f, (a, b, c) in enumerate(F):
                (ua, va, za), (ub, vb, zb), (uc, vc, zc) = uvz[a], uvz[b], uvz[c]
                if min(za, zb, zc) <= 1e-3:
                    continue
                area = (ub - ua) * (vc - va) - (uc - ua) * (vb - va)
                if area == 0:
                    continue
                l0 = ((ub - x) * (vc - y) - (uc - x) * (vb - y)) / area
                l1 = ((uc - x) * (va - y) - (ua - x) * (vc - y)) / area
                l2 = ((ua - x) * (vb - y) - (ub - x) * (va - y)) / area
                if min(l0, l1, l2) < 0:
                    continue
                inv_z = l0 / za + l1 / zb + l2 / zc
                z = 1.0 / inv_z
                if best is None or z < best[0]:
                    w = np.array([l0 / za, l1 / zb, l2 / zc]) / inv_z
                    best = (z, f, w, area > 0)
            if best is not None:
                depth[y, x], tri[y, x], weights[y, x], back[y, x] = best
    return tri, depth, weights, back


def random_triangles(rng, n, spread=40.0):
    """n random triangles in front of the camera, both orientations, overlapping."""
    centres = rng.uniform([-spread, -spread, 150], [spread, spread, 260], (n, 1, 3))
    V = (centres + rng.normal(0, 18, (n, 3, 3))).reshape(-1, 3)
    F = np.arange(3 * n).reshape(n, 3)
    return V, F


def test_matches_a_slow_per_pixel_loop():
    rng = np.random.default_rng(3)
    V, F = random_triangles(rng, 14)
    # a triangle crossing the near plane and one partly outside the image
    V = np.concatenate([V, [[0, 0, -10.0], [20, 0, 100], [0, 20, 100]],
                        [[-300, -10, 200.0], [-100, 40, 200], [-100, -50, 210]]])
    F = np.concatenate([F, [[42, 43, 44], [45, 46, 47]]])
    K = np.array([[60.0, 0.5, 11.2], [0, 58.0, 8.7], [0, 0, 1]])
    size = (23, 17)
    ref_tri, ref_depth, ref_w, ref_back = slow_rasterize(V, F, K, size)
    assert (ref_tri >= 0).mean() > 0.2 and ref_back.any() and (~ref_back & (ref_tri >= 0)).any()
    frags = rasterize(*as_t(V, F, K), size)
    assert np.array_equal(frags.triangle[0].numpy(), ref_tri)
    assert_close(frags.depth[0].numpy(), ref_depth, rtol=1e-12, atol=1e-9, name="depth")
    assert_close(frags.barycentric[0].numpy(), ref_w, atol=1e-9, name="weights")
    assert np.array_equal(frags.backface[0].numpy(), ref_back)
    # small chunks give the same z-buffer
    chunked = rasterize(*as_t(V, F, K), size, max_candidates=5)
    assert torch.equal(chunked.triangle, frags.triangle)
    # culling back faces: those pixels see the nearest front face instead
    culled = rasterize(*as_t(V, F, K), size, cull_backfaces=True)
    keep = np.nonzero([not b for b in _is_back(V, F, K)])[0]
    ref_cull = slow_rasterize(V, F[keep], K, size)[0]
    ref_cull = np.where(ref_cull >= 0, keep[np.maximum(ref_cull, 0)], -1)
    assert np.array_equal(culled.triangle[0].numpy(), ref_cull)
    assert not culled.back.any()


def _is_back(V, F, K):
    uv = (V / V[:, 2:]) @ K.T
    a, b, c = uv[F[:, 0]], uv[F[:, 1]], uv[F[:, 2]]
    return ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
            ) > 0


def test_pixel_centres_are_at_integer_coordinates():
    # a tiny triangle around the pixel centre (5, 3): with f = z = 100, x = u and y = v
    K = np.array([[100.0, 0, 0], [0, 100.0, 0], [0, 0, 1]])
    uv = np.array([[5.0 - 0.3, 3.0 - 0.3], [5.0 + 0.3, 3.0 - 0.2], [5.0, 3.0 + 0.3]])
    V = np.concatenate([uv, np.full((3, 1), 100.0)], 1)
    F = np.array([[0, 2, 1]])
    frags = rasterize(*as_t(V, F, K), (10, 6))
    assert frags.pixels.tolist() == [3 * 10 + 5]
    assert frags.mask[0, 3, 5] and frags.mask.sum() == 1
    assert_close(frags.zbuf, torch.tensor([100.0], dtype=torch.float64), atol=1e-12)
    assert not frags.back[0]  # clockwise in (u, v) with v down faces the camera


def test_batch_equals_a_loop_of_single_images(face):
    V, F, cam = face
    rng = np.random.default_rng(5)
    Vb = np.stack([V + rng.normal(0, 3, 3) for _ in range(3)])
    zoom = cam.K * [[1.1], [1.1], [1.0]]
    Kb = np.stack([cam.K, cam.cropped(7, -4, 128, 96).K, zoom])
    frags = rasterize(*as_t(Vb, F, Kb), cam.image_size)
    assert frags.triangle.shape == (3, 96, 128) and frags.batch_size == 3
    attr = torch.from_numpy(Vb)
    batched = interpolate(attr, frags)
    for b in range(3):
        one = rasterize(*as_t(Vb[b], F, Kb[b]), cam.image_size)
        assert torch.equal(frags.triangle[b], one.triangle[0])
        assert torch.equal(frags.depth[b], one.depth[0])
        assert torch.equal(frags.barycentric[b], one.barycentric[0])
        assert torch.equal(batched[b], interpolate(attr[b], one)[0])
    # shared vertices, one K per image (and the other way round) broadcast
    shared = rasterize(*as_t(V, F, Kb), cam.image_size)
    assert shared.batch_size == 3
    alone = rasterize(*as_t(V, F, Kb[0]), cam.image_size)
    assert torch.equal(shared.triangle[0], alone.triangle[0])
    assert rasterize(*as_t(Vb, F, cam.K), cam.image_size).batch_size == 3


def test_empty_and_outside():
    K = np.array([[100.0, 0, 20], [0, 100.0, 15], [0, 0, 1]])
    V = np.array([[0, 0, 100.0], [10, 0, 100], [0, 10, 100]])
    cases = {
        "no triangles": (V, np.zeros((0, 3), np.int64)),
        "behind the camera": (V * [1, 1, -1], np.array([[0, 1, 2]])),
        "crossing the near plane": (np.array([[0, 0, 0.0], [10, 0, 100], [0, 10, 100]]),
                                    np.array([[0, 1, 2]])),
        "outside the image": (V + [500.0, 0, 0], np.array([[0, 1, 2]])),
        "degenerate": (np.array([[0, 0, 100.0], [5, 5, 100], [10, 10, 100]]),
                       np.array([[0, 1, 2]])),
        "not finite": (V * [1, np.nan, 1], np.array([[0, 1, 2]])),
    }
    for name, (Vc, Fc) in cases.items():
        frags = rasterize(*as_t(Vc, Fc, K), (40, 30))
        assert isinstance(frags, Fragments)
        assert frags.pixels.numel() == 0, name
        assert not frags.mask.any() and frags.triangle.eq(-1).all()
        assert frags.depth.shape == (1, 30, 40)
        assert interpolate(torch.ones(3, 2, dtype=torch.float64), frags).abs().sum() == 0
    n, m = render_normals(*as_t(V + [500.0, 0, 0], np.array([[0, 1, 2]]), K), (40, 30))
    assert n.shape == (1, 30, 40, 3) and not m.any()
    # a triangle partly outside covers only pixels inside the image
    frags = rasterize(*as_t(V + [-5.0, -3.0, 0], np.array([[0, 2, 1]]), K), (40, 30))
    assert frags.mask.any() and frags.pixels.max() < 40 * 30


def test_render_normals_is_differentiable(sphere):
    V, F = sphere
    cam = Camera.from_fov((40, 30), 14.0)
    Vt = torch.from_numpy(V).requires_grad_(True)
    n, m = render_normals(Vt, torch.from_numpy(F), torch.from_numpy(cam.K), cam.image_size)
    assert m.any() and n.shape == (1, 30, 40, 3)
    assert_close(n[m].norm(dim=-1), torch.ones(int(m.sum()), dtype=torch.float64))
    assert bool((n[m][:, 2] < 0).all())
    (n[m][:, 0].sum() + rasterize(Vt, torch.from_numpy(F), torch.from_numpy(cam.K),
                                  cam.image_size).zbuf.sum()).backward()
    assert Vt.grad is not None and torch.isfinite(Vt.grad).all() and Vt.grad.abs().sum() > 0


def test_depth_gradient_matches_finite_differences():
    K = torch.tensor([[80.0, 0, 10], [0, 80.0, 8], [0, 0, 1]], dtype=torch.float64)
    V0 = torch.tensor([[-31.3, -24.1, 201.7], [35.2, -20.7, 221.3], [0.4, 30.9, 238.2]],
                      dtype=torch.float64)
    F = torch.tensor([[0, 2, 1]])

    def f(V):
        return rasterize(V, F, K, (20, 16)).zbuf

    assert torch.autograd.gradcheck(f, (V0.clone().requires_grad_(True),), eps=1e-6,
                                    atol=1e-6)


def test_bad_inputs():
    K = np.eye(3) * [100, 100, 1]
    V = np.zeros((3, 3)) + [0, 0, 100]
    F = np.array([[0, 1, 2]])
    with pytest.raises(ShapeError, match="float32 or float64"):
        rasterize(torch.zeros(3, 3, dtype=torch.int64), F, K, (4, 4))
    with pytest.raises(ShapeError, match=r"\(V, 3\)"):
        rasterize(np.zeros((3, 2)), F, K, (4, 4))
    with pytest.raises(ShapeError, match="integers"):
        rasterize(V, F.astype(float), K, (4, 4))
    with pytest.raises(ShapeError, match=r"\(F, 3\)"):
        rasterize(V, np.array([0, 1, 2]), K, (4, 4))
    with pytest.raises(ShapeError, match="outside"):
        rasterize(V, np.array([[0, 1, 3]]), K, (4, 4))
    with pytest.raises(ShapeError, match="K"):
        rasterize(V, F, np.eye(4), (4, 4))
    with pytest.raises(ShapeError, match="focal"):
        rasterize(V, F, np.diag([-1.0, 1, 1]), (4, 4))
    with pytest.raises(ShapeError, match="image_size"):
        rasterize(V, F, K, (0, 4))
    with pytest.raises(ShapeError, match="image_size"):
        rasterize(V, F, K, (4, 4, 4))
    with pytest.raises(ShapeError, match="batch size"):
        rasterize(np.stack([V, V]), F, np.stack([K, K, K]), (4, 4))
    with pytest.raises(ShapeError, match="z_near"):
        rasterize(V, F, K, (4, 4), z_near=0.0)
    with pytest.raises(ShapeError, match="tensor or an array"):
        rasterize("vertices", F, K, (4, 4))
    frags = rasterize(V, F, K, (4, 4))
    with pytest.raises(ShapeError, match="attributes"):
        interpolate(np.zeros((2, 3)), frags)
    with pytest.raises(ShapeError, match="floating point"):
        interpolate(np.zeros((3, 3), np.int64), frags)
