"""Scan loading and optimal-step non-rigid ICP registration (faceps.synth.register)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import trimesh

from faceps.core.color import srgb_to_linear
from faceps.core.errors import ConfigError, FitError
from faceps.model import MorphableModel
from faceps.synth.register import (
    RegistrationConfig,
    Scan,
    ScanError,
    Similarity,
    closest_points,
    estimate_scan_scale,
    fit_coefficients,
    load_scan,
    register_scan,
    umeyama,
)
from tests.tolerances import assert_close

LPS_SCAN = Path("/work/shared/data/scans/lee-perry-smith-head.obj")

#: a schedule that keeps the registration tests short (Amberg's levels, thinned)
FAST = dict(alphas=(50.0, 20.0, 7.0, 3.0, 1.0), betas=(1.0, 0.3))


# ------------------------------------------------------------------------- fixtures
def _face_height(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """A face-like height field (mm): a dome with nose, brows, eye sockets, lips, chin."""
    base = 90.0 * np.sqrt(np.clip(1 - (X / 95.0) ** 2 - (Y / 140.0) ** 2, 0.05, None))
    nose = 20.0 * np.exp(-(X ** 2 / (2 * 7.0 ** 2) + (Y + 10) ** 2 / (2 * 16.0 ** 2)))
    brow = 5.0 * np.exp(-(Y - 25) ** 2 / (2 * 5.0 ** 2)) * np.exp(-X ** 2 / (2 * 35.0 ** 2))
    eyes = -6.0 * sum(np.exp(-((X - s) ** 2 + (Y - 12) ** 2) / (2 * 9.0 ** 2)) for s in (-30, 30))
    lips = 4.0 * np.exp(-(X ** 2 / (2 * 18.0 ** 2) + (Y + 45) ** 2 / (2 * 5.0 ** 2)))
    chin = 6.0 * np.exp(-(X ** 2 / (2 * 15.0 ** 2) + (Y + 68) ** 2 / (2 * 8.0 ** 2)))
    return base + nose + brow + eyes + lips + chin - 60.0


def _landmark_layout() -> np.ndarray:
    """(68, 2) iBUG-like positions (x toward the subject's left, y up) on the small face."""
    th = np.deg2rad(np.linspace(190, 350, 17))
    jaw = np.stack([55 * np.cos(th), -5 + 65 * np.sin(th)], 1)
    brow_x = np.r_[np.linspace(-45, -12, 5), np.linspace(12, 45, 5)]
    brows = np.stack([brow_x, np.full(10, 28.0)], 1)
    bridge = np.stack([np.zeros(4), [18.0, 8.0, -2.0, -12.0]], 1)
    nostrils = np.stack([np.linspace(-10, 10, 5), np.full(5, -22.0)], 1)

    def ring(cx, cy, rx, ry, n):
        t = np.linspace(np.pi, -np.pi, n, endpoint=False)
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)

    eyes = np.concatenate([ring(-30, 12, 10, 4, 6), ring(30, 12, 10, 4, 6)])
    mouth = np.concatenate([ring(0, -45, 20, 8, 12), ring(0, -45, 14, 3, 8)])
    return np.concatenate([jaw, brows, bridge, nostrils, eyes, mouth])


