"""In-the-wild lighting: spherical-harmonic environments, a distant light with hard
shadows, procedural backgrounds, occluders, and faces rendered with them."""

import json

import h5py
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.cli import main
from faceps.core import ConfigError
from faceps.core.raycast import RayCaster
from faceps.datasets.build import DatasetConfig, build_dataset
from faceps.datasets.torch_data import FaceDataset
from faceps.model import load_model
from faceps.synth.faces import default_camera, render_face, sample_face
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.wild import (
    BACKGROUND_KINDS,
    WildConfig,
    WildLighting,
    draw_occluders,
    lobe_sh,
    procedural_background,
    sample_wild_lighting,
    sh_basis,
    sh_irradiance,
    sh_project,
    shade_wild,
)


def _sphere(n: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).normal(size=(n, 3))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def test_sh_basis_is_orthonormal():
    w = _sphere(200_000)
    Y = sh_basis(w)
    gram = 4 * np.pi * (Y.T @ Y) / len(w)
    np.testing.assert_allclose(gram, np.eye(9), atol=0.02)


def test_lobe_coefficients_are_exact():
    d = np.array([0.3, -0.8, -0.5])
    d /= np.linalg.norm(d)
    colour = np.array([1.0, 0.5, 0.25])
    sh = lobe_sh(d, colour)
    w = _sphere(500, 1)
    expect = ((1 + w @ d) ** 2 / 4)[:, None] * colour[None]
    np.testing.assert_allclose(sh_basis(w) @ sh, expect, atol=1e-12)
    # quadrature projection of the same function agrees
    proj = sh_project(lambda v: ((1 + v @ d) ** 2 / 4)[:, None] * colour[None])
    np.testing.assert_allclose(proj, sh, atol=1e-3)


def test_irradiance_is_the_clamped_cosine_integral_of_the_radiance():
    """E(n) against Monte Carlo integration of L(w) max(0, n.w) for drawn environments."""
    w = _sphere(400_000, 2)
    Yw = sh_basis(w)
    normals = _sphere(6, 3)
    for seed in range(3):
        light = sample_wild_lighting(np.random.default_rng(seed), WildConfig(distant_prob=0))
        L = Yw @ light.sh                                        # (N, 3) radiance
        assert L.min() > -1e-9                                   # never negative
        mc = np.stack([(L * np.maximum(0, w @ n)[:, None]).mean(0) * 4 * np.pi
                       for n in normals])
        np.testing.assert_allclose(sh_irradiance(normals, light.sh), mc, rtol=0.01,
                                   atol=0.01)
    with pytest.raises(ConfigError, match="shape"):
        sh_irradiance(normals, np.zeros((4, 3)))


def test_drawn_environments_are_plausible():
    """Mean radiance 1 per channel (up to the colour tints), mostly from above, a distant
    light in about the configured share of draws, pointing to the camera's side."""
    rng = np.random.default_rng(5)
    w = _sphere(20_000, 4)
    Yw = sh_basis(w)
    up, down = np.array([[0.0, -1.0, 0.0]]), np.array([[0.0, 1.0, 0.0]])
    above, distant, means = 0, 0, []
    for _ in range(200):
        light = sample_wild_lighting(rng, WildConfig(distant_prob=0.5))
        means.append((Yw @ light.sh).mean(0))
        above += sh_irradiance(up, light.sh).sum() > sh_irradiance(down, light.sh).sum()
        if light.distant_direction is not None:
            distant += 1
            assert light.distant_direction[2] < 0           # in front of the face
            assert light.distant_direction[1] <= 1e-12      # not from below the horizon
            assert np.all(light.distant_intensity > 0)
            assert light.row()[33] == 1.0
        else:
            assert light.row()[33] == 0.0
    assert 0.85 < np.mean(means) < 1.15
    assert above >= 170                                   # mostly lit from above
    assert 70 <= distant <= 130


