"""Height-field recovery (paper eq. 7): analytic surfaces under a perspective camera."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import ndimage

from faceps.core import Camera, ConfigError, FitError, ShapeError
from faceps.optimize import angular_error_deg
from faceps.optimize import heightfield as hf
from faceps.optimize.heightfield import (
    HeightFieldConfig,
    depth_breaks,
    height_field_normals,
    height_field_normals_jacobian,
    solve_height_field,
)
from tests.tolerances import assert_close


# ------------------------------------------------------------------ analytic surfaces
def make_camera(W=96, H=80, f=800.0, skew=0.0):
    return Camera(np.array([[f, skew, (W - 1) / 2 + 1.5], [0, 1.05 * f, (H - 1) / 2 - 2.0],
                            [0, 0, 1]]), (W, H))


def render_graph(camera, g, z_start, iters=25):
    """Depth and exact normals of the surface z = g(x, y) (camera frame, mm).

    Each pixel's depth solves z = g(z rx, z ry) by Newton's method; the normal is
    (g_x, g_y, -1) normalised, which faces the camera.
    """
    r = camera.rays()
    rx, ry = r[..., 0], r[..., 1]
    z = np.full(rx.shape, float(z_start))
    for _ in range(iters):
        val, gx, gy = g(z * rx, z * ry)
        z = z - (z - val) / (1 - gx * rx - gy * ry)
    val, gx, gy = g(z * rx, z * ry)
    n = np.stack([gx, gy, -np.ones_like(gx)], axis=-1)
    return z, n / np.linalg.norm(n, axis=-1, keepdims=True)


def plane(c, ax, ay):
    return lambda x, y: (c + ax * x + ay * y, np.full_like(x, ax), np.full_like(x, ay))


def paraboloid(c, a):
    return lambda x, y: (c + a * (x * x + y * y), 2 * a * x, 2 * a * y)


def sphere(c, R):
    def g(x, y):
        w = np.sqrt(np.maximum(R * R - x * x - y * y, 1e-9))
        return c - w, x / w, y / w
    return g


def bumpy(c=400.0, a=0.02, bumps=((-6.0, 3.0, 1.2, 4.0), (7.0, -2.0, -0.8, 3.0),
                                  (0.0, 8.0, 0.6, 2.5))):
    """A paraboloid with Gaussian bumps (x0, y0, amplitude, sigma) in mm."""
    def g(x, y):
        val, gx, gy = c + a * (x * x + y * y), 2 * a * x, 2 * a * y
        for x0, y0, amp, sig in bumps:
            e = amp * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sig * sig))
            val = val + e
            gx = gx - e * (x - x0) / sig ** 2
            gy = gy - e * (y - y0) / sig ** 2
        return val, gx, gy
    return g


def ellipse_mask(camera, depth, a=20.0, b=15.0):
    r = camera.rays()
    x, y = depth * r[..., 0], depth * r[..., 1]
    return (x / a) ** 2 + (y / b) ** 2 < 1.0


@pytest.fixture(scope="module")
def scene():
    """A bumpy paraboloid at 400 mm seen by a 96x80 camera (~0.5 mm per pixel)."""
    cam = make_camera()
    z, n = render_graph(cam, bumpy(), 400.0)
    mask = ellipse_mask(cam, z)
    depth0 = ndimage.gaussian_filter(np.where(mask, z, 400.0), 6) * 1.004 + 1.5
    return cam, z, n, mask, depth0


# ------------------------------------------------------------- eq. 7 pixel normals
def eq7_loop(depth, camera, mask):
    """Eq. 7 written out per pixel: vectors e1..e4 to the right, up, left and down
    neighbours (counter-clockwise in the image), normal = normalised sum of e_k x e_(k+1)
    over the consecutive pairs whose two neighbours are in the mask.

    (The paper lists e_(k+1) x e_k; with its neighbour order that is the same vector up to
    the sign, and faceps orients normals toward the camera.)"""
    H, W = depth.shape
    Kinv = np.linalg.inv(camera.K)
    out = np.full((H, W, 3), np.nan)
    offsets = [(0, 1), (-1, 0), (0, -1), (1, 0)]
    for v in range(H):
        for u in range(W):
            if not mask[v, u]:
                continue
            V = depth[v, u] * (Kinv @ [u, v, 1.0])
            e = []
            for dv, du in offsets:
                vv, uu = v + dv, u + du
                if 0 <= vv < H and 0 <= uu < W and mask[vv, uu]:
                    e.append(depth[vv, uu] * (Kinv @ [uu, vv, 1.0]) - V)
                else:
                    e.append(None)
            s, used = np.zeros(3), False
            for k in range(4):
                if e[k] is not None and e[(k + 1) % 4] is not None:
                    s += np.cross(e[k], e[(k + 1) % 4])
                    used = True
            if used and np.linalg.norm(s) > 0:
                out[v, u] = s / np.linalg.norm(s)
    return out


def test_plane_normals_are_exact_everywhere_including_the_border():
    cam = make_camera(skew=0.3)
    n_true = np.array([0.3, -0.2, -1.0]) / np.linalg.norm([0.3, -0.2, -1.0])
    z, n = render_graph(cam, plane(420.0, 0.3, -0.2), 420.0)
    assert_close(n[0, 0], n_true, atol=1e-12, name="analytic plane normal")
    mask = ellipse_mask(cam, z)
    out = height_field_normals(z, cam, mask)
    assert out.dtype == np.float32 and out.shape == (80, 96, 3)
    defined = np.all(np.isfinite(out), axis=-1)
    assert np.all(defined[ndimage.binary_erosion(mask)])
    assert_close(out[defined], np.broadcast_to(n_true, out[defined].shape), atol=2e-6,
                 name="eq. 7 normals of a plane")
    assert np.all(np.isnan(out[~mask]))


def test_frontal_plane_faces_the_camera():
    cam = make_camera()
    out = height_field_normals(np.full((80, 96), 300.0), cam)
    assert_close(out[1:-1, 1:-1], np.broadcast_to([0, 0, -1.0], (78, 94, 3)), atol=1e-6,
                 name="frontal plane")
    # the image corners have one pair of neighbours: still defined
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("surface", ["sphere", "paraboloid"])
def test_normals_converge_to_the_analytic_ones_with_resolution(surface):
    g = sphere(430.0, 40.0) if surface == "sphere" else paraboloid(400.0, 0.01)
    errors = []
    for scale in (1, 2, 4):
        cam = make_camera(48 * scale, 40 * scale, 200.0 * scale)
        z, n = render_graph(cam, g, 400.0)
        mask = ellipse_mask(cam, z, 25.0, 20.0)
        out = np.full(n.shape, np.nan)              # float64: the float32 image version
        out[mask] = height_field_normals_jacobian(z, cam, mask)[0]  # resolves ~0.02 deg
        inner = ndimage.binary_erosion(mask, iterations=scale)
        errors.append(float(np.nanmax(angular_error_deg(out, n)[inner])))
    # central differences: error O(h^2)
    assert errors[0] < 0.5
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors


def test_fast_normals_match_the_slow_loop_on_an_irregular_mask():
    rng = np.random.default_rng(3)
    cam = make_camera(14, 11, 60.0)
    depth = 100.0 + ndimage.gaussian_filter(rng.normal(0, 3.0, (11, 14)), 1.0)
    mask = rng.random((11, 14)) > 0.25
    mask[0, :] = True                      # pixels on the image border
    mask[5, 3:9] = False                   # a slit: pixels with only up/down neighbours
    slow = eq7_loop(depth, cam, mask)
    fast = height_field_normals(np.where(mask, depth, np.nan), cam)
    assert np.array_equal(np.isnan(fast[..., 0]), np.isnan(slow[..., 0]))
    assert np.isnan(slow[..., 0]).sum() > np.sum(~mask)       # some mask pixels undefined
    assert_close(fast, slow.astype(np.float32), atol=1e-6, name="eq. 7 fast vs loop")
    ok = np.isfinite(slow[..., 0])
    assert np.all(np.einsum("hwc,hwc->hw", slow, cam.rays())[ok] < 0)   # face the camera


def test_normals_validate_their_inputs():
    cam = make_camera()
    with pytest.raises(ShapeError, match="depth"):
        height_field_normals(np.ones((80, 95)), cam)
    with pytest.raises(ShapeError, match="mask"):
        height_field_normals(np.ones((80, 96)), cam, np.ones((5, 5), bool))
    assert np.all(np.isnan(height_field_normals(np.full((80, 96), np.nan), cam)))


# ----------------------------------------------------------------------- Jacobian
def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(5)
    cam = make_camera(9, 8, 50.0)
    mask = rng.random((8, 9)) > 0.2
    depth = 80.0 + rng.normal(0, 2.0, (8, 9))
    normals, J = height_field_normals_jacobian(depth, cam, mask)
    M = int(mask.sum())
    assert J.shape == (3 * M, M)
    vv, uu = np.nonzero(mask)
    fd = np.zeros((3 * M, M))
    eps = 1e-5
    for j in range(M):
        plus, minus = depth.copy(), depth.copy()
        plus[vv[j], uu[j]] += eps
        minus[vv[j], uu[j]] -= eps
        a = hf.height_field_normals_jacobian(plus, cam, mask)[0]
        b = hf.height_field_normals_jacobian(minus, cam, mask)[0]
        fd[:, j] = np.nan_to_num((a - b).reshape(-1) / (2 * eps))
    assert_close(J.toarray(), fd, atol=1e-7, rtol=1e-5, name="dN/dZ")
    assert np.abs(J).sum() > 0
    # the normals agree with the image version
    img = height_field_normals(np.where(mask, depth, np.nan), cam)
    assert_close(normals, img[mask].astype(np.float64), atol=1e-6, name="normals")


def laplacian_loop(depth0, camera, mask):
    """The Laplacian rows by hand: second differences per axis with both neighbours in
    the mask, divided by the squared pixel footprint (z0 / f)^2."""
    H, W = mask.shape
    index = -np.ones((H, W), int)
    index[mask] = np.arange(mask.sum())
    rows, cols, vals, r = [], [], [], 0
    fx, fy = camera.K[0, 0], camera.K[1, 1]
    for v in range(H):
        for u in range(W):
            if not mask[v, u]:
                continue
            entries = {}
            for (dv, du), f in (((0, 1), fx), ((1, 0), fy)):
                a, b = (v - dv, u - du), (v + dv, u + du)
                if all(0 <= p[0] < H and 0 <= p[1] < W and mask[p] for p in (a, b)):
                    c = (f / depth0[v, u]) ** 2
                    for p, w in ((a, c), (b, c), ((v, u), -2 * c)):
                        entries[index[p]] = entries.get(index[p], 0.0) + w
            if entries:
                for col, w in entries.items():
                    rows.append(r)
                    cols.append(col)
                    vals.append(w)
                r += 1
    return sp.csr_matrix((vals, (rows, cols)), shape=(max(r, 1), int(mask.sum())))


def test_normal_equations_equal_the_sparse_jacobian_products():
    rng = np.random.default_rng(7)
    cam = make_camera(12, 10, 60.0)
    mask = rng.random((10, 12)) > 0.15
    depth0 = 90.0 + rng.normal(0, 1.0, (10, 12))
    depth = depth0 + rng.normal(0, 0.5, (10, 12))
    targets = height_field_normals(depth0 + rng.normal(0, 0.3, (10, 12)), cam, mask)
    targets = targets.astype(np.float64)
    targets /= np.linalg.norm(targets, axis=-1, keepdims=True)
    weights = rng.uniform(0.2, 2.0, (10, 12))
    cfg = HeightFieldConfig(w1=0.05, w2=0.3)
    N0, Z0, m, C, ccam, (v0, u0) = hf._validate(targets, depth0, mask, cam, weights)
    crop = (slice(v0, v0 + m.shape[0]), slice(u0, u0 + m.shape[1]))
    grid = hf._Grid(m, ccam)
    prob = hf._Problem(grid, grid.core(grid.crop(N0)), grid.core(grid.crop(C)),
                       grid.crop(np.where(m, Z0, 1.0), fill=1.0), cfg)
    Zg = grid.crop(np.where(m, depth[crop], 1.0), fill=1.0)
    A, g = prob.gauss_newton(Zg)

    # independent assembly from the sparse Jacobian and the hand-written Laplacian
    n, J = height_field_normals_jacobian(depth, cam, mask)
    c = np.where(np.isfinite(n[:, 0]) & (np.abs(targets[mask]).sum(1) > 0),
                 weights[mask], 0.0)
    c3 = np.repeat(c, 3)
    L = laplacian_loop(depth0, cam, mask)
    A_ref = J.T @ sp.diags(c3) @ J + cfg.w1 * sp.identity(J.shape[1]) + cfg.w2 * L.T @ L
    r = np.nan_to_num(n - targets[mask]).reshape(-1)
    g_ref = J.T @ (c3 * r) + cfg.w1 * (depth[mask] - depth0[mask]) \
        + cfg.w2 * L.T @ (L @ depth[mask])
    assert_close(A.toarray(), A_ref.toarray(), atol=1e-9, rtol=1e-9, name="J^T J")
    assert_close(g, g_ref, atol=1e-9, rtol=1e-9, name="J^T r")
    # and the per-pixel cost
    t = prob.terms(Zg)
    assert_close(t["normal"], np.sum(c3 * r * r) / mask.sum(), rtol=1e-9, name="normal")
    assert_close(t["laplacian"], cfg.w2 * np.sum((L @ depth[mask]) ** 2) / mask.sum(),
                 rtol=1e-9, name="laplacian")


# ------------------------------------------------------------------------- solver
def depth_error(depth, truth, mask):
    """Mean |dz - median dz| in mm over the mask (the offset/scale is the prior's)."""
    d = (depth - truth)[mask].astype(np.float64)
    return float(np.mean(np.abs(d - np.median(d))))


def test_solve_recovers_the_surface_from_exact_normals(scene):
    cam, z, n, mask, depth0 = scene
    start = depth_error(depth0, z, mask)
    assert start > 0.15
    res = solve_height_field(np.where(mask[..., None], n, np.nan), depth0, mask, cam,
                             HeightFieldConfig(w1=1e-5, w2=1e-4, iterations=8, tol=1e-6,
                                               cg_tol=1e-8, solver="direct"))
    assert res.depth.dtype == np.float32 and res.normals.dtype == np.float32
    assert np.all(np.isnan(res.depth[~mask])) and np.all(np.isfinite(res.depth[mask]))
    assert res.converged and 1 <= res.iterations <= 8
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))
    assert depth_error(res.depth, z, mask) < 0.01
    # exact normals fix the surface up to a scale s (perspective); the prior picks the
    # s minimising sum (s z - z0)^2
    s_star = np.sum(z[mask] * depth0[mask]) / np.sum(z[mask] ** 2)
    assert_close(res.depth[mask] / z[mask], np.full(mask.sum(), s_star), atol=3e-5,
                 name="depth / truth")
    err = angular_error_deg(res.normals, n)
    inner = ndimage.binary_erosion(mask, iterations=2)
    assert np.nanmean(err[inner]) < 0.1 and np.nanmax(err[inner]) < 0.5
    assert sum(res.terms.values()) == pytest.approx(res.history[-1], rel=1e-9)
    assert set(res.timings) >= {"total", "assemble", "solve", "init"}


