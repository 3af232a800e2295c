"""Inference (faceps.learn.infer): tiny networks trained for two steps on a tiny dataset,
a small synthetic session, contract-2 outputs for 1, 2 and 3 images, the crop mapping and
its inverse, the closed-form albedo, and the errors for missing or mismatched weights and
impossible image counts."""

import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from faceps.capture import load_session
from faceps.core.errors import ConfigError, FacepsError
from faceps.core.lights import PointLights, shade_point
from faceps.datasets.build import DEFAULT_CROP_SCALE, build_dataset
from faceps.learn import infer as infer_mod
from faceps.learn.checkpoint import CheckpointError
from faceps.learn.infer import (
    CROP_FILE,
    CROP_FORMAT,
    DEFAULT_CROP_SIZE,
    CropSpec,
    InferConfig,
    crop_box,
    crop_camera,
    crop_images,
    default_weights_dir,
    infer,
    load_networks,
    map_pixels,
    paste_crop,
    write_inference,
)
from faceps.learn.train import TrainConfig, train
from faceps.model import load_model
from faceps.synth.faces import landmark_pixels
from faceps.synth.session import SessionSynthConfig, synth_session
from tests.tolerances import assert_close

SIZE = 64
SMALL = {"normal": {"widths": [8, 16, 32], "normal_widths": [4, 8, 16]},
         "proxy": {"widths": [8, 16, 32, 64], "norm": "group"}}
CONTRACT2 = ("normals.npy", "depth.npy", "albedo.npy", "mask.png", "lights.json", "proxy.json",
             "mesh.ply", "normals.png", "albedo.png", "shading.png", "report.json")


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    """A weights folder with the run folders proxy/ and normal/ (two steps each)."""
    root = tmp_path_factory.mktemp("infer")
    data = build_dataset(root / "data" / "d.h5", 6, size=SIZE, seed=0, model=model).path
    for kind in ("proxy", "normal"):
        cfg = TrainConfig.for_kind(kind, network=SMALL[kind], batch_size=2, max_steps=2,
                                   log_every=1, checkpoint_every=10, progress=False,
                                   tensorboard=False, augment=None)
        train(kind, cfg, data, out=root / "w" / kind, model=model)
    return root / "w"