def test_shading_under_a_distant_light_and_its_shadow():
    """No environment: radiance = albedo I max(0, n.d) / pi; a plate between a point and
    the light casts a shadow; a point facing away is attached, not cast."""
    d = np.array([0.0, -0.6, -0.8])
    light = WildLighting(np.zeros((9, 3)), d, np.array([2.0, 1.0, 0.5]))
    P = np.array([[0.0, 0.0, 500.0], [100.0, 0.0, 500.0], [200.0, 0.0, 500.0]])
    N = np.array([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])
    A = np.full((3, 3), 0.5)
    # a plate 50 mm along d from the second point only
    c = P[1] + 50 * d
    plate = np.array([c + [-10, -10, 0], c + [10, -10, 0], c + [0, 10, 0]])
    caster = RayCaster(plate, np.array([[0, 1, 2]]))
    rad, shadow, attached = shade_wild(P, N, A, light, caster)
    np.testing.assert_allclose(rad[0], 0.5 * np.array([2.0, 1.0, 0.5]) * 0.8 / np.pi,
                               rtol=1e-6)
    assert shadow.tolist() == [False, True, False]
    assert attached.tolist() == [False, False, True]
    assert np.all(rad[1] == 0) and np.all(rad[2] == 0)
    free, no_shadow, _ = shade_wild(P, N, A, light, None)
    assert not no_shadow.any() and free[1].max() > 0


@pytest.mark.parametrize("kind", BACKGROUND_KINDS)
def test_backgrounds(kind):
    a, k = procedural_background(np.random.default_rng(1), (64, 48), kind)
    b, _ = procedural_background(np.random.default_rng(1), (64, 48), kind)
    assert k == kind and a.shape == (48, 64, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)                           # deterministic per generator
    assert 0 <= a.min() and a.max() <= 1 and 0.3 < a.mean() < 0.55
    assert a.std() > 0.01                                 # not a flat colour


def test_background_kind_is_checked():
    with pytest.raises(ConfigError, match="background kind"):
        procedural_background(np.random.default_rng(0), (8, 8), "marble")


def test_occluders():
    """Hair covers the top of the face, glasses the eyes; no eye landmarks: no glasses;
    no face: nothing."""
    H, W = 120, 160
    face = np.zeros((H, W), bool)
    face[20:110, 50:110] = True
    lm = np.full((68, 2), np.nan)
    lm[36:42] = [[62, 50], [66, 48], [70, 48], [74, 50], [70, 52], [66, 52]]
    lm[42:48] = lm[36:42] + [34, 0]
    cfg = WildConfig(hair_prob=1.0, glasses_prob=1.0, hair_strands=(40, 40))
    colour, alpha, kinds = draw_occluders(np.random.default_rng(0), (W, H), lm, face, cfg)
    assert kinds == {"hair": 40, "glasses": True}
    assert alpha.shape == (H, W) and 0 <= alpha.min() and alpha.max() <= 1
    assert alpha[15:50].mean() > alpha[80:].mean()         # strands hang over the top
    assert alpha[42:58, 55:81].max() > 0.5                # a rim around the left eye
    assert np.all(colour[alpha == 0] == 0)
    _, alpha2, kinds2 = draw_occluders(np.random.default_rng(0), (W, H),
                                       np.full((68, 2), np.nan), face, cfg)
    assert kinds2["glasses"] is False
    _, alpha3, kinds3 = draw_occluders(np.random.default_rng(0), (W, H), lm,
                                       np.zeros((H, W), bool), cfg)
    assert not alpha3.any() and kinds3 == {"hair": 0, "glasses": False}


def test_config_errors():
    with pytest.raises(ConfigError, match="distant_prob"):
        WildConfig(distant_prob=2)
    with pytest.raises(ConfigError, match="key_share"):
        WildConfig(key_share=(0.5, 1.5))
    with pytest.raises(ConfigError, match="background"):
        WildConfig(background=("marble",))
    with pytest.raises(ConfigError, match="hair_strands"):
        WildConfig(hair_strands=(5, 2))


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def test_wild_render_follows_its_lighting(model):
    """A face rendered in the wild: n images over a background, no point lights; where the
    face is seen and no distant light or occluder interferes, image / exposure = albedo
    E(n) / pi from its own ground truth; occluded pixels are out of the ground truth."""
    cam = default_camera((160, 120))
    rng = np.random.default_rng(3)
    sample = sample_face(rng, model, cam)
    clean = SensorConfig(full_well=1e12, read_noise=0.0)
    cfg = WildConfig(distant_prob=0.0, hair_prob=1.0, glasses_prob=0.0)
    r = render_face(model, sample, cam, rng=rng, wild=cfg, n_wild=2, sensor=clean,
                    shading=ShadingConfig(specular=0.0))
    assert r.images.shape == (2, 120, 160, 3) and len(r.lights) == 0
    assert r.wild is not None and len(r.wild.lightings) == 2 and r.wild.kinds["hair"] > 0
    hidden = r.wild.occluder_alpha >= 0.5
    assert hidden.any() and not (r.mask & hidden).any()
    assert np.all(np.isnan(r.normals[hidden]))
    assert r.images[0][~r.mask].mean() > 0.01             # a background, not black
    free = r.mask & (r.wild.occluder_alpha == 0) & ~r.saturated.any(0)
    assert free.sum() > 1000
    for j, light in enumerate(r.wild.lightings):
        pred = r.albedo[free] * sh_irradiance(r.normals[free].astype(np.float64),
                                              light.sh) / np.pi
        np.testing.assert_allclose(r.images[j][free] / r.exposure, pred, rtol=1e-4,
                                   atol=1e-6)
    # the same face by its point lights is unchanged by the option's existence
    near = render_face(model, sample, cam, rng=np.random.default_rng(0), sensor=clean)
    assert len(near.lights) == 3 and near.wild is None
    with pytest.raises(ConfigError, match="rng"):
        render_face(model, sample, cam, wild=cfg)
    with pytest.raises(ConfigError, match="n_wild"):
        render_face(model, sample, cam, rng=rng, wild=cfg, n_wild=0)