def test_default_config_recovers_the_surface(scene):
    cam, z, n, mask, depth0 = scene
    res = solve_height_field(np.where(mask[..., None], n, np.nan), depth0, mask, cam)
    assert res.converged
    assert depth_error(res.depth, z, mask) < 0.02
    inner = ndimage.binary_erosion(mask, iterations=2)
    assert np.nanmean(angular_error_deg(res.normals, n)[inner]) < 0.25


def test_solver_options_agree(scene):
    cam, z, n, mask, depth0 = scene
    rng = np.random.default_rng(0)
    noisy = n + rng.normal(0, 0.02, n.shape)
    out = {}
    for solver in ("direct", "amg-cg", "cg"):
        cfg = HeightFieldConfig(solver=solver, cg_tol=1e-9, cg_maxiter=5000, tol=1e-9,
                                iterations=6, levels=1)
        out[solver] = solve_height_field(noisy, depth0, mask, cam, cfg)
    for solver in ("amg-cg", "cg"):
        assert_close(out[solver].depth, out["direct"].depth, atol=2e-4, rtol=0,
                     name=f"{solver} vs direct")
        assert out[solver].history[-1] == pytest.approx(out["direct"].history[-1], rel=1e-6)
    assert all(c > 0 for c in out["amg-cg"].cg_iterations)


