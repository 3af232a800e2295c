"""Synthetic sessions follow the imaging model with their own ground truth."""

import json

import cv2
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.cli import main
from faceps.core import ConfigError, shade_point
from faceps.model import load_model
from faceps.synth.faces import FaceConfig
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.session import SessionSynthConfig, synth_session

SMALL = (480, 360)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def eq1_ratio(session_dir):
    cap = load_session(session_dir)
    gt = session_dir / "ground_truth"
    N, A = np.load(gt / "normals.npy"), np.load(gt / "albedo.npy")
    D = np.load(gt / "depth.npy")
    P = cap.camera.backproject(D)
    from faceps.core import PointLights

    lights = PointLights.from_dict(json.loads((gt / "lights.json").read_text())["lights"],
                                   order=cap.light_names)
    pred = shade_point(np.nan_to_num(P), np.nan_to_num(N), np.nan_to_num(A), lights)
    return cap, pred


def test_lambertian_16bit_session_is_eq1_exactly(tmp_path, model):
    cfg = SessionSynthConfig(size=SMALL, encoding="linear", bit_depth=16,
                             shading=ShadingConfig(lambertian=True, cast_shadows=True),
                             sensor=SensorConfig(full_well=0, read_noise=0))
    r = synth_session(tmp_path / "s", seed=3, model=model, config=cfg)
    cap, pred = eq1_ratio(r.path)
    rf = r.rendered
    lit = (rf.mask[None] & ~rf.shadow & ~cap.saturated & (pred.min(-1) > 0.02))
    assert lit.sum() > 0.3 * rf.mask.sum()
    ratio = cap.images[lit] / pred[lit]
    # 16-bit quantisation and float32 depth are the only differences
    assert np.abs(ratio - 1).max() < 0.01
    # cast shadows are dark in the image although eq. 1 predicts light there
    shadowed = rf.mask[None] & rf.shadow & (pred.min(-1) > 0.02)
    if shadowed.any():
        assert np.all(cap.images[shadowed] < 1e-3)


def test_default_session_consistent_to_a_few_percent(tmp_path, model):
    r = synth_session(tmp_path / "s", seed=11, model=model,
                      config=SessionSynthConfig(size=SMALL))
    cap, pred = eq1_ratio(r.path)
    rf = r.rendered
    lit = rf.mask[None] & ~rf.shadow & ~cap.saturated & (pred.mean(-1) > 0.1)
    ratio = (cap.images[lit] / pred[lit]).mean(-1)
    # noise, 8-bit sRGB and the specular sheen are what differ
    assert abs(np.median(ratio) - 1) < 0.03
    assert np.mean(np.abs(ratio - 1) < 0.1) > 0.85, "outside highlights within 10 %"


