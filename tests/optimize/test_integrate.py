"""Normal-integration baselines: WLS, Frankot-Chellappa and FacePSNet's Adam scheme."""

import numpy as np
import pytest
from scipy import ndimage

from faceps.core import ConfigError, FitError, ShapeError
from faceps.optimize import angular_error_deg
from faceps.optimize.heightfield import height_field_normals
from faceps.optimize.integrate import (
    integrate_adam_facepsnet,
    integrate_frankot_chellappa,
    integrate_wls,
    log_depth_gradients,
)
from tests.optimize.test_heightfield import (
    bumpy,
    depth_error,
    ellipse_mask,
    make_camera,
    paraboloid,
    render_graph,
)
from tests.tolerances import assert_close


@pytest.fixture(scope="module")
def scene():
    """A bumpy paraboloid at 400 mm, 96x80 pixels of ~0.5 mm, and a smoothed, scaled and
    shifted proxy depth."""
    cam = make_camera()
    z, n = render_graph(cam, bumpy(), 400.0)
    mask = ellipse_mask(cam, z)
    depth0 = ndimage.gaussian_filter(np.where(mask, z, 400.0), 6) * 1.004 + 1.5
    return cam, z, n, mask, depth0


def ratio_spread(depth, z, mask):
    """Peak-to-peak of depth / truth over the mask: 0 for the truth up to scale."""
    return float(np.ptp(depth[mask].astype(np.float64) / z[mask]))


def test_log_depth_gradients_are_those_of_the_surface():
    cam = make_camera(skew=0.4)
    z, n = render_graph(cam, paraboloid(400.0, 0.01), 400.0)
    p, q = log_depth_gradients(n, cam)
    h = np.log(z)
    assert_close(p[:, 1:-1], 0.5 * (h[:, 2:] - h[:, :-2]), atol=1e-7, rtol=1e-3,
                 name="d log z / du")
    assert_close(q[1:-1], 0.5 * (h[2:] - h[:-2]), atol=1e-7, rtol=1e-3, name="d log z / dv")
    # normals perpendicular to the ray (or facing away) give no gradient
    r = cam.rays()[10, 20]
    side = np.cross(r, [0.0, 1.0, 0.0])
    n2 = n.copy()
    n2[10, 20] = side / np.linalg.norm(side)
    n2[11, 20] = -n[11, 20]
    p2, q2 = log_depth_gradients(n2, cam)
    assert np.isnan(p2[10, 20]) and np.isnan(q2[11, 20]) and np.isfinite(p2[12, 20])


def test_wls_is_exact_up_to_the_scale_from_depth0(scene):
    cam, z, n, mask, depth0 = scene
    N = np.where(mask[..., None], n, np.nan)
    res = integrate_wls(N, mask, cam, depth0=depth0)
    assert res.method == "wls" and res.iterations > 0 and res.time > 0
    assert res.depth.dtype == np.float32 and np.all(np.isnan(res.depth[~mask]))
    assert ratio_spread(res.depth, z, mask) < 5e-5
    assert np.median(res.depth[mask] / z[mask]) == pytest.approx(
        np.median(depth0[mask] / z[mask]), rel=2e-5)
    direct = integrate_wls(N, mask, cam, depth0=depth0, solver="direct")
    assert_close(direct.depth, res.depth, atol=1e-3, rtol=0, name="direct vs amg-cg")


def test_wls_without_depth0_uses_the_default_distance(scene):
    cam, z, n, mask, _ = scene
    res = integrate_wls(n, mask, cam, distance=321.0)
    assert np.median(res.depth[mask]) == pytest.approx(321.0, rel=1e-6)
    assert ratio_spread(res.depth, z, mask) < 5e-5