def test_pyramid_and_initialisations_reach_the_same_minimum(scene):
    cam, z, n, mask, depth0 = scene
    rng = np.random.default_rng(1)
    noisy = n + rng.normal(0, 0.02, n.shape)
    tight = dict(cg_tol=1e-8, tol=1e-9, iterations=10, coarse_iterations=3)
    ref = solve_height_field(noisy, depth0, mask, cam, HeightFieldConfig(levels=1, **tight))
    pyr = solve_height_field(noisy, depth0, mask, cam,
                             HeightFieldConfig(levels=3, min_level_pixels=200, **tight))
    d0 = solve_height_field(noisy, depth0, mask, cam,
                            HeightFieldConfig(levels=1, init="depth0", **tight))
    assert len(pyr.levels) == 3 and len(ref.levels) == 1
    assert pyr.levels[0]["pixels"] < pyr.levels[1]["pixels"] < pyr.levels[2]["pixels"]
    for other in (pyr, d0):
        assert_close(other.depth, ref.depth, atol=2e-4, rtol=0, name="same minimum")
        assert other.converged


def test_pyramid_with_a_prior_undefined_outside_the_mask(scene):
    """A proxy depth is NaN off the face: the coarse-to-fine start must not carry those
    NaN into the fine level's Jacobian (through zero weights) and must reach the minimum
    of a single-level solve."""
    cam, z, n, mask, depth0 = scene
    prior = np.where(mask, depth0, np.nan)
    tight = dict(cg_tol=1e-8, tol=1e-9, iterations=10, coarse_iterations=3)
    ref = solve_height_field(n, depth0, mask, cam, HeightFieldConfig(levels=1, **tight))
    pyr = solve_height_field(np.where(mask[..., None], n, np.nan), prior, mask, cam,
                             HeightFieldConfig(levels=3, min_level_pixels=200, **tight))
    assert len(pyr.levels) == 3 and np.all(np.isfinite(pyr.depth[mask]))
    assert_close(pyr.depth[mask], ref.depth[mask], atol=2e-4, rtol=0, name="same minimum")