def small_face_model(seed: int = 0) -> MorphableModel:
    """A 2091-vertex face-like morphable model (a grid over a height field) for fast tests."""
    rng = np.random.default_rng(seed)
    nx, ny = 41, 51
    X, Y = np.meshgrid(np.linspace(-60, 60, nx), np.linspace(-75, 75, ny))
    mean = np.stack([X, Y, _face_height(X, Y)], -1).reshape(-1, 3)
    tris = []
    for r in range(ny - 1):
        for c in range(nx - 1):
            a = r * nx + c
            tris += [[a, a + 1, a + nx + 1], [a, a + nx + 1, a + nx]]
    x, y = mean[:, 0], mean[:, 1]
    modes = [np.stack([x / 60, 0 * x, 0 * x], 1), np.stack([0 * x, y / 75, 0 * x], 1),
             np.stack([0 * x, 0 * x, np.exp(-(x ** 2 / 98 + (y + 10) ** 2 / 512))], 1)]
    for _ in range(3):
        c = rng.uniform([-40, -60], [40, 60])
        g = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * 25.0 ** 2))
        modes.append(g[:, None] * rng.normal(size=3))
    id_basis = np.stack([m / np.sqrt(np.mean(np.sum(m ** 2, 1))) for m in modes], 2)
    mouth = np.exp(-(x ** 2 / (2 * 20.0 ** 2) + (y + 45) ** 2 / (2 * 10.0 ** 2)))
    exp_basis = np.stack([np.stack([0 * x, -mouth, 0.3 * mouth], 1),
                          np.stack([0.2 * x / 20 * mouth, 0.5 * mouth, 0 * x], 1)], 2)
    layout = _landmark_layout()
    lm = np.argmin(((mean[None, :, :2] - layout[:, None, :]) ** 2).sum(-1), axis=1)
    return MorphableModel(
        mean=mean, id_basis=id_basis, id_std=np.array([4.0, 4.0, 2.0, 1.5, 1.0, 1.0]),
        exp_basis=exp_basis, exp_std=np.array([3.0, 2.0]), triangles=np.array(tris),
        landmarks68=lm, face_region=(x / 55) ** 2 + (y / 70) ** 2 < 1.0, name="small-face",
        license="test", source="tests/synth/test_register.py")


@pytest.fixture(scope="module")
def small_model() -> MorphableModel:
    return small_face_model()


@pytest.fixture(scope="module")
def builtin_model() -> MorphableModel:
    from faceps.model import load_model

    return load_model("builtin")


def rotation(axis, degrees: float) -> np.ndarray:
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def smooth_field(points: np.ndarray, centres: np.ndarray, rng, amplitude: float,
                 width: float) -> np.ndarray:
    """Sum of Gaussian RBFs with random 3-vector amplitudes (mm): (N, 3)."""
    out = np.zeros_like(points)
    for c in centres:
        g = np.exp(-np.sum((points - c) ** 2, 1) / (2 * width ** 2))
        out += g[:, None] * rng.normal(0.0, amplitude, 3)
    return out


def resampled_scan(vertices: np.ndarray, triangles: np.ndarray, rng, holes=()) -> Scan:
    """The same surface with other vertices: midpoint subdivision, every vertex moved to a
    random point of one of its triangles (so it stays on the surface), and triangles near
    the ``holes`` centres (mm, radius 8) removed."""
    v, f = trimesh.remesh.subdivide(np.asarray(vertices, float), np.asarray(triangles))
    mesh = trimesh.Trimesh(v, f, process=False)
    first = mesh.vertex_faces[:, 0]
    target = np.einsum("nk,nkc->nc", rng.dirichlet([1, 1, 1], len(v)), v[f[first]])
    v = v + 0.4 * (target - v)
    keep = np.ones(len(f), bool)
    centres = v[f].mean(1)
    for h in holes:
        keep &= np.linalg.norm(centres - h, axis=1) > 8.0
    return Scan(v, f[keep])