def test_wls_weights_and_prior(scene):
    cam, z, n, mask, depth0 = scene
    rng = np.random.default_rng(2)
    noisy = n + rng.normal(0, 0.03, n.shape)
    plain = integrate_wls(noisy, mask, cam, depth0=depth0)
    zero_w = integrate_wls(noisy, mask, cam, depth0=depth0,
                           gradient_magnitude=np.zeros(mask.shape))
    assert_close(zero_w.depth, plain.depth, atol=1e-4, rtol=0, name="W = 0")
    # down-weighting a corrupted region (the paper's 1 / (1 + lambda W)) limits its damage
    bad = np.zeros_like(mask)
    bad[30:50, 30:60] = True
    corrupted = noisy.copy()
    corrupted[bad] = [0.5, 0.5, -0.7]
    W = np.where(bad, 1e4, 0.0)
    unweighted = integrate_wls(corrupted, mask, cam, depth0=depth0)
    weighted = integrate_wls(corrupted, mask, cam, depth0=depth0, gradient_magnitude=W,
                             lam=0.1)
    assert depth_error(weighted.depth, z, mask) < 0.5 * depth_error(unweighted.depth, z, mask)
    # a log-depth prior: weak, the normals decide (and it holds the scale); strong, the
    # prior depth comes back
    exact = integrate_wls(n, mask, cam, depth0=depth0)
    weak = integrate_wls(n, mask, cam, depth0=depth0, prior=1e-9)
    strong = integrate_wls(n, mask, cam, depth0=depth0, prior=1e6)
    assert ratio_spread(weak.depth, z, mask) < 1e-4
    # the weak prior's scale is the least-squares one: exp(mean log(z0 / z))
    assert np.median(weak.depth[mask] / z[mask]) == pytest.approx(
        np.exp(np.mean(np.log(depth0[mask] / z[mask]))), rel=1e-4)
    assert ratio_spread(exact.depth, z, mask) < 5e-5
    assert_close(strong.depth[mask], depth0[mask].astype(np.float32), atol=1e-3, rtol=0,
                 name="strong prior")


def test_wls_bridges_pixels_without_normals(scene):
    cam, z, n, mask, depth0 = scene
    hole = np.zeros_like(mask)
    hole[32:46, 36:56] = True
    N = np.where((mask & ~hole)[..., None], n, np.nan)
    res = integrate_wls(N, mask, cam, depth0=depth0)
    assert np.all(np.isfinite(res.depth[mask]))
    full = integrate_wls(n, mask, cam, depth0=depth0)
    # outside the hole the surface is unchanged up to scale; inside, a smooth fill
    r = res.depth[mask & ~hole].astype(np.float64) / full.depth[mask & ~hole]
    assert np.ptp(r) < 1e-4
    fill = (res.depth - z)[hole] - np.median((res.depth - z)[mask & ~hole])
    assert np.max(np.abs(fill)) < 0.5        # the relief inside the hole is 2.3 mm
    zero_w = integrate_wls(n, mask, cam, depth0=depth0, weights=np.where(hole, 0.0, 1.0))
    assert_close(zero_w.depth, res.depth, atol=1e-3, rtol=0, name="weight 0 = no normal")


def test_wls_scales_each_connected_part_separately():
    cam = make_camera()
    z, n = render_graph(cam, paraboloid(400.0, 0.01), 400.0)
    mask = np.zeros(z.shape, bool)
    mask[10:40, 10:40] = True
    mask[45:75, 50:90] = True
    depth0 = np.where(mask, z, 1.0)
    depth0[45:75, 50:90] *= 1.05            # the second part is 5 % further in the prior
    res = integrate_wls(n, mask, cam, depth0=depth0)
    r = res.depth.astype(np.float64) / z
    assert np.ptp(r[10:40, 10:40]) < 2e-5 and np.median(r[10:40, 10:40]) == pytest.approx(1)
    assert np.ptp(r[45:75, 50:90]) < 2e-5
    assert np.median(r[45:75, 50:90]) == pytest.approx(1.05)