def test_missing_normals_and_weights(scene):
    cam, z, n, mask, depth0 = scene
    targets = np.where(mask[..., None], n, np.nan)
    hole = np.zeros_like(mask)
    hole[35:45, 40:52] = True
    targets[hole] = np.nan
    weights = np.where(hole, 0.0, 1.0)
    weights[:, :20] = 0.5
    cfg = HeightFieldConfig(w1=1e-5, w2=1e-4, solver="direct", iterations=8, tol=1e-6)
    res = solve_height_field(targets, depth0, mask, cam, cfg, weights=weights)
    assert np.all(np.isfinite(res.depth[mask]))
    # a hole without normals is bridged smoothly: small error inside it
    assert depth_error(res.depth, z, mask) < 0.05
    d = (res.depth - z)[hole]
    assert np.max(np.abs(d - np.median((res.depth - z)[mask]))) < 0.5


def test_scale_pyramid_camera_is_consistent():
    cam = make_camera(10, 8, 70.0)
    N0 = np.zeros((8, 10, 3))
    N0[..., 2] = -1.0
    _, _, _, _, coarse = hf._downsample(N0, np.ones((8, 10)), np.ones((8, 10), bool),
                                        np.ones((8, 10)), cam)
    # a coarse pixel centre sees the mean of its four children's rays
    uc, vc = np.meshgrid(np.arange(5.0), np.arange(4.0))
    rc = coarse.rays(np.stack([uc, vc], -1))
    fine = cam.rays()
    mean = 0.25 * (fine[0::2, 0::2] + fine[1::2, 0::2] + fine[0::2, 1::2] + fine[1::2, 1::2])
    assert_close(rc, mean, atol=1e-12, name="coarse rays")