# ------------------------------------------------------------------------- loading
def test_load_obj_texture_quads_and_seams(tmp_path):
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:, :4] = (0, 0, 200)   # BGR on disk: left half red
    tex[:, 4:] = (200, 0, 0)   # right half blue
    import cv2

    cv2.imwrite(str(tmp_path / "skin.png"), tex)
    (tmp_path / "m.mtl").write_text("newmtl skin\nKd 1 1 1\nmap_Kd -bm 0.5 skin.png\n")
    lines = ["mtllib m.mtl", "usemtl skin"]
    lines += [f"v {x} {y} 0" for y in range(2) for x in range(3)]
    lines += ["vt 0.2 0.5", "vt 0.25 0.5", "vt 0.3 0.5", "vt 0.7 0.5", "vt 0.75 0.5", "vt 0.8 0.5"]
    # two quads; the middle column is a texture seam (different vt on each side)
    lines += ["f 1/1 2/2 5/2 4/1", "f 2/4 3/6 6/6 5/4"]
    (tmp_path / "tex.obj").write_text("\n".join(lines) + "\n")

    scan = load_scan(tmp_path / "tex.obj", scale=10.0)
    assert scan.n_vertices == 6 and scan.n_triangles == 4      # seam merged, quads split
    assert scan.vertices.dtype == np.float64
    assert_close(scan.vertices[:3], [[0, 0, 0], [10, 0, 0], [20, 0, 0]])
    red = float(srgb_to_linear(np.array(200 / 255)))
    assert_close(scan.colors[[0, 3]], [[red, 0, 0]] * 2, atol=1e-5)
    assert_close(scan.colors[[2, 5]], [[0, 0, red]] * 2, atol=1e-5)
    assert_close(scan.colors[[1, 4]], [[red / 2, 0, red / 2]] * 2, atol=1e-5)  # seam average
    assert scan.path == str(tmp_path / "tex.obj")


def test_load_ply_vertex_colors(tmp_path):
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.05)
    rgb = (np.abs(mesh.vertices) / 0.05 * 255).astype(np.uint8)
    mesh.visual.vertex_colors = np.c_[rgb, np.full(len(rgb), 255, np.uint8)]
    mesh.export(tmp_path / "ball.ply")
    scan = load_scan(tmp_path / "ball.ply", scale=1000.0)
    assert scan.triangles.shape == (320, 3)
    assert_close(np.linalg.norm(scan.vertices, axis=1), np.full(162, 50.0), atol=1e-4)
    assert_close(scan.colors, srgb_to_linear(rgb / 255.0), atol=1e-6)
    assert load_scan(tmp_path / "ball.ply", color_encoding="linear").colors.max() <= 1.0


@pytest.mark.parametrize("name, content", [
    ("missing.obj", None),
    ("empty.obj", ""),
    ("no_faces.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n"),
    ("words.obj", "this is not a mesh\n"),
    ("garbage.ply", "hello\n"),
    ("scan.stl", "solid x\nendsolid x\n"),
])
def test_bad_scan_files_raise_scan_error(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ScanError, match=name.replace(".", r"\.")):
        load_scan(path)


def test_point_cloud_and_empty_arrays_are_not_scans(tmp_path):
    trimesh.PointCloud(np.random.default_rng(0).normal(size=(50, 3))).export(tmp_path / "pc.ply")
    with pytest.raises(ScanError, match="pc.ply"):
        load_scan(tmp_path / "pc.ply")
    with pytest.raises(ScanError, match="empty"):
        Scan(np.zeros((0, 3)), np.zeros((0, 3), int))
    with pytest.raises(ScanError):
        Scan(np.zeros((3, 3)), np.array([[0, 1, 3]]))


# --------------------------------------------------------------------- small pieces
def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(40, 3)) * 30
    true = Similarity(1.3, rotation([1, 2, 3], 40.0), np.array([5.0, -2.0, 100.0]))
    est = umeyama(src, true.apply(src))
    assert_close(est.scale, true.scale, atol=1e-9)
    assert_close(est.rotation, true.rotation, atol=1e-9)
    assert_close(est.translation, true.translation, atol=1e-7)
    assert_close(est.inverse().compose(est).matrix, np.eye(4), atol=1e-9)


def test_estimate_scan_scale_snaps_to_units(small_model):
    G = small_model.geometry()
    tris = small_model.triangles
    assert estimate_scan_scale(Scan(G / 1000.0, tris), small_model) == 1000.0
    assert estimate_scan_scale(Scan(G / 10.0, tris), small_model) == 10.0
    assert estimate_scan_scale(Scan(G / 25.4, tris), small_model) == 25.4
    assert estimate_scan_scale(Scan(G, tris), small_model) == 1.0
    # landmarks in a made-up unit: the eye-corner ratio itself
    lm = small_model.landmark_points(G) * 0.37
    k = estimate_scan_scale(Scan(G * 0.37, tris), small_model, lm)
    assert k == pytest.approx(1 / 0.37, rel=1e-6)


