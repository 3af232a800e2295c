import numpy as np
import pytest

from faceps.core import FitError
from faceps.model import load_model
from faceps.optimize.proxy import ProxyFitConfig, fit_landmarks
from faceps.synth.faces import FaceConfig, default_camera, landmark_pixels, sample_face


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def draw(model, seed, noise_px=0.0, **face):
    cam = default_camera((1600, 1200))
    rng = np.random.default_rng(seed)
    s = sample_face(rng, model, cam, FaceConfig(**face))
    G = model.geometry(s.coefficients.id, s.coefficients.exp)
    lm = landmark_pixels(model, G, s.rotation, s.translation, cam)
    return cam, s, lm + rng.normal(0, noise_px, lm.shape)


def test_exact_landmarks_give_the_pose(model):
    cam, s, lm = draw(model, 1, id_scale=0.5, exp_scale=0.3)
    fit = fit_landmarks(model, lm, cam, ProxyFitConfig(reg_id=0.5, reg_exp=0.5))
    assert fit.landmark_rmse_px < 1.0
    assert np.degrees(np.abs(fit.angles - s.angles)).max() < 3.0
    assert np.abs(fit.translation - s.translation).max() < 25.0
    assert fit.geometry(model).shape == (model.n_vertices, 3)
    d = fit.to_dict()
    assert d["model"] == model.name and len(d["coefficients"]["id"]) == model.n_id


@pytest.mark.parametrize("seed", range(8))
def test_noisy_landmarks_within_3px(model, seed):
    cam, s, lm = draw(model, 100 + seed, noise_px=2.0)
    fit = fit_landmarks(model, lm, cam)
    # the target at 1600x1200 with 2 px landmark noise
    assert fit.landmark_rmse_px <= 3.0
    assert np.degrees(np.abs(fit.angles[1] - s.angles[1])) < 6.0  # yaw


def test_contour_sliding_runs_and_stays_close(model):
    cam, s, lm = draw(model, 7, noise_px=1.0, yaw_deg=5.0)
    fit = fit_landmarks(model, lm, cam, ProxyFitConfig(contour=True))
    assert fit.landmark_rmse_px < 6.0
    assert fit.vertex_ids is not None and (fit.vertex_ids[:17] >= 0).all()


def test_too_few_landmarks(model):
    cam, s, lm = draw(model, 3)
    lm[5:] = np.nan
    with pytest.raises(FitError, match="usable landmarks"):
        fit_landmarks(model, lm, cam)