# ------------------------------------------------------------------------ inputs
def test_bad_inputs_raise_project_errors(scene):
    cam, z, n, mask, depth0 = scene
    N = np.where(mask[..., None], n, np.nan)
    with pytest.raises(ShapeError, match="normals"):
        solve_height_field(N[:, :-1], depth0, mask, cam)
    with pytest.raises(ShapeError, match="depth0"):
        solve_height_field(N, depth0[:-1], mask, cam)
    with pytest.raises(ShapeError, match="bool"):
        solve_height_field(N, depth0, mask.astype(np.uint8), cam)
    with pytest.raises(FitError, match="empty"):
        solve_height_field(N, depth0, np.zeros_like(mask), cam)
    bad = depth0.copy()
    bad[40, 48] = np.nan
    with pytest.raises(ShapeError, match="finite"):
        solve_height_field(N, bad, mask, cam)
    bad[40, 48] = -1.0
    with pytest.raises(ShapeError, match="> 0"):
        solve_height_field(N, bad, mask, cam)
    with pytest.raises(FitError, match="away from the camera"):
        solve_height_field(-N, depth0, mask, cam)
    with pytest.raises(FitError, match="no pixel"):
        solve_height_field(np.full_like(N, np.nan), depth0, mask, cam)
    with pytest.raises(ShapeError, match="weights"):
        solve_height_field(N, depth0, mask, cam, weights=-np.ones(mask.shape))
    with pytest.raises(ShapeError, match="camera"):
        solve_height_field(N, depth0, mask, cam.K)