def test_fit_coefficients_recovers_known_coefficients(small_model):
    a_id = np.array([1.0, -0.5, 0.8, 0.3, -1.2, 0.4])
    a_exp = np.array([0.7, -0.4])
    sim = Similarity(1.1, rotation([0, 1, 0.2], 15.0), np.array([3.0, -4.0, 250.0]))
    target = sim.apply(small_model.geometry(a_id, a_exp))
    fit = fit_coefficients(small_model, target, regularization=0.0)
    assert_close(fit.alpha_id, a_id, atol=1e-6)
    assert_close(fit.alpha_exp, a_exp, atol=1e-6)
    assert_close(fit.similarity.scale, 1.1, atol=1e-8)
    assert fit.residual < 1e-6
    # Tikhonov shrinks the coefficients toward zero
    reg = fit_coefficients(small_model, target, regularization=50.0)
    assert np.linalg.norm(reg.alpha_id) < np.linalg.norm(a_id)


def test_closest_points_rejects_border_and_back_facing():
    # a 100 x 100 mm plane (normal +z) with a square hole in the middle
    xs = np.linspace(-50, 50, 21)
    X, Y = np.meshgrid(xs, xs)
    V = np.stack([X, Y, 0 * X], -1).reshape(-1, 3)
    F = []
    for r in range(20):
        for c in range(20):
            if 8 <= r < 12 and 8 <= c < 12:
                continue
            a = r * 21 + c
            F += [[a, a + 1, a + 22], [a, a + 22, a + 21]]
    scan = Scan(V, np.array(F))
    pts = np.array([[-30.0, -30.0, 2.0],   # above the surface: accepted
                    [0.0, 0.0, 2.0],       # above the hole: closest point on its border
                    [30.0, 30.0, 2.0],     # facing the other way: rejected by the normal test
                    [80.0, 0.0, 1.0]])     # beyond the outer border
    normals = np.array([[0, 0, 1.0], [0, 0, 1.0], [0, 0, -1.0], [0, 0, 1.0]])
    corr = closest_points(scan, pts, normals)
    assert corr.valid.tolist() == [True, False, False, False]
    assert_close(corr.points[0], [-30.0, -30.0, 0.0], atol=1e-4)
    assert_close(corr.distance[0], 2.0, atol=1e-4)
    assert_close(corr.barycentric.sum(1), np.ones(4), atol=1e-9)
    far = closest_points(scan, pts[:1] + [0, 0, 50.0], normals[:1],
                         RegistrationConfig(max_distance=20.0))
    assert not far.valid[0]


def test_config_validation():
    for bad in (dict(scan_scale="inches"), dict(scan_scale=-1.0), dict(template_region="x"),
                dict(alphas=()), dict(normal_angle=0.0), dict(betas=(-1.0,)),
                dict(max_iterations=0), dict(anderson_window=-1)):
        with pytest.raises(ConfigError):
            RegistrationConfig(**bad).validate()
    cfg = RegistrationConfig(alphas=(10.0, 5.0, 1.0), betas=(1.0, 0.5, 0.25, 0.1))
    assert cfg.beta_schedule() == [1.0, 0.5, 0.25]
    assert RegistrationConfig(alphas=(3.0, 2.0), betas=None).beta_schedule() == [0.0, 0.0]
    assert cfg.to_dict()["alphas"] == [10.0, 5.0, 1.0]