@pytest.fixture(scope="module")
def session(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("session") / "s1"
    synth_session(folder, seed=1, model=model, config=SessionSynthConfig(size=(320, 240)))
    return folder


@pytest.fixture(scope="module")
def capture(session):
    return load_session(session)


@pytest.fixture(scope="module")
def networks(weights, model):
    return load_networks(InferConfig(weights=str(weights)), model=model)


def gt_params(session):
    p = json.loads((session / "ground_truth" / "params.json").read_text())
    return (np.asarray(p["coefficients"]["id"]), np.asarray(p["coefficients"]["exp"]),
            np.asarray(p["pose"]["angles_rad"]), np.asarray(p["pose"]["translation_mm"]))


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("k", [1, 2, 3])
def test_infer_writes_contract_2(tmp_path, weights, capture, networks, k):
    cfg = InferConfig(weights=str(weights), num_images=k)
    # k = 1 loads the networks itself (the start-up path); 2 and 3 reuse them
    inf = infer(capture, cfg, networks=None if k == 1 else networks)
    H, W = capture.height, capture.width
    assert inf.image_names == capture.light_names[:k]
    assert inf.report["images"] == list(capture.light_names[:k])
    assert (inf.timings["load"] > 0) == (k == 1)
    for stage in ("load", "landmarks", "crop", "proxynet", "render", "normalnet", "paste",
                  "height_field", "albedo", "total", "session"):
        assert inf.timings[stage] >= 0, stage
    # the crop of the training data (64 px, default scale), found through run.json
    crop = inf.report["crops"]["normal"]
    assert crop["size"] == SIZE and crop["scale"] == DEFAULT_CROP_SCALE
    assert "training data" in crop["source"]
    assert inf.crop_camera.image_size == (SIZE, SIZE)

    files = write_inference(tmp_path / "out", inf, capture)
    for name in CONTRACT2:
        assert (tmp_path / "out" / name).is_file(), name
    assert set(files) >= {"normals", "depth", "albedo", "mask", "lights", "proxy", "mesh",
                          "report"}
    normals = np.load(tmp_path / "out" / "normals.npy")
    depth = np.load(tmp_path / "out" / "depth.npy")
    albedo = np.load(tmp_path / "out" / "albedo.npy")
    mask = cv2.imread(str(tmp_path / "out" / "mask.png"), cv2.IMREAD_UNCHANGED)
    assert normals.shape == (H, W, 3) and normals.dtype == np.float32
    assert depth.shape == (H, W) and depth.dtype == np.float32
    assert albedo.shape == (H, W, 3) and albedo.dtype == np.float32
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    m = mask > 0
    np.testing.assert_array_equal(m, inf.mask)
    assert m.sum() > 2000, "the face region is far too small"
    # NaN outside, values inside, consistent masks
    np.testing.assert_array_equal(np.all(np.isfinite(normals), -1), m)
    np.testing.assert_array_equal(np.isfinite(depth), m)
    assert np.all(np.isnan(albedo[~m]))
    # NaN inside only where no selected light reaches (one light leaves a side dark)
    assert np.isfinite(albedo[m]).all(-1).mean() > (0.5 if k == 1 else 0.95)
    assert_close(np.linalg.norm(normals[m], axis=-1), np.ones(int(m.sum())), atol=1e-4,
                 name="|n|")
    # facing the camera (DESIGN.md: n . ray < 0), at a face's distance
    rays = capture.camera.rays()[m]
    assert np.median(np.einsum("ij,ij->i", normals[m], rays)) < 0
    assert 300 < np.median(depth[m]) < 1500
    # the region lies where the crop's face mask maps back to
    back = paste_crop(np.ones((SIZE, SIZE, 3), np.float32), inf.crop_mask, inf.crop_camera,
                      capture.camera)[1]
    assert np.all(m <= back) and m.sum() > 0.9 * back.sum()

    lights = json.loads((tmp_path / "out" / "lights.json").read_text())
    assert lights == json.loads(json.dumps({"lights": capture.lights.to_dict()}))
    proxy = json.loads((tmp_path / "out" / "proxy.json").read_text())
    mdl = load_model("builtin")
    assert proxy["model"] == mdl.name and proxy["source"] == "proxynet"
    assert len(proxy["coefficients"]["id"]) == mdl.n_id
    assert len(proxy["pose"]["angles_rad"]) == 3 and proxy["pose"]["translation_mm"][2] > 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pixels"] == int(m.sum()) and "write_mesh" in report["timings"]
    assert report["height_field"]["method"] == "gn"
    assert report["input_size"] == [W, H]


def test_images_by_name_and_without_lights(tmp_path, capture, networks):
    inf = infer(capture, InferConfig(images=("right", "left")), networks=networks)
    assert inf.image_names == ("right", "left")
    bare = dataclasses.replace(capture, lights=None)
    inf = infer(bare, InferConfig(num_images=2), networks=networks)
    assert np.all(np.isnan(inf.albedo)) and inf.mask.any()
    assert any("no calibrated lights" in w for w in inf.report["warnings"])
    write_inference(tmp_path, inf, bare)
    assert json.loads((tmp_path / "lights.json").read_text()) == {"lights": {}}


def test_proxy_from_the_landmarks(tmp_path, capture, networks, model):
    """``proxy="landmarks"``: the proxy is the landmark fit, whatever the ProxyNet says
    (these test networks are barely trained): its landmark error is the fit's."""
    from faceps.capture.landmarks import get_landmarks
    from faceps.optimize.proxy import fit_landmarks

    inf = infer(capture, InferConfig(proxy="landmarks"), networks=networks)
    lm = np.asarray(get_landmarks(capture, "auto").points, np.float64)
    fit = fit_landmarks(model, lm, capture.camera)
    assert_close(inf.proxy.angles, fit.angles, atol=1e-5, name="angles")
    assert_close(inf.proxy.translation, fit.translation, atol=1e-3, name="translation")
    assert inf.proxy.landmark_rmse_px == pytest.approx(fit.landmark_rmse_px, rel=1e-3,
                                                       abs=1e-3)
    net = infer(capture, InferConfig(), networks=networks)
    assert inf.proxy.landmark_rmse_px < net.proxy.landmark_rmse_px
    assert inf.mask.any() and np.all(np.isfinite(inf.normals[inf.mask]))
    write_inference(tmp_path, inf, capture)
    proxy = json.loads((tmp_path / "proxy.json").read_text())
    assert proxy["source"] == "landmarks" and proxy["weights"] is None
    with pytest.raises(ConfigError, match="proxy must be one of"):
        InferConfig(proxy="oracle")


def test_normalnet_passes(capture, networks):
    """The pass count defaults to what the NormalNet was trained for (one for these test
    networks) and is recorded; a second pass changes the normals."""
    one = infer(capture, InferConfig(), networks=networks)
    two = infer(capture, InferConfig(passes=2), networks=networks)
    assert one.report["normalnet_passes"] == 1 and two.report["normalnet_passes"] == 2
    both = one.mask & two.mask
    assert both.sum() > 0.9 * one.mask.sum()
    assert float(np.abs(one.normals[both] - two.normals[both]).max()) > 1e-4


def test_depth_resolution_full_and_fixed(capture, networks):
    full = infer(capture, InferConfig(depth_resolution="full"), networks=networks)
    assert full.report["working_size"] == [capture.width, capture.height]
    fixed = infer(capture, InferConfig(depth_resolution=160), networks=networks)
    assert fixed.report["working_size"] == [160, 120]
    crop = infer(capture, InferConfig(), networks=networks)
    side = crop.crop_box[2]
    assert crop.report["working_size"][0] == round(capture.width * SIZE / side)
    # the same normals; the depths agree to within a few millimetres
    both = full.mask & crop.mask
    assert both.sum() > 0.9 * full.mask.sum()
    assert np.median(np.abs(full.depth[both] - crop.depth[both])) < 3.0


# ------------------------------------------------------------------ crop geometry
def test_crop_mapping_round_trip(session, capture, model):
    """The crop camera sees the landmark vertices where map_pixels puts the full-resolution
    projections, and pasting inverts the mapping."""
    a_id, a_exp, angles, t = gt_params(session)
    from faceps.core.rotation import pose_rotation

    G = model.geometry(a_id, a_exp)
    R = pose_rotation(angles)
    full_lm = landmark_pixels(model, G, R, t, capture.camera)
    np.testing.assert_allclose(full_lm, capture.landmarks, atol=1e-3)
    spec = CropSpec(SIZE, DEFAULT_CROP_SCALE)
    box = crop_box(capture.landmarks, spec)
    cam = crop_camera(capture.camera, box, SIZE)
    crop_lm = landmark_pixels(model, G, R, t, cam)
    assert_close(map_pixels(full_lm, capture.camera, cam), crop_lm, atol=1e-6,
                 name="full -> crop")
    assert_close(map_pixels(crop_lm, cam, capture.camera), full_lm, atol=1e-6,
                 name="crop -> full")
    # explicit pixel-centre convention: u' = (u - x0 + 0.5) * size / side - 0.5
    x0, y0, side = box
    expected = (full_lm - [x0, y0] + 0.5) * SIZE / side - 0.5
    assert_close(crop_lm, expected, atol=1e-6, name="crop pixel convention")

    # paste a crop map holding each crop pixel's full-resolution position: every pasted
    # pixel must receive its own (u, v) (bilinear interpolation of an affine map is exact
    # up to OpenCV's 1/32-pixel quantisation of the sample positions in the crop)
    uv_crop = cam.pixel_grid()
    values = map_pixels(uv_crop, cam, capture.camera).astype(np.float32)
    mask = np.ones((SIZE, SIZE), bool)
    pasted, region = paste_crop(values, mask, cam, capture.camera)
    assert region.sum() > 0.8 * side * side
    assert np.all(np.isnan(pasted[~region]))
    # pixels whose four crop neighbours are all in the crop (at the border the normalised
    # interpolation repeats the inside neighbour, by design)
    grid = capture.camera.pixel_grid()
    in_crop = map_pixels(grid, capture.camera, cam)
    interior = region & np.all((in_crop >= 0) & (in_crop <= SIZE - 1), -1)
    assert interior.sum() > 0.9 * region.sum()
    assert_close(pasted[interior], grid[interior], atol=side / SIZE / 32,
                 name="pasted positions")

    # crop_images area-averages: a ramp image (value = u) gives each crop pixel the
    # full-resolution u of its centre (away from the crop's border; OpenCV's INTER_AREA
    # is within 2 % of a crop pixel of the exact box filter)
    ramp = np.repeat(capture.camera.pixel_grid()[None, ..., :1], 3, -1).astype(np.float32)
    got = crop_images(ramp, box, SIZE)[0, 2:-2, 2:-2, 0]
    want = values[2:-2, 2:-2, 0]
    inside = (want > 1) & (want < capture.width - 2)
    assert_close(got[inside], want[inside], atol=0.02 * side / SIZE, name="cropped ramp")


def test_crop_past_the_border_is_zero_padded():
    img = np.ones((1, 40, 50, 3), np.float32)
    out = crop_images(img, (-10, -10, 40), 20)
    assert out.shape == (1, 20, 20, 3)
    assert_close(out[0, 0, 0], np.zeros(3), name="outside")
    assert_close(out[0, -1, -1], np.ones(3), name="inside")


def test_albedo_closed_form_is_exact_on_eq1_images():
    """Images rendered by eq. 1 (no saturation) give back the albedo."""
    rng = np.random.default_rng(0)
    from faceps.core.camera import Camera

    cam = Camera.from_fov((24, 16), 40.0)
    H, W = 16, 24
    depth = (600.0 + rng.uniform(-5, 5, (H, W))).astype(np.float32)
    n = np.stack([rng.uniform(-0.3, 0.3, (H, W)), rng.uniform(-0.3, 0.3, (H, W)),
                  -np.ones((H, W))], -1)
    n = (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)
    alb = rng.uniform(0.2, 0.8, (H, W, 3)).astype(np.float32)
    lights = PointLights(np.array([[-200.0, -50, 300], [0, -150, 200], [200, -50, 300]]),
                         np.array([[9e4, 1e5, 1.1e5], [1.5e5, 1.4e5, 1.3e5], [1e5] * 3]),
                         np.array([[0.5, 0.1, 1.0], [0, 0, 0], [0, 0, 0]]),
                         np.array([1.5, 0.0, 0.0]))
    points = cam.backproject(depth)
    images = shade_point(points, n, alb, lights)
    sat = np.zeros((3, H, W), bool)
    mask = np.ones((H, W), bool)
    got = infer_mod._albedo(images, sat, [0, 1, 2], n, depth, mask, cam, (0, H, 0, W), lights)
    assert_close(got, alb, rtol=1e-3, atol=1e-5, name="albedo")
    # one light, one saturated sample: still exact from the others
    sat[1, 3, 4] = True
    got = infer_mod._albedo(images, sat, [0, 1, 2], n, depth, mask, cam, (0, H, 0, W), lights)
    assert_close(got[3, 4], alb[3, 4], rtol=1e-3, atol=1e-5, name="albedo (saturated)")
    # a sub-box of a larger image gives the same values
    box = (2, 10, 3, 20)
    sub = infer_mod._albedo(images, sat, [2], n[2:10, 3:20], depth[2:10, 3:20],
                            mask[2:10, 3:20], cam, box, lights.select([2]))
    assert_close(sub, alb[2:10, 3:20], rtol=1e-3, atol=1e-5, name="albedo (box)")


# ------------------------------------------------------------------ weights and errors
def test_missing_weights_give_clear_errors(tmp_path, monkeypatch, capture):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no ProxyNet weights: expected proxy\.pt"):
        infer(capture, InferConfig(weights=str(empty)))
    with pytest.raises(CheckpointError, match="no such weights folder"):
        load_networks(InferConfig(weights=str(tmp_path / "nowhere")))
    # no shipped weights: the message names the folder and --weights
    monkeypatch.setattr(infer_mod, "__file__", str(tmp_path / "pkg" / "infer.py"))
    shipped = tmp_path / "pkg" / "weights"
    with pytest.raises(FacepsError, match="--weights") as err:
        infer(capture, InferConfig())
    assert str(shipped) in str(err.value)
    assert default_weights_dir(check=False) == shipped


def test_mismatched_weights_give_clear_errors(tmp_path, weights, capture, model):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(weights / "normal" / "weights.pt", swapped / "proxy.pt")
    shutil.copy(weights / "proxy" / "weights.pt", swapped / "normal.pt")
    with pytest.raises(CheckpointError, match=r"holds a NormalNet.*ProxyNet"):
        infer(capture, InferConfig(weights=str(swapped)))
    other = dataclasses.replace(model, mean=model.mean * 1.01, name="other-model")
    with pytest.raises(CheckpointError, match="trained with morphable model"):
        load_networks(InferConfig(weights=str(weights)), model=other)
    # one run folder is not a weights folder
    with pytest.raises(CheckpointError, match="single training run"):
        load_networks(InferConfig(weights=str(weights / "proxy")))


def test_image_count_and_option_errors(capture, networks):
    with pytest.raises(ConfigError, match=r"4 images asked for.*only 3"):
        infer(capture, InferConfig(num_images=4), networks=networks)
    with pytest.raises(ConfigError, match="no image for light"):
        infer(capture, InferConfig(images=("top",)), networks=networks)
    for bad in ({"num_images": 0}, {"integrate": "poisson"}, {"depth_resolution": "half"},
                {"depth_resolution": 10}, {"num_images": 2, "images": ("left",)},
                {"crop_size": 4}, {"landmarks": "magic"}, {"passes": 0}, {"passes": 1.5}):
        with pytest.raises(ConfigError):
            InferConfig(**bad)


def test_flat_layout_and_crop_file(tmp_path, weights, model):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(weights / "proxy" / "weights.pt", flat / "proxy.pt")
    shutil.copy(weights / "normal" / "weights.pt", flat / "normal.pt")
    nets = load_networks(InferConfig(weights=str(flat)), model=model)
    assert nets.normal_crop == CropSpec(DEFAULT_CROP_SIZE, DEFAULT_CROP_SCALE, "default")
    assert any("crop is not recorded" in w for w in nets.warnings)
    (flat / CROP_FILE).write_text(json.dumps({"format": CROP_FORMAT, "size": 96,
                                              "normal": {"size": SIZE}}))
    nets = load_networks(InferConfig(weights=str(flat)), model=model)
    assert nets.proxy_crop.size == 96 and nets.normal_crop.size == SIZE
    assert not nets.warnings
    nets = load_networks(InferConfig(weights=str(flat), crop_size=80, crop_scale=1.5),
                         model=model)
    assert nets.proxy_crop.key == nets.normal_crop.key == (80, 1.5)


def test_exported_weights_carry_their_crop(tmp_path, weights, model):
    """An exported file records the crop of its training data, so a copy without the run
    folder or a crop.json still frames the face as in training."""
    from faceps.learn.checkpoint import export_weights, load_network

    flat = tmp_path / "flat"
    flat.mkdir()
    for kind in ("proxy", "normal"):
        export_weights(weights / kind, flat / f"{kind}.pt", float16=True)
        assert load_network(flat / f"{kind}.pt").crop["size"] == SIZE
    nets = load_networks(InferConfig(weights=str(flat)), model=model)
    assert nets.normal_crop.key == nets.proxy_crop.key == (SIZE, DEFAULT_CROP_SCALE)
    assert "training data" in nets.normal_crop.source
    assert str(flat / "normal.pt") in nets.normal_crop.source
    assert not nets.warnings
    # a crop.json beside the files still has the last word
    (flat / CROP_FILE).write_text(json.dumps({"format": CROP_FORMAT, "size": 96}))
    assert load_networks(InferConfig(weights=str(flat)), model=model).normal_crop.size == 96
    # a run whose crop is not known exports a file without one (and warns at loading)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(weights / "normal" / "weights.pt", bare / "normal.pt")
    assert load_network(export_weights(bare / "normal.pt", tmp_path / "n.pt")).crop is None


def test_other_integrators(capture, networks):
    """``wls`` and ``fc`` (faceps.optimize.integrate) give a depth map at the proxy's
    scale over the same region."""
    gn = infer(capture, InferConfig(), networks=networks)
    for method in ("wls", "fc"):
        inf = infer(capture, InferConfig(integrate=method), networks=networks)
        assert inf.report["height_field"]["method"] == method
        m = inf.mask
        assert m.sum() > 0.95 * gn.mask.sum() and np.isfinite(inf.depth[m]).all()
        both = m & gn.mask
        assert abs(np.median(inf.depth[both]) - np.median(gn.depth[both])) < 10.0


def test_gradient_weighted_wls_and_arch_checks(tmp_path, weights, capture, model):
    """A NormalNet with the gradient-magnitude head: ``wls`` weighs by its W (and gives
    another depth than unweighted WLS), other integrators ignore it; ``arch`` checks the
    weights' architecture and names the missing shipped file."""
    from faceps.learn.checkpoint import save_weights
    from faceps.learn.normalnet import NormalNet, NormalNetConfig

    torch.manual_seed(0)
    net = NormalNet(NormalNetConfig(widths=(8, 16, 32), normal_widths=(4, 8, 16),
                                    grad_head=True))
    with torch.no_grad():   # a W that varies over the face (a uniform W changes nothing)
        net.grad_head[-2].weight.normal_(0.0, 2.0)
        net.grad_head[-2].bias.fill_(1.0)
    path = save_weights(tmp_path / "normal.pt", kind="normal", network=net, model=model,
                        config={"kind": "normal"}, metrics={}, step=0)
    base = dict(proxy_weights=str(weights / "proxy"), normal_weights=str(path))
    nets = load_networks(InferConfig(**base), model=model)
    weighted = infer(capture, InferConfig(integrate="wls", **base), networks=nets)
    assert weighted.report["height_field"]["gradient_weighted"] is True
    plain = infer(capture, InferConfig(integrate="wls", wls_lambda=0.0, **base), networks=nets)
    m = weighted.mask & plain.mask
    assert np.abs(weighted.depth[m] - plain.depth[m]).max() > 1e-3
    gn = infer(capture, InferConfig(**base), networks=nets)
    assert "gradient_weighted" not in gn.report["height_field"]
    load_networks(InferConfig(arch="facepsnet", **base), model=model)
    with pytest.raises(CheckpointError, match="facepsnet normal network; arch casfne"):
        load_networks(InferConfig(arch="casfne", **base), model=model)
    with pytest.raises(CheckpointError, match="normal-casfne.pt"):
        load_networks(InferConfig(arch="casfne", weights=str(weights)), model=model)
    with pytest.raises(ConfigError, match="arch"):
        InferConfig(arch="vgg")


TINY_ARCHS = {
    "casfne": {"encoder_widths": (4, 4, 8, 8), "encoder_blocks": (1, 1, 1, 1),
               "decoder_widths": (4, 4, 4, 4, 4), "normal_widths": (4, 4, 8, 8, 8),
               "cascade_widths": (8, 8, 4, 4)},
    "exemplar": {"encoder_widths": (4, 8, 8, 16), "exemplar_widths": (4, 4, 8), "code_dim": 8,
                 "decoder_widths": (8, 8, 4, 4, 4), "perceptual_width": 4},
    "crossmodal": {"widths": (4, 8, 8, 8), "blocks": (1, 1, 1, 1),
                   "decoder_widths": (4, 4, 4, 4, 4), "latent_channels": 8, "head_width": 4},
}


@pytest.fixture(scope="module")
def wild_session(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wild") / "photo"
    from faceps.cli import main

    assert main(["synth", "session", "--out", str(folder), "--lighting", "wild", "--lights",
                 "1", "--size", "320x240", "--seed", "4"]) == 0
    return folder


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_single_image_architectures_on_a_photo_in_the_wild(tmp_path, arch, weights,
                                                           wild_session, model):
    """``faceps infer --arch NAME --num-images 1`` on one in-the-wild photo (no lights, the
    session's landmarks) with a network of each single-image architecture: contract 2
    out, the report names the architecture; a session of three images gives a warning
    that only the first was used."""
    from faceps.cli import main
    from faceps.learn.archs import build_normal_network, normal_config
    from faceps.learn.checkpoint import save_weights

    torch.manual_seed(0)
    net = build_normal_network(normal_config({"arch": arch, **TINY_ARCHS[arch]}))
    path = save_weights(tmp_path / f"normal-{arch}.pt", kind="normal", network=net,
                        model=model, config={"kind": "normal"}, metrics={}, step=0)
    out = tmp_path / "out"
    assert main(["infer", str(wild_session), "--out", str(out), "--num-images", "1",
                 "--arch", arch, "--normal-weights", str(path),
                 "--proxy-weights", str(weights / "proxy")]) == 0
    for name in CONTRACT2:
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["networks"]["normal"]["network"]["arch"] == arch
    n = np.load(out / "normals.npy")
    m = cv2.imread(str(out / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert m.sum() > 500 and np.allclose(np.linalg.norm(n[m], axis=-1), 1, atol=1e-4)
    # three images given to a one-image network: the first is used, with a warning
    cap = load_session(wild_session)
    extra = ({} if cap.saturated_channels is None else
             {"saturated_channels": np.concatenate([cap.saturated_channels] * 3)})
    three = dataclasses.replace(cap, images=np.concatenate([cap.images] * 3),
                                light_names=("wild0", "b", "c"),
                                saturated=np.concatenate([cap.saturated] * 3),
                                image_paths=tuple(cap.image_paths) * 3, **extra)
    nets = load_networks(InferConfig(arch=arch, normal_weights=str(path),
                                     proxy_weights=str(weights / "proxy")), model=model)
    inf = infer(three, InferConfig(), networks=nets)
    assert any("reads one image" in w for w in inf.report["warnings"])