def test_frankot_chellappa_recovers_a_bump_on_a_frontal_plane():
    # a frontal plane has zero log-depth gradients: the zero fill outside the mask is
    # consistent and FC is accurate
    cam = make_camera()
    z, n = render_graph(cam, bumpy(c=400.0, a=0.0, bumps=((0.0, 0.0, 2.0, 4.0),)), 400.0)
    mask = ellipse_mask(cam, z, 22.0, 18.0)
    res = integrate_frankot_chellappa(n, mask, cam, depth0=np.full(z.shape, 400.0))
    assert res.method == "frankot-chellappa" and res.depth.dtype == np.float32
    assert depth_error(res.depth, z, mask) < 0.02
    assert np.all(np.isnan(res.depth[~mask]))


def test_frankot_chellappa_on_a_curved_surface_is_a_looser_baseline(scene):
    cam, z, n, mask, depth0 = scene
    res = integrate_frankot_chellappa(n, mask, cam, depth0=depth0)
    # the gradient field jumps to zero at the mask border: error spreads from there
    err = depth_error(res.depth, z, mask)
    assert err < 0.4
    assert err < 0.5 * depth_error(depth0, z, mask)
    no_d0 = integrate_frankot_chellappa(n, mask, cam, distance=250.0)
    assert np.median(no_d0.depth[mask]) == pytest.approx(250.0, rel=1e-6)


def test_adam_facepsnet_improves_the_proxy():
    cam = make_camera(48, 40, 400.0)
    z, n = render_graph(cam, bumpy(), 400.0)
    mask = ellipse_mask(cam, z)
    depth0 = ndimage.gaussian_filter(np.where(mask, z, 400.0), 3) + 0.5
    res = integrate_adam_facepsnet(n, depth0, mask, cam, iterations=200, log_every=10)
    assert res.method == "adam-facepsnet" and res.iterations == 200
    assert len(res.history) == 21 and res.history[-1] < 0.5 * res.history[0]
    assert res.depth.dtype == np.float32 and np.all(np.isnan(res.depth[~mask]))
    start = depth_error(depth0, z, mask)
    assert depth_error(res.depth, z, mask) < 0.5 * start
    inner = ndimage.binary_erosion(mask, iterations=2)
    before = np.nanmean(angular_error_deg(height_field_normals(depth0, cam, mask), n)[inner])
    after = np.nanmean(angular_error_deg(height_field_normals(res.depth, cam, mask), n)[inner])
    assert after < 0.5 * before
    # no iterations: the proxy itself
    same = integrate_adam_facepsnet(n, depth0, mask, cam, iterations=0)
    assert_close(same.depth[mask], depth0[mask].astype(np.float32), name="0 iterations")


def test_bad_inputs_raise_project_errors(scene):
    cam, z, n, mask, depth0 = scene
    with pytest.raises(ShapeError, match="normals"):
        integrate_wls(n[:-1], mask, cam)
    with pytest.raises(FitError, match="empty"):
        integrate_frankot_chellappa(n, np.zeros_like(mask), cam)
    with pytest.raises(ShapeError, match="bool"):
        integrate_wls(n, mask.astype(int), cam)
    bad = depth0.copy()
    bad[40, 48] = np.nan
    with pytest.raises(ShapeError, match="finite"):
        integrate_wls(n, mask, cam, depth0=bad)
    with pytest.raises(ShapeError, match="> 0"):
        integrate_adam_facepsnet(n, -depth0, mask, cam, iterations=1)
    with pytest.raises(FitError, match="normal"):
        integrate_wls(np.full_like(n, np.nan), mask, cam)
    with pytest.raises(ConfigError, match="solver"):
        integrate_wls(n, mask, cam, solver="qr")
    with pytest.raises(ConfigError, match="depth0"):
        integrate_wls(n, mask, cam, prior=1.0)
    with pytest.raises(ShapeError, match="gradient_magnitude"):
        integrate_wls(n, mask, cam, gradient_magnitude=-np.ones(mask.shape))
    with pytest.raises(ShapeError, match="weights"):
        integrate_wls(n, mask, cam, weights=np.ones((3, 3)))
    with pytest.raises(ConfigError, match="lr"):
        integrate_adam_facepsnet(n, depth0, mask, cam, lr=0.0)
    with pytest.raises(ConfigError, match="dtype"):
        integrate_adam_facepsnet(n, depth0, mask, cam, dtype="float16")