# --------------------------------------------------------------------- registration
def test_registering_the_template_to_itself(small_model):
    G = small_model.geometry()
    colors = np.clip((G - G.min(0)) / np.ptp(G, axis=0), 0, 1)
    scan = Scan(G, small_model.triangles, colors, "self")
    reg = register_scan(scan, small_model, config=RegistrationConfig(**FAST), progress=True)
    err = np.linalg.norm(reg.vertices - G, axis=1)
    assert err.mean() < 0.05 and err.max() < 0.5, (err.mean(), err.max())
    assert reg.valid.mean() > 0.95
    assert reg.converged
    assert reg.scan_scale == 1.0
    assert reg.vertices.shape == (small_model.n_vertices, 3) and reg.vertices.dtype == np.float64
    transferred = reg.transfer_colors(scan)
    ok = reg.valid
    assert_close(transferred[ok], colors[ok], atol=5e-3)
    assert np.all(np.isnan(transferred[~ok]))
    assert reg.coefficient_residual < 0.05
    assert_close(reg.similarity.scale, 1.0, atol=1e-3)
    assert len(reg.history) == len(FAST["alphas"])
    assert set(reg.timings) >= {"setup", "alignment", "nicp", "coefficients", "total"}
    summary = reg.summary()
    assert summary["n_vertices"] == small_model.n_vertices and summary["converged"]
    with pytest.raises(ScanError, match="no colours"):
        reg.transfer_colors(Scan(G, small_model.triangles))
    with pytest.raises(ScanError, match="not the registered scan"):
        reg.transfer_colors(Scan(G[:-1], small_model.triangles[:10], colors[:-1]))


def deformed_builtin(model: MorphableModel, seed: int):
    """The model's mean under a smooth RBF field (2 mm RMS over the face region) and a
    similarity, and a resampled scan of it with a hole on the right cheek and three
    elsewhere. Returns (deformed vertices (V, 3), scan, cheek hole centre (3,))."""
    rng = np.random.default_rng(seed)
    G = model.geometry()
    region = model.region
    centres = G[region][rng.choice(int(region.sum()), 6, replace=False)]
    field = smooth_field(G, centres, rng, amplitude=1.0, width=40.0)
    field *= 2.0 / np.sqrt(np.mean(np.sum(field[region] ** 2, axis=1)))
    true_sim = Similarity(1.05, rotation([0.3, 1.0, 0.2], 8.0), np.array([20.0, -10.0, 30.0]))
    deformed = true_sim.apply(G + field)
    face_ids = np.nonzero(region)[0]
    offset = G[face_ids] - G[face_ids].mean(0) - [-40.0, -20.0, 0.0]
    cheek = deformed[face_ids[np.argmin(np.linalg.norm(offset, axis=1))]]
    others = np.nonzero(~region)[0] if (~region).any() else face_ids
    holes = [cheek] + list(deformed[rng.choice(others, 3)])
    return deformed, resampled_scan(deformed, model.triangles, rng, holes), cheek


@pytest.mark.parametrize("use_landmarks", [False, True], ids=["no-landmarks", "landmarks"])
def test_recovers_a_known_smooth_deformation(builtin_model, use_landmarks, record_property):
    """The template deformed by a smooth field (a few mm) and a similarity, resampled into a
    scan with other vertices and holes: the registered vertices must land on the true
    deformed positions (a correspondence error, not only a distance to the surface; the
    tangential part of the field is only recoverable through the shape's features)."""
    model = builtin_model
    deformed, scan, cheek = deformed_builtin(model, seed=7)
    landmarks = None
    if use_landmarks:
        landmarks = model.landmark_points(deformed)
        landmarks[[0, 16]] = np.nan                     # missing points are allowed
    config = RegistrationConfig(template_region="crop", **FAST)
    reg = register_scan(scan, model, scan_landmarks=landmarks, config=config)

    truth = deformed[reg.vertex_ids]
    err = np.linalg.norm(reg.vertices - truth, axis=1)
    record_property("mean_error_mm", float(err.mean()))
    record_property("max_error_mm", float(err.max()))
    record_property("seconds", reg.timings["total"])
    assert np.array_equal(reg.vertex_ids, np.nonzero(model.region)[0])
    assert err.mean() < 1.0, f"mean error {err.mean():.3f} mm (max {err.max():.3f} mm)"
    # the largest errors are at the template's cut border, which slides freely on the scan
    p95 = np.percentile(err, 95)
    assert p95 < 2.0, f"95th percentile {p95:.3f} mm (max {err.max():.3f} mm)"
    over_hole = np.linalg.norm(reg.vertices - cheek, axis=1) < 4.0
    assert over_hole.any() and not reg.valid[over_hole].any()   # closest points on its border
    assert reg.valid.mean() > 0.9
    assert reg.converged
    assert reg.correspondences.distance[reg.valid].mean() < 0.2
    assert_close(reg.initial_similarity.scale, 1.05, atol=0.03)
    assert_close(reg.similarity.scale, 1.05, atol=0.03)