def test_ground_truth_files_follow_contract_3(tmp_path, model):
    r = synth_session(tmp_path / "s", seed=5, model=model, config=SessionSynthConfig(size=SMALL))
    gt = r.path / "ground_truth"
    names = {p.name for p in gt.iterdir()}
    assert {"normals.npy", "depth.npy", "albedo.npy", "mask.png", "lights.json", "params.json",
            "landmarks.json"} <= names
    N, D, A = np.load(gt / "normals.npy"), np.load(gt / "depth.npy"), np.load(gt / "albedo.npy")
    W, H = SMALL
    assert N.shape == (H, W, 3) and D.shape == (H, W) and A.shape == (H, W, 3)
    assert N.dtype == D.dtype == A.dtype == np.float32
    mask = cv2.imread(str(gt / "mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert np.all(np.isnan(D[~mask])) and np.all(np.isfinite(D[mask]))
    assert np.allclose(np.linalg.norm(N[mask], axis=-1), 1, atol=1e-4)
    assert np.mean(N[mask][:, 2] < 0) > 0.97  # the face looks at the camera
    assert 300 < np.nanmedian(D) < 900
    params = json.loads((gt / "params.json").read_text())
    assert len(params["coefficients"]["id"]) == model.n_id
    lm = np.array(json.loads((gt / "landmarks.json").read_text()))
    assert lm.shape == (68, 2)
    cap = load_session(r.path)
    assert cap.n_images == 3 and cap.lights is not None and cap.landmarks is not None
    assert np.allclose(cap.landmarks, lm, atol=0.01)
    # nothing left behind under a temporary name
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_same_seed_same_session(tmp_path, model):
    cfg = SessionSynthConfig(size=(160, 120), face=FaceConfig())
    a = synth_session(tmp_path / "a", seed=7, model=model, config=cfg)
    b = synth_session(tmp_path / "b", seed=7, model=model, config=cfg)
    for name in ("left.png", "front.png", "right.png"):
        ia = cv2.imread(str(a.path / name), cv2.IMREAD_UNCHANGED)
        ib = cv2.imread(str(b.path / name), cv2.IMREAD_UNCHANGED)
        assert ia is not None and np.array_equal(ia, ib)


def test_existing_folder_is_not_overwritten(tmp_path, model):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists"):
        synth_session(out, seed=1, model=model, config=SessionSynthConfig(size=(64, 48)))
    assert (out / "keep.txt").exists()


def test_cli_synth_session(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "session", "--out", str(out), "--seed", "2", "--size", "320x240",
                 "--lights", "2"]) == 0
    cap = load_session(out)
    assert cap.n_images == 2 and cap.width == 320
    assert main(["synth", "session", "--out", str(out), "--seed", "2"]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_bumps_change_the_surface_not_the_proxy(tmp_path, capsys):
    """--bumps adds off-model shape to the ground-truth surface only: the same seed gives
    the same proxy (the face's own coarse surface) and a different detailed surface."""
    plain, bumpy = tmp_path / "plain", tmp_path / "bumpy"
    args = ["synth", "session", "--seed", "4", "--size", "320x240", "--no-noise"]
    assert main(args + ["--out", str(plain)]) == 0
    assert main(args + ["--out", str(bumpy), "--bumps", "6"]) == 0
    p0 = np.load(plain / "ground_truth/proxy_normals.npy")
    p1 = np.load(bumpy / "ground_truth/proxy_normals.npy")
    assert np.array_equal(p0, p1, equal_nan=True)
    n0 = np.load(plain / "ground_truth/normals.npy")
    n1 = np.load(bumpy / "ground_truth/normals.npy")
    both = np.all(np.isfinite(n0), -1) & np.all(np.isfinite(n1), -1)
    diff = np.degrees(np.arccos(np.clip((n0[both] * n1[both]).sum(-1), -1, 1)))
    assert both.sum() > 1000 and diff.mean() > 1.0
    params = json.loads((bumpy / "ground_truth/params.json").read_text())
    assert 0.0 < params["detail"]["bumps"] <= 6.0
    assert main(args + ["--out", str(tmp_path / "neg"), "--bumps", "-1"]) == 2
    assert "--bumps" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


def _dataset_face_config(tmp_path, *flags: str) -> dict:
    """Build a two-sample dataset with ``flags`` and return the random-face configuration
    its index records."""
    out = tmp_path / "d.h5"
    assert main(["synth", "dataset", "--n", "2", "--size", "32", *flags, "--out", str(out),
                 "-q"]) == 0
    index = json.loads((tmp_path / "d.index.json").read_text())
    return index["generator"]["config"]["face"]


def test_cli_dataset_bumps_reach_the_build_configuration(tmp_path):
    """`faceps synth dataset --bumps MM` renders with the bump range it records."""
    assert _dataset_face_config(tmp_path, "--bumps", "5")["detail"]["bumps"] == [0.0, 5.0]


def test_cli_face_only(tmp_path, capsys):
    """`--face-only 1` renders the face region alone (every rendered pixel is a face
    pixel) with the same proxy; the dataset build records the probability."""
    args = ["synth", "session", "--seed", "4", "--size", "320x240", "--no-noise"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert main(args + ["--out", str(tmp_path / "only"), "--face-only", "1"]) == 0
    import cv2

    def masks(d):
        gt = d / "ground_truth"
        return (cv2.imread(str(gt / "mask.png"), 0) > 0,
                cv2.imread(str(gt / "face_mask.png"), 0) > 0)

    full, full_face = masks(tmp_path / "full")
    only, _ = masks(tmp_path / "only")
    assert only.sum() < full.sum() and not np.any(only & ~full)
    assert (only & full_face).sum() > 0.8 * only.sum()
    params = json.loads((tmp_path / "only/ground_truth/params.json").read_text())
    assert params["face_only_rings"] is not None
    assert np.array_equal(np.load(tmp_path / "full/ground_truth/proxy_normals.npy"),
                          np.load(tmp_path / "only/ground_truth/proxy_normals.npy"),
                          equal_nan=True)
    assert main(args + ["--out", str(tmp_path / "bad"), "--face-only", "1.5"]) == 2
    assert "--face-only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert _dataset_face_config(tmp_path, "--face-only", "0.5")["face_only_prob"] == 0.5


def test_cli_exp_scale(tmp_path, capsys):
    """`--exp-scale S` scales the expression coefficients of the same draw (0: neutral
    faces); the dataset build records it; a negative scale exits 2."""
    args = ["synth", "session", "--seed", "5", "--size", "160x120", "--no-noise"]
    for name, scale in (("neutral", "0"), ("strong", "1.5")):
        assert main(args + ["--out", str(tmp_path / name), "--exp-scale", scale]) == 0
    assert main(args + ["--out", str(tmp_path / "default")]) == 0

    def exp(name):
        params = json.loads((tmp_path / name / "ground_truth/params.json").read_text())
        return np.asarray(params["coefficients"]["exp"], float)

    assert np.all(exp("neutral") == 0)
    assert np.abs(exp("default")).sum() > 0             # seed 5 draws an expression
    np.testing.assert_allclose(exp("strong"), exp("default") * 1.5 / 0.7, rtol=1e-6)
    assert main(args + ["--out", str(tmp_path / "bad"), "--exp-scale", "-1"]) == 2
    assert "--exp-scale" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert _dataset_face_config(tmp_path, "--exp-scale", "1.2")["exp_scale"] == 1.2


def test_cli_exp_rms(tmp_path, capsys):
    """`--exp-rms MM` draws the expression at the scale that moves the face region by MM
    mm RMS (the same draw scaled); the build records it; with --exp-scale, or negative,
    it exits 2 naming the flag and writes nothing."""
    from faceps.model import load_model
    from faceps.synth.faces import expression_scale

    args = ["synth", "session", "--seed", "5", "--size", "160x120", "--no-noise"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert main(args + ["--out", str(tmp_path / "mm"), "--exp-rms", "3"]) == 0

    def exp(name):
        params = json.loads((tmp_path / name / "ground_truth/params.json").read_text())
        return np.asarray(params["coefficients"]["exp"], float)

    scale = expression_scale(load_model("builtin"), 3.0)
    assert 0.3 < scale < 0.6
    np.testing.assert_allclose(exp("mm"), exp("default") * scale / 0.7, rtol=1e-6)
    for bad in (["--exp-rms", "-1"], ["--exp-rms", "3", "--exp-scale", "1"]):
        assert main(args + ["--out", str(tmp_path / "bad")] + bad) == 2
        assert "--exp-rms" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    face = _dataset_face_config(tmp_path, "--exp-rms", "4.5")
    assert face["exp_rms_mm"] == 4.5 and face["exp_scale"] == 0.7


def test_cli_id_scale(tmp_path, capsys):
    """`--id-scale S` scales the identity coefficients of the same draw; the dataset
    build records it; a negative or non-finite scale exits 2 naming the flag."""
    args = ["synth", "session", "--seed", "5", "--size", "160x120", "--no-noise"]
    for name, extra in (("default", []), ("wide", ["--id-scale", "1.5"]),
                        ("mean", ["--id-scale", "0"])):
        assert main(args + ["--out", str(tmp_path / name), *extra]) == 0

    def ident(name):
        params = json.loads((tmp_path / name / "ground_truth/params.json").read_text())
        return np.asarray(params["coefficients"]["id"], float)

    assert np.abs(ident("default")).sum() > 0
    np.testing.assert_allclose(ident("wide"), ident("default") * 1.5, rtol=1e-6)
    assert np.all(ident("mean") == 0)
    for bad in ("-1", "nan"):
        assert main(args + ["--out", str(tmp_path / "bad"), "--id-scale", bad]) == 2
        assert "--id-scale" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert _dataset_face_config(tmp_path, "--id-scale", "1.5")["id_scale"] == 1.5


def test_cli_plain_and_flat_albedo(tmp_path, capsys):
    """`--plain 1 --flat-albedo 1`: a session's face without fine detail and of one colour;
    the dataset build records both probabilities; a value outside [0, 1] exits 2."""
    args = ["synth", "session", "--seed", "4", "--size", "160x120", "--no-noise"]
    assert main(args + ["--out", str(tmp_path / "s"), "--plain", "1", "--flat-albedo", "1"]) == 0
    params = json.loads((tmp_path / "s/ground_truth/params.json").read_text())
    assert params["detail"]["forehead"] == 0 and params["detail"]["pores"] == 0
    albedo = np.load(tmp_path / "s/ground_truth/albedo.npy")
    face = np.all(np.isfinite(albedo), -1)
    assert face.sum() > 100 and albedo[face].std(0).max() < 1e-4
    for flag in ("--plain", "--flat-albedo"):
        assert main(args + ["--out", str(tmp_path / "bad"), flag, "2"]) == 2
        assert flag in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    cfg = _dataset_face_config(tmp_path, "--plain", "0.3", "--flat-albedo", "0.2")
    assert cfg["plain_prob"] == 0.3 and cfg["flat_albedo_prob"] == 0.2


def test_cli_smoothing(tmp_path, capsys):
    """`--smoothing A` reaches the face of a session (its parameters record it) and the
    configuration of a dataset build; a value outside [0, 1] exits 2 naming the flag."""
    args = ["synth", "session", "--seed", "4", "--size", "160x120", "--no-noise"]
    assert main(args + ["--out", str(tmp_path / "s"), "--smoothing", "0.5"]) == 0
    params = json.loads((tmp_path / "s/ground_truth/params.json").read_text())
    assert params["smoothing"] == 0.5
    for bad in ("-0.5", "2", "nan"):
        assert main(args + ["--out", str(tmp_path / "bad"), "--smoothing", bad]) == 2
        assert "--smoothing" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert _dataset_face_config(tmp_path, "--smoothing", "0.5")["smoothing"] == 0.5
    assert _dataset_face_config(tmp_path / "default")["smoothing"] == 0.0