# ------------------------------------------------------------------ datasets and sessions
def test_wild_and_mixed_datasets_record_their_lighting(tmp_path):
    """A wild build renders the same faces as a near build of the same seed (its lighting
    is drawn after the face), records the lighting per sample, leaves the point-light rows
    invalid, and its images load through the wild rows; a mixed build has both kinds."""
    near = build_dataset(tmp_path / "near.h5", 4, size=48, seed=5).path
    wild = build_dataset(tmp_path / "wild.h5", 4, size=48, seed=5,
                         config=DatasetConfig(lighting="wild")).path
    mixed = build_dataset(tmp_path / "mixed.h5", 8, size=48, seed=5,
                          config=DatasetConfig(lighting="mixed", wild_fraction=0.5)).path
    with h5py.File(near) as fn, h5py.File(wild) as fw, h5py.File(mixed) as fm:
        sn, sw, sm = fn["samples"], fw["samples"], fm["samples"]
        assert list(sn["lighting"].asstr()[:]) == ["near"] * 4
        assert list(sw["lighting"].asstr()[:]) == ["wild"] * 4
        a, b = sn["normals"][:], sw["normals"][:]
        seen = np.isfinite(b)        # the wild ground truth leaves out occluded pixels
        assert np.all(np.isfinite(a)[seen]) and seen.sum() > 0.8 * np.isfinite(a).sum()
        np.testing.assert_array_equal(a[seen], b[seen])
        assert np.all(sn["wild_lighting"][:] == 0) and np.all(sn["lights"][:, :, 10] == 1)
        assert np.all(sw["lights"][:] == 0)
        rows = sw["wild_lighting"][:]
        assert rows.shape == (4, 3, 34) and np.all(rows[:, :, :3] > 0)
        kinds = list(sm["lighting"].asstr()[:])
        assert {"near", "wild"} == set(kinds)
        for i, kind in enumerate(kinds):
            has_lights = bool(np.all(sm["lights"][i, :, 10] == 1))
            assert has_lights == (kind == "near")
            assert bool(np.all(sm["wild_lighting"][i, :, :3] > 0)) == (kind == "wild")
    ds = FaceDataset(wild, n_images=1)
    item = ds[0]
    assert item["images"].shape == (1, 3, 48, 48) and float(item["images"].mean()) > 0
    assert FaceDataset(wild)[1]["images"].shape[0] == 3
    with pytest.raises(ConfigError, match="lighting"):
        DatasetConfig(lighting="sunny")
    with pytest.raises(ConfigError, match="wild_fraction"):
        DatasetConfig(lighting="mixed", wild_fraction=1.5)


def test_wild_session_from_the_command_line(tmp_path):
    """``faceps synth session --lighting wild`` writes images wild0.. with no calibrated
    lights; the session loads and its ground truth names the scene."""
    out = tmp_path / "s"
    assert main(["synth", "session", "--out", str(out), "--lighting", "wild", "--lights", "2",
                 "--size", "160x120", "--seed", "2"]) == 0
    session = json.loads((out / "session.json").read_text())
    assert [im["light"] for im in session["images"]] == ["wild0", "wild1"]
    assert not session.get("lights")
    scene = json.loads((out / "ground_truth" / "lights.json").read_text())["wild"]
    assert len(scene["lightings"]) == 2
    capture = load_session(out)
    assert capture.n_images == 2 and capture.lights is None