def test_fit_error_when_registration_cannot_proceed(small_model):
    G = small_model.geometry()
    scan = Scan(G, small_model.triangles)
    too_few = np.full((68, 3), np.nan)
    too_few[:3] = small_model.landmark_points(G)[:3]
    with pytest.raises(FitError, match="landmark"):
        register_scan(scan, small_model, scan_landmarks=too_few)
    # a scan 200 mm away from where its landmarks put the face: nothing within 5 mm
    lm = small_model.landmark_points(G)
    far = Scan(G + [0.0, 0.0, 200.0], small_model.triangles)
    with pytest.raises(FitError, match="correspondences"):
        register_scan(far, small_model, scan_landmarks=lm,
                      config=RegistrationConfig(max_distance=5.0, betas=None))


# ------------------------------------------------------------------------ real scan
@pytest.fixture(scope="module")
def lps_scan() -> Scan:
    if not LPS_SCAN.is_file():
        pytest.skip(f"{LPS_SCAN} not available")
    return load_scan(LPS_SCAN)


def test_lee_perry_smith_units_and_orientation(lps_scan, builtin_model):
    """The scan is a closed head-and-shoulders mesh in metres, y up, face toward +z."""
    V = lps_scan.vertices
    assert estimate_scan_scale(lps_scan, builtin_model) == 1000.0
    extent = np.ptp(V, axis=0) * 1000.0
    assert 350 < extent[0] < 550 and 350 < extent[1] < 500      # shoulders to crown
    front = V[np.argmax(V[:, 2])] * 1000.0
    assert abs(front[0]) < 5.0                                   # the nose tip, mid-sagittal
    assert V[:, 1].max() * 1000.0 - front[1] > 120.0             # crown well above the nose
    F = lps_scan.triangles
    volume = np.einsum("ij,ij->i", V[F[:, 0]], np.cross(V[F[:, 1]], V[F[:, 2]])).sum() / 6
    assert volume > 0                                            # wound outward


def test_registers_the_lee_perry_smith_scan(lps_scan, builtin_model, record_property):
    t0 = time.perf_counter()
    config = RegistrationConfig(template_region="crop", alphas=(50.0, 20.0, 7.0, 3.0, 2.0, 1.0),
                                betas=(1.0, 0.3), max_iterations=15)
    reg = register_scan(lps_scan, builtin_model, config=config)
    seconds = time.perf_counter() - t0
    assert reg.scan_scale == 1000.0
    face = builtin_model.region[reg.vertex_ids]
    d = reg.correspondences.distance[face]
    record_property("mean_distance_mm", float(d.mean()))
    record_property("median_distance_mm", float(np.median(d)))
    record_property("seconds", seconds)
    assert reg.converged
    assert d.mean() < 1.0, f"mean distance {d.mean():.3f} mm (median {np.median(d):.3f})"
    assert np.median(d) < 0.5
    assert reg.valid[face].mean() > 0.95
    # the registered nose tip (the template's most forward vertex) is at the scan's
    S = lps_scan.vertices * reg.scan_scale
    front = S[np.argmax(S[:, 2])]
    tip = reg.vertices[np.argmax(builtin_model.mean[reg.vertex_ids, 2])]
    assert np.linalg.norm(tip - front) < 5.0, (tip, front)
    # the coarse proxy follows the scan to a few mm, upright and unmirrored
    assert reg.coefficient_residual < 4.0
    assert np.linalg.det(reg.similarity.rotation) > 0
    assert reg.similarity.rotation[1, 1] > 0.95
