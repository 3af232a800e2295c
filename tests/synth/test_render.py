"""The fast renderer against a slow, obvious per-pixel implementation."""

import numpy as np
import pytest
import trimesh

from faceps.core import Camera, PointLights, vertex_normals
from faceps.core.raycast import RayCaster
from faceps.synth.render import (
    SensorConfig,
    ShadingConfig,
    apply_sensor,
    quantise,
    scatter_rows,
    sensor_images,
    shade_maps,
    shade_points,
)
from tests.tolerances import assert_close


def scene():
    """A sphere with a small box floating in front of it (casts a shadow), camera frame."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=40.0)
    sphere.apply_translation([0, 0, 300])
    box = trimesh.creation.box(extents=[15, 15, 15])
    box.apply_translation([-25, -10, 235])
    mesh = trimesh.util.concatenate([sphere, box])
    return np.asarray(mesh.vertices, float), np.asarray(mesh.faces, np.int64)


def ray_triangle(o, d, v0, v1, v2):
    """Möller-Trumbore for one ray and one triangle: (t, w1, w2) or None."""
    e1, e2 = v1 - v0, v2 - v0
    p = np.cross(d, e2)
    det = e1 @ p
    if abs(det) < 1e-12:
        return None
    inv = 1.0 / det
    s = o - v0
    u = (s @ p) * inv
    if u < 0 or u > 1:
        return None
    q = np.cross(s, e1)
    v = (d @ q) * inv
    if v < 0 or u + v > 1:
        return None
    t = (e2 @ q) * inv
    return (t, u, v) if t > 1e-9 else None


def slow_render(V, F, vn, albedo, camera, lights, pixels):
    """Per pixel: nearest hit over all triangles, interpolated normal, eq. 1 per light,
    shadow ray against all triangles."""
    out = {}
    for (u, v) in pixels:
        d = camera.rays(np.array([u, v], float))
        best = None
        for f, tri in enumerate(F):
            hit = ray_triangle(np.zeros(3), d, *V[tri])
            if hit and (best is None or hit[0] < best[0]):
                best = (hit[0], f, hit[1], hit[2])
        if best is None:
            out[(u, v)] = None
            continue
        t, f, w1, w2 = best
        w = np.array([1 - w1 - w2, w1, w2])
        P = t * d
        n = w @ vn[F[f]]
        n /= np.linalg.norm(n)
        rho = w @ albedo[F[f]]
        vals = []
        for j in range(len(lights)):
            to_l = lights.positions[j] - P
            dist = np.linalg.norm(to_l)
            ndl = n @ to_l
            lit = ndl > 0
            if lit:
                o = P + 0.05 * n
                dl = lights.positions[j] - o
                for tri in F:
                    hit = ray_triangle(o, dl / np.linalg.norm(dl), *V[tri])
                    if hit and hit[0] < np.linalg.norm(dl) - 1e-3:
                        lit = False
                        break
            vals.append(rho * lights.intensities[j] * max(ndl, 0) / dist**3 if lit
                        else np.zeros(3))
        out[(u, v)] = (t * d[2], n, np.array(vals))
    return out


def test_fast_renderer_matches_slow_reference():
    V, F = scene()
    vn = vertex_normals(V, F)
    albedo = 0.3 + 0.5 * (V - V.min(0)) / np.ptp(V, 0)
    cam = Camera(np.array([[250.0, 0, 31.5], [0, 250.0, 23.5], [0, 0, 1]]), (64, 48))
    lights = PointLights([[-200, -80, 150], [0, -150, 50], [180, 40, 120]],
                         [[8e4, 7e4, 6e4], [5e4, 5e4, 5e4], [7e4, 8e4, 9e4]])
    maps = RayCaster(V, F).render(cam, vn, {"albedo": albedo})
    mask = maps["mask"]
    shaded = shade_maps(np.nan_to_num(maps["points"]), np.nan_to_num(maps["normals"]),
                        np.nan_to_num(maps["albedo"]), mask, lights,
                        ShadingConfig(lambertian=True), RayCaster(V, F))
    assert shaded.shadow.any(), "the box must cast a shadow somewhere"
    rng = np.random.default_rng(0)
    pix = [(int(u), int(v)) for u, v in zip(rng.integers(0, 64, 25), rng.integers(0, 48, 25))]
    # include shadowed pixels and misses
    sv, su = np.nonzero(shaded.shadow.any(0))
    pix += [(int(su[i]), int(sv[i])) for i in range(0, len(su), max(1, len(su) // 5))]
    pix += [(0, 0)]
    ref = slow_render(V, F, vn, albedo, cam, lights, pix)
    for (u, v), r in ref.items():
        if r is None:
            assert not mask[v, u]
            continue
        assert mask[v, u]
        z, n, vals = r
        assert_close(maps["depth"][v, u], z, rtol=1e-6, atol=1e-4, name=f"depth {(u, v)}")
        assert_close(maps["normals"][v, u], n, atol=1e-5, name=f"normal {(u, v)}")
        assert_close(shaded.diffuse[:, v, u], vals, rtol=1e-4, atol=1e-7, name=f"I {(u, v)}")


def test_specular_adds_light_only_where_lit():
    V, F = scene()
    cam = Camera.from_fov((64, 48), 20.0)
    lights = PointLights([[0, -100, 0]], [1e5])
    maps = RayCaster(V, F).render(cam)
    args = (np.nan_to_num(maps["points"]), np.nan_to_num(maps["normals"]),
            np.full(maps["points"].shape, 0.5), maps["mask"], lights)
    lam = shade_maps(*args, ShadingConfig(lambertian=True))
    shiny = shade_maps(*args, ShadingConfig(specular=0.2))
    assert np.all(lam.specular == 0)
    assert shiny.specular.max() > 0
    assert np.all(shiny.specular[lam.diffuse == 0] == 0)
    assert_close(shiny.diffuse, lam.diffuse)


def test_sensor_exposure_noise_and_clipping():
    cam = Camera.from_fov((40, 30), 30)
    rad = np.zeros((2, 30, 40, 3), np.float32)
    rad[:, 5:25, 5:35] = 2.0
    rad[1, 10, 10] = 100.0
    mask = rad[0].max(-1) > 0
    img, exposure, sat = apply_sensor(rad, cam, mask, SensorConfig(full_well=0, read_noise=0))
    assert exposure == pytest.approx(0.8 / 2.0)
    assert_close(img[0, 10, 10], [0.8, 0.8, 0.8], rtol=1e-6)
    assert sat[1, 10, 10] and sat.sum() == 1 and img.max() == 1.0
    noisy, _, _ = apply_sensor(rad, cam, mask, SensorConfig(exposure=0.25, full_well=1000,
                                                            read_noise=0.01),
                               np.random.default_rng(0))
    lit = noisy[0][mask]
    assert abs(lit.mean() - 0.5) < 0.01
    # shot + read noise variance
    assert lit.std() == pytest.approx(np.sqrt(0.5 / 1000 + 0.01**2), rel=0.1)
    vig, _, _ = apply_sensor(np.ones((1, 30, 40, 3), np.float32), cam, np.ones((30, 40), bool),
                             SensorConfig(exposure=0.5, full_well=0, read_noise=0,
                                          vignetting=0.3))
    assert vig[0, 15, 20, 0] > vig[0, 0, 0, 0]
    assert vig[0, 0, 0, 0] == pytest.approx(0.5 * 0.7, rel=0.02)


def test_quantise():
    x = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
    assert quantise(x, "linear", 16).tolist() == [0, 32768, 65535, 65535]
    assert quantise(x, "srgb", 8).tolist() == [0, 188, 255, 255]


@pytest.mark.parametrize("config", [
    SensorConfig(), SensorConfig(exposure=0.3, vignetting=0.2), SensorConfig(full_well=0),
    SensorConfig(read_noise=0), SensorConfig(full_well=0, read_noise=0, saturation=0.5)])
def test_packed_sensor_equals_the_full_image_sensor(config):
    """sensor_images (radiance at the surface pixels only) draws the same noise and gives
    bit for bit the images of apply_sensor on the scattered full image."""
    cam = Camera.from_fov((40, 30), 30)
    rng = np.random.default_rng(0)
    pix = np.sort(rng.choice(1200, 500, replace=False))
    rad = rng.uniform(0, 2, (3, 500, 3)).astype(np.float32)
    full = np.zeros((3, 1200, 3), np.float32)
    full[:, pix] = rad
    mask = np.zeros(1200, bool)
    mask[pix] = True
    a_img, a_exp, a_sat = apply_sensor(full.reshape(3, 30, 40, 3), cam, mask.reshape(30, 40),
                                       config, np.random.default_rng(1))
    b_img, b_exp, b_sat = sensor_images(rad, pix, cam, config, np.random.default_rng(1))
    assert a_exp == b_exp
    assert b_img.dtype == np.float32 and np.array_equal(a_img, b_img)
    assert np.array_equal(a_sat & mask.reshape(30, 40)[None], b_sat)
    assert b_sat.any() == (config.saturation < 1)


def test_scatter_rows():
    out = np.zeros((2, 10, 3), np.float32)
    vals = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    idx = np.array([1, 3, 4, 9])
    scatter_rows(out, idx, vals)
    ref = np.zeros_like(out)
    ref[:, idx] = vals
    assert np.array_equal(out, ref)
    flags = np.zeros((1, 10), bool)
    scatter_rows(flags, idx, np.ones((1, 4), bool))
    assert flags[0].tolist() == [i in idx for i in range(10)]


def test_shade_points_is_shade_maps_at_the_mask():
    V, F = scene()
    cam = Camera.from_fov((64, 48), 20.0)
    lights = PointLights([[-150, -100, 100], [120, 0, 80]], [[1e5, 9e4, 8e4], [6e4, 6e4, 7e4]])
    maps = RayCaster(V, F).render(cam)
    m = maps["mask"]
    albedo = np.full(maps["points"].shape, 0.5)
    full = shade_maps(np.nan_to_num(maps["points"]), np.nan_to_num(maps["normals"]), albedo, m,
                      lights, ShadingConfig(), RayCaster(V, F))
    packed = shade_points(maps["points"][m], maps["normals"][m], albedo[m], lights,
                          ShadingConfig(), RayCaster(V, F))
    assert packed.shadow.any() and packed.specular.max() > 0
    assert np.array_equal(full.diffuse[:, m], packed.diffuse)
    assert np.array_equal(full.shadow[:, m], packed.shadow)
    assert not full.diffuse[:, ~m].any()


def test_proxy_raster_agrees_with_the_ray_caster():
    """The proxy maps come from the torch rasteriser (float32): the same pixels and normals
    as ray casting the proxy, to float32 precision."""
    from faceps.model import load_model
    from faceps.synth.faces import default_camera, rasterize_proxy, sample_face

    model = load_model("builtin")
    cam = default_camera((320, 240))
    s = sample_face(np.random.default_rng(4), model, cam)
    P = model.geometry(s.coefficients.id, s.coefficients.exp) @ s.rotation.T + s.translation
    r = rasterize_proxy(P, model.triangles, cam)
    maps = RayCaster(P, model.triangles).render(cam)
    ref = (maps["mask"] & ~maps["backface"]).reshape(-1)
    mine = np.zeros(ref.size, bool)
    mine[r.pixels] = True
    assert (mine != ref).sum() <= 0.002 * ref.sum()
    both = mine & ref
    n_ref = maps["normals"].reshape(-1, 3)[both]
    n = np.zeros((ref.size, 3), np.float32)
    n[r.pixels] = r.normals
    assert_close(n[both], n_ref, atol=2e-4, name="proxy normals")
    d = np.zeros(ref.size, np.float32)
    d[r.pixels] = r.depth
    assert_close(d[both], maps["depth"].reshape(-1)[both], rtol=1e-5, name="proxy depth")
    assert r.seen.dtype == bool and r.seen.shape == (model.triangles.shape[0],)
