"""End to end: synthetic session -> `faceps reconstruct` -> contract 2, scored against the
ground truth the synthesiser wrote."""

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.cli import main
from faceps.core import Camera, ConfigError
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.optimize.fit import proxy_maps
from faceps.optimize.reconstruct import (
    ReconstructConfig,
    downscale_capture,
    height_field_mesh,
    reconstruct,
)
from faceps.synth.session import SessionSynthConfig, synth_session

SIZE = (480, 360)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def session(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("rec") / "s"
    synth_session(d, seed=3, model=model,
                  config=SessionSynthConfig(size=SIZE, landmark_noise_px=1.0))
    return d


@pytest.fixture(scope="module")
def reconstructed(session, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec-out") / "out"
    assert main(["reconstruct", str(session), "--out", str(out), "-q"]) == 0
    return out


def test_contract_2_files(reconstructed):
    W, H = SIZE
    names = {"normals.npy", "depth.npy", "albedo.npy", "mask.png", "lights.json", "proxy.json",
             "mesh.ply", "normals.png", "albedo.png", "shading.png", "report.json"}
    assert names <= {p.name for p in reconstructed.iterdir()}
    assert not [p for p in reconstructed.iterdir() if p.name.startswith(".")], "temporaries"
    n = np.load(reconstructed / "normals.npy")
    z = np.load(reconstructed / "depth.npy")
    a = np.load(reconstructed / "albedo.npy")
    m = cv2.imread(str(reconstructed / "mask.png"), cv2.IMREAD_UNCHANGED)
    assert n.shape == (H, W, 3) and n.dtype == np.float32
    assert z.shape == (H, W) and z.dtype == np.float32
    assert a.shape == (H, W, 3) and a.dtype == np.float32
    assert m.shape == (H, W) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    inside = m > 0
    assert inside.sum() > 1000
    # NaN exactly outside the mask, finite inside
    for arr in (n, a):
        assert np.all(np.isfinite(arr[inside])) and np.all(np.isnan(arr[~inside]))
    assert np.all(np.isfinite(z[inside])) and np.all(np.isnan(z[~inside]))
    np.testing.assert_allclose(np.linalg.norm(n[inside], axis=-1), 1.0, atol=1e-4)
    assert np.mean(n[inside][:, 2] < 0) > 0.99, "normals face the camera"
    assert 200 < np.median(z[inside]) < 2000
    lights = json.loads((reconstructed / "lights.json").read_text())["lights"]
    assert set(lights) == {"left", "front", "right"}
    proxy = json.loads((reconstructed / "proxy.json").read_text())
    assert proxy["model"] == load_model("builtin").name
    report = json.loads((reconstructed / "report.json").read_text())
    for key in ("fit", "proxy_maps", "normal_albedo_0", "height_field_0", "total"):
        assert report["timings"][key] >= 0
    assert report["lights_source"] == "session"
    assert report["passes"][0]["height_field"]["history"]
    # the passes cap their height-field iterations on purpose; a clean synthetic session
    # gives nothing to warn about
    assert report["warnings"] == []


def test_mesh_matches_depth(reconstructed):
    import trimesh

    mesh = trimesh.load(reconstructed / "mesh.ply", process=False)
    z = np.load(reconstructed / "depth.npy")
    assert len(mesh.vertices) == int(np.isfinite(z).sum())
    np.testing.assert_allclose(np.sort(mesh.vertices[:, 2]), np.sort(z[np.isfinite(z)]),
                               rtol=1e-5)
    # faces are oriented toward the camera (counter-clockwise seen from outside)
    fn = mesh.face_normals
    assert np.mean(fn[:, 2] < 0) > 0.95


def test_accuracy_against_ground_truth(session, reconstructed):
    gt = session / "ground_truth"
    gtn = np.load(gt / "normals.npy")
    face = (cv2.imread(str(gt / "face_mask.png"), 0) > 0) & (cv2.imread(str(gt / "mask.png"),
                                                                         0) > 0)
    n = np.load(reconstructed / "normals.npy")
    m = face & np.all(np.isfinite(n), -1) & np.all(np.isfinite(gtn), -1)
    assert m.sum() >= 0.9 * face.sum(), "coverage of the visible face"
    err = angular_error_deg(n[m], gtn[m])
    # at 480x360 the fine detail is below a pixel (the true coarse surface is within about
    # 2 degrees of the ground truth here): a guard against regressions; the accuracy
    # targets at capture resolution are measured by the benchmarks
    assert np.mean(err) < 6.0 and np.median(err) < 4.5, (np.mean(err), np.median(err))
    z = np.load(reconstructed / "depth.npy")
    gz = np.load(gt / "depth.npy")
    dm = m & np.isfinite(z) & np.isfinite(gz)
    d = z[dm] - gz[dm]
    assert np.mean(np.abs(d - np.median(d))) < 2.0


def test_dark_noisy_capture_leans_on_the_proxy(model, tmp_path, capsys):
    """Four stops under-exposed, 8-bit: the face sits at sRGB codes 30-40, where read
    noise and quantisation are about 13 % of its level. The normal update measures that
    noise and weighs its data term down (``noise_adaptive``), so the normals stay better
    than the fitted proxy; with the weights tuned for well-exposed images they were worse
    (8.9 against 5.1 deg here, the proxy 5.4). The command warns about the noise."""
    from faceps.synth.render import SensorConfig

    d = tmp_path / "dark"
    synth_session(d, seed=3, model=model, config=SessionSynthConfig(
        size=SIZE, landmark_noise_px=1.0, sensor=SensorConfig(auto_target=0.06)))
    out = tmp_path / "out"
    assert main(["reconstruct", str(d), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: the images are noisy" in printed, printed
    report = json.loads((out / "report.json").read_text())
    na = report["passes"][-1]["normal_albedo"]
    assert na["noise"] > 0.08 and na["noise_factor"] > 2.0, na

    gt = d / "ground_truth"
    gtn = np.load(gt / "normals.npy")
    face = (cv2.imread(str(gt / "face_mask.png"), 0) > 0) & (cv2.imread(str(gt / "mask.png"),
                                                                         0) > 0)
    cap = load_session(d)
    fixed = reconstruct(cap, model, replace(ReconstructConfig(), normal_albedo=replace(
        ReconstructConfig().normal_albedo, noise_adaptive=False)))
    # the fitted proxy (the same fit in both runs: the fit does not use the update)
    proxy = proxy_maps(model, fixed.fit.proxy, cap)["normals"]
    errors = {}
    for name, n in (("adaptive", np.load(out / "normals.npy")), ("fixed", fixed.normals),
                    ("proxy", proxy)):
        m = face & np.all(np.isfinite(n), -1) & np.all(np.isfinite(gtn), -1)
        errors[name] = float(angular_error_deg(n[m], gtn[m]).mean())
    assert errors["adaptive"] < 0.75 * errors["fixed"], errors
    assert errors["adaptive"] < errors["proxy"] + 0.5, errors
    assert not any("noisy" in w for w in fixed.report["warnings"])


def test_over_exposed_capture_warns_about_clipping(model, reconstructed, tmp_path):
    """Two stops over-exposed, most of the face clips in some image: the reconstruction
    still runs and says why its normals rest on fewer lights; a well-exposed session
    (the module's) carries no such warning."""
    from faceps.synth.render import SensorConfig

    d = tmp_path / "bright"
    synth_session(d, seed=3, model=model, config=SessionSynthConfig(
        size=SIZE, landmark_noise_px=1.0, sensor=SensorConfig(auto_target=3.2)))
    rec = reconstruct(load_session(d), model)
    clip = [w for w in rec.report["warnings"] if "clipped" in w]
    assert len(clip) == 1 and int(clip[0].split(" %")[0]) >= 50, rec.report["warnings"]
    # its few unclipped samples are dim, but the advice is the clipping one alone
    assert not [w for w in rec.report["warnings"] if "noisy" in w], rec.report["warnings"]
    assert rec.mask.sum() > 0
    report = json.loads((reconstructed / "report.json").read_text())
    assert not [w for w in report["warnings"] if "clipped" in w or "noisy" in w]


def test_downscale_capture_keeps_geometry(session):
    cap = load_session(session)
    small = downscale_capture(cap, 240)
    assert (small.width, small.height) == (240, 180)
    assert small.images.shape == (3, 180, 240, 3)
    # a 3D point projects to corresponding pixels (pixel-centre convention)
    X = np.array([[10.0, -20.0, 500.0]])
    uv_full = cap.camera.project(X)[0]
    uv_small = small.camera.project(X)[0]
    np.testing.assert_allclose(uv_small, (uv_full + 0.5) * 0.5 - 0.5, atol=1e-9)
    np.testing.assert_allclose(small.landmarks, (cap.landmarks + 0.5) * 0.5 - 0.5, atol=1e-9)
    # per-channel saturation follows (a pixel is clipped where any averaged one is)
    flags = np.zeros_like(cap.saturated_channels)
    flags[1, 100, 200, 0] = True
    clipped = downscale_capture(replace(cap, saturated=flags.any(-1), saturated_channels=flags),
                                240)
    assert clipped.saturated_channels.shape == (3, 180, 240, 3)
    assert np.argwhere(clipped.saturated_channels).tolist() == [[1, 50, 100, 0]]
    np.testing.assert_array_equal(clipped.saturated_channels.any(-1), clipped.saturated)
    assert downscale_capture(cap, 10_000) is cap


def test_height_field_mesh_triangulates_a_plane():
    cam = Camera.from_fov((8, 6), 40.0)
    z = np.full((6, 8), 300.0)
    z[0, 0] = np.nan
    mesh = height_field_mesh(z, cam)
    assert len(mesh.vertices) == 47
    # 7x5 blocks = 35 quads, one of them with three corners -> 34 * 2 + 1 triangles
    assert len(mesh.faces) == 69
    assert np.all(mesh.face_normals[:, 2] < 0)


def test_black_images_fail_with_one_line(session, tmp_path, capsys):
    import shutil

    d = tmp_path / "black"
    shutil.copytree(session, d)
    spec = json.loads((d / "session.json").read_text())
    for entry in spec["images"]:
        img = cv2.imread(str(d / entry["path"]), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(d / entry["path"]), np.zeros_like(img))
    out = tmp_path / "out"
    assert main(["reconstruct", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and any(w in err[0] for w in ("black", "dark", "lit")), err
    assert not out.exists() or not any(out.iterdir())


def test_saturated_images_fail_with_one_line(session, tmp_path, capsys):
    """Every pixel clipped in every channel: exit 2, one line naming the session folder
    and the cause, no output."""
    import shutil

    d = tmp_path / "white"
    shutil.copytree(session, d)
    spec = json.loads((d / "session.json").read_text())
    for entry in spec["images"]:
        img = cv2.imread(str(d / entry["path"]), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(d / entry["path"]), np.full_like(img, 255))
    out = tmp_path / "out"
    assert main(["reconstruct", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(d) in err[0] and "saturated" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_break_ratio_option(session, tmp_path, capsys):
    """--break-ratio reaches the height field (report.json records it); a negative one is
    refused with one line naming it and no output."""
    out = tmp_path / "brk"
    assert main(["reconstruct", str(session), "--out", str(out), "-q",
                 "--break-ratio", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["height_field"]["break_ratio"] == 3.0
    z = np.load(out / "depth.npy")
    assert np.isfinite(z).sum() > 1000
    bad = tmp_path / "bad"
    assert main(["reconstruct", str(session), "--out", str(bad), "--break-ratio", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "break_ratio" in err[0], err
    assert not bad.exists()


def test_distance_search_scales_the_proxy(session, reconstructed, tmp_path, capsys):
    """With the session's lights the proxy is moved to the distance the images prefer
    (report.json records the search); ``--distance off`` keeps the fitted distance, and
    the depth of the two differs by the factor found."""
    report = json.loads((reconstructed / "report.json").read_text())
    dist = report["distance"]
    assert report["config"]["distance"] == "auto"
    assert 0.9 < dist["scale"] < 1.1 and len(dist["samples"]) >= 3
    assert report["timings"]["distance"] > 0
    out = tmp_path / "off"
    assert main(["reconstruct", str(session), "--out", str(out), "-q",
                 "--distance", "off"]) == 0
    assert "distance scaled" not in capsys.readouterr().out
    off = json.loads((out / "report.json").read_text())
    assert off["distance"] is None and "distance" not in off["timings"]
    z_on, z_off = np.load(reconstructed / "depth.npy"), np.load(out / "depth.npy")
    both = np.isfinite(z_on) & np.isfinite(z_off)
    ratio = np.median(z_on[both]) / np.median(z_off[both])
    assert ratio == pytest.approx(dist["scale"], abs=0.003), (ratio, dist["scale"])
    # a session without lights calibrates them against the proxy: no search
    cap = load_session(session)
    cap_nolights = replace(cap, lights=None)
    rec = reconstruct(cap_nolights, load_model("builtin"), ReconstructConfig(
        max_size=240))
    assert rec.report["lights_source"] == "calibrated" and rec.report["distance"] is None


def _face_error(session, out) -> float:
    gt = session / "ground_truth"
    gtn = np.load(gt / "normals.npy")
    face = cv2.imread(str(gt / "face_mask.png"), 0) > 0
    n = np.load(out / "normals.npy")
    m = face & np.all(np.isfinite(n), -1) & np.all(np.isfinite(gtn), -1)
    return float(np.mean(angular_error_deg(n[m], gtn[m])))


def test_refinement_pass_uses_the_height_field_normals(session, reconstructed, tmp_path):
    """The default refinement pass solves the update again with the height field's normals
    as the prior: its normals end closer to an integrable surface and to the truth than
    one pass alone (measured on this session: 2.85 against 3.09 degrees, normal gap 1.14
    against 1.60), and its height field refines the first one in one iteration."""
    report = json.loads((reconstructed / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == [0, 1]
    # one full-size Gauss-Newton iteration in each height field (the first is refined)
    assert [p["height_field"]["iterations"] for p in report["passes"]] == [1, 1]
    assert report["config"]["refine_passes"] == 1
    one = tmp_path / "one"
    assert main(["reconstruct", str(session), "--out", str(one), "-q", "--passes", "0"]) == 0
    single = json.loads((one / "report.json").read_text())
    assert len(single["passes"]) == 1
    gap, gap_one = (r["height_field"]["normal_gap_deg"]["mean"] for r in (report, single))
    assert gap < gap_one, (gap, gap_one)
    err, err_one = _face_error(session, reconstructed), _face_error(session, one)
    assert err < err_one, (err, err_one)


@pytest.mark.parametrize("kwargs", [{"refine_pass_mu1": -0.1}, {"refine_pass_mu1": float("nan")},
                                    {"refine_pass_iterations": 0}, {"distance": "far"},
                                    {"lead_refine_iterations": -1}])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        ReconstructConfig(**kwargs)