@pytest.mark.parametrize("kwargs, match", [
    (dict(w1=0.0), "w1"), (dict(w2=-1.0), "w2"), (dict(solver="lu"), "solver"),
    (dict(cg_tol=2.0), "cg_tol"), (dict(init="zero"), "init"), (dict(levels=0), "levels"),
    (dict(iterations=-1), "iterations"), (dict(cg_maxiter=0), "cg_maxiter"),
    (dict(break_ratio=-1.0), "break_ratio"), (dict(break_ratio=float("nan")), "break_ratio"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HeightFieldConfig(**kwargs)


def test_depth_breaks_keep_an_occluded_side_at_its_depth():
    """Two frontal planes 25 mm apart side by side (a nose side in front of a cheek, in
    miniature), exact normals, a prior 1 mm off everywhere: with the step detected from
    the prior the two sides keep their depths; coupled across the step, the normals
    (flat everywhere) drag them toward each other."""
    cam = make_camera()
    H, W = 80, 96
    z = np.where(np.arange(W)[None, :] < 50, 400.0, 425.0) * np.ones((H, 1))
    mask = np.zeros((H, W), bool)
    mask[8:72, 10:86] = True
    cut_u, cut_v = depth_breaks(z, mask, cam, 3.0)
    assert np.array_equal(np.nonzero(cut_u)[1], np.full(64, 49)) and not cut_v.any()
    # a slope of 60 degrees is no break at ratio 3 (tan 60 = 1.7 footprints per pixel)
    tilted = 400.0 + np.tan(np.radians(60)) * 400.0 / cam.K[0, 0] * np.arange(W)[None, :]
    assert not depth_breaks(tilted * np.ones((H, 1)), mask, cam, 3.0)[0].any()
    N = np.broadcast_to([0.0, 0.0, -1.0], (H, W, 3)).copy()
    depth0 = z + 1.0

    def error(ratio):
        out = solve_height_field(N, depth0, mask, cam, HeightFieldConfig(break_ratio=ratio))
        d = (out.depth - z)[mask]
        return np.abs(d - np.median(d)).mean(), out

    with_breaks, out = error(3.0)
    coupled, _ = error(0.0)
    assert with_breaks < 0.01, with_breaks
    assert coupled > 1.0, coupled
    assert np.all(np.isfinite(out.depth[mask]))
