import numpy as np
import pytest

from faceps.core import FitError
from faceps.model import load_model
from faceps.synth.albedo import harmonic_fill, sample_bilinear, transfer_albedo
from faceps.synth.faces import FaceSample, default_camera, render_face, sample_face


def test_bilinear_and_harmonic_fill():
    img = np.arange(12, dtype=float).reshape(3, 4, 1)
    out = sample_bilinear(img, np.array([[0.5, 0.5], [3.0, 2.0], [-1, 0], [1.0, np.nan]]))
    assert out[0, 0] == pytest.approx(2.5) and out[1, 0] == 11 and np.isnan(out[2:]).all()
    # a path 0-1-2-3-4: interior values are linear between fixed ends
    tris = np.array([[0, 1, 5], [1, 2, 5], [2, 3, 5], [3, 4, 5]])
    vals = np.zeros((6, 1))
    vals[0], vals[4] = 0.0, 4.0
    known = np.zeros(6, bool)
    known[[0, 4]] = True
    filled = harmonic_fill(vals, known, tris)
    assert np.all(np.diff(filled[:5, 0]) > 0)
    with pytest.raises(FitError):
        harmonic_fill(vals, np.zeros(6, bool), tris)


def test_transfer_recovers_the_rendered_albedo():
    model = load_model("builtin")
    cam = default_camera((640, 480))
    rng = np.random.default_rng(4)
    s = sample_face(rng, model, cam)
    s = FaceSample(s.coefficients, s.angles, s.translation, s.lights, None)  # no detail
    r = render_face(model, s, cam, rng=rng, levels=0, with_proxy=False)
    alb, sampled = transfer_albedo(r.albedo, cam, model, s.coefficients, s.angles,
                                   s.translation)
    truth = model.albedo(s.coefficients.albedo)
    face = sampled & model.region
    assert face.sum() > 0.5 * model.region.sum()
    err = np.abs(alb[face] - truth[face])
    assert np.median(err) < 0.01 and np.percentile(err, 95) < 0.05
    # hidden vertices are interpolated, not left at zero
    assert np.all(alb[~sampled].mean(0) > 0.05)
