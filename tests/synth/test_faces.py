"""Random faces: the face-only, plain-skin and flat-albedo options, expression strength."""

from dataclasses import replace

import numpy as np
import pytest

from faceps.core import ConfigError
from faceps.model import load_model
from faceps.synth.faces import (
    FaceConfig,
    default_camera,
    expression_rms_mm,
    expression_scale,
    face_region_triangles,
    render_face,
    sample_face,
)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def test_face_only_is_off_by_default_and_leaves_the_draws_alone(model):
    cam = default_camera((160, 120))
    plain = sample_face(np.random.default_rng(4), model, cam)
    again = sample_face(np.random.default_rng(4), model, cam, FaceConfig(face_only_prob=0.0))
    assert plain.face_only_rings is None and again.face_only_rings is None
    assert plain.to_dict() == again.to_dict()
    always = sample_face(np.random.default_rng(4), model, cam,
                         FaceConfig(face_only_prob=1.0, face_only_rings=3))
    assert always.face_only_rings in (0, 1, 2, 3)
    # the face itself is the same draw: only the extra choice comes after it
    assert np.array_equal(always.coefficients.id, plain.coefficients.id)
    assert np.array_equal(always.lights.positions, plain.lights.positions)
    with pytest.raises(ConfigError, match="face_only_prob"):
        FaceConfig(face_only_prob=1.5)
    with pytest.raises(ConfigError, match="face_only_rings"):
        FaceConfig(face_only_rings=-1)


def test_face_only_renders_the_face_region_and_keeps_the_whole_proxy(model):
    cam = default_camera((240, 180))
    s = sample_face(np.random.default_rng(2), model, cam)
    full = render_face(model, s, cam, rng=np.random.default_rng(0))
    only = render_face(model, replace(s, face_only_rings=0), cam, rng=np.random.default_rng(0))
    grown = render_face(model, replace(s, face_only_rings=4), cam, rng=np.random.default_rng(0))
    # only the face region is drawn: every rendered pixel is a face pixel
    assert only.mask.sum() > 0.5 * full.face_mask.sum()
    assert np.array_equal(only.mask, only.face_mask)
    assert only.mask.sum() < grown.mask.sum() < full.mask.sum()
    assert not np.any(only.mask & ~full.mask)
    # where both see the face, the surface is the same one
    both = only.mask & full.face_mask
    assert both.sum() > 0.95 * only.mask.sum()
    assert np.abs(only.depth[both] - full.depth[both]).max() < 1e-3
    # the proxy maps are the whole model's in both
    assert np.array_equal(only.proxy_mask, full.proxy_mask)
    assert np.array_equal(only.proxy_normals, full.proxy_normals, equal_nan=True)
    keep = face_region_triangles(model)
    assert 0 < keep.sum() < keep.size
    assert face_region_triangles(model, 2).sum() > keep.sum()


def test_plain_and_flat_albedo_faces(model):
    cam = default_camera((240, 180))
    base = sample_face(np.random.default_rng(5), model, cam)
    assert base.detail is not None and base.detail.forehead > 0 and base.albedo is None
    both = FaceConfig(plain_prob=1.0, flat_albedo_prob=1.0)
    s = sample_face(np.random.default_rng(5), model, cam, both)
    # the same face, pose, lights and detail seed; only the extra choices come after
    assert np.array_equal(s.coefficients.id, base.coefficients.id)
    assert np.array_equal(s.lights.positions, base.lights.positions)
    assert s.detail.seed == base.detail.seed
    for name in ("forehead", "crows_feet", "under_eye", "nasolabial", "roughness", "pores"):
        assert getattr(s.detail, name) == 0.0, name
    # one colour: the drawn albedo's mean over the face region
    region = np.asarray(model.region) > 0.5
    tone = model.albedo(base.coefficients.albedo)[region].mean(0)
    assert s.albedo.shape == (model.n_vertices, 3)
    assert np.allclose(s.albedo, tone[None])
    # rendered: smooth skin of one colour over the same surface shape
    r0 = render_face(model, base, cam, rng=np.random.default_rng(0))
    r1 = render_face(model, s, cam, rng=np.random.default_rng(0))
    face = r0.face_mask & r1.face_mask
    assert np.allclose(r1.albedo[face], tone[None], atol=1e-5)
    assert r0.albedo[face].std(0).max() > 0.01

    def off_coarse(r):
        # the detail is what separates the surface from the coarse model (the proxy)
        ok = face & r.proxy_mask
        cos = np.sum(r.normals[ok] * r.proxy_normals[ok], -1)
        return float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())

    assert off_coarse(r1) < 0.5 * off_coarse(r0)
    assert np.nanmedian(np.abs(r1.depth - r0.depth)[face]) < 0.5
    # off by default: the draws of earlier versions
    none = sample_face(np.random.default_rng(5), model, cam,
                       FaceConfig(plain_prob=0.0, flat_albedo_prob=0.0))
    assert none.to_dict() == base.to_dict()
    for name in ("plain_prob", "flat_albedo_prob"):
        with pytest.raises(ConfigError, match=name):
            FaceConfig(**{name: -0.1})


def test_smoothing_rounds_the_facets_of_a_subdivided_face(model):
    """With Phong tessellation the ground-truth normals of a face without fine detail
    follow the coarse model's interpolated normals (the proxy) more closely than the flat
    facets of midpoint subdivision do; the draws and the depth stay."""
    from faceps.synth.detail import DetailConfig

    cam = default_camera((800, 600))  # built-in edges of about 6 px: two levels
    plain = FaceConfig(detail=DetailConfig(amplitude=0.0))
    flat = sample_face(np.random.default_rng(3), model, cam, plain)
    smooth = sample_face(np.random.default_rng(3), model, cam, replace(plain, smoothing=0.5))
    assert flat.smoothing == 0.0 and smooth.smoothing == 0.5
    assert smooth.to_dict() == {**flat.to_dict(), "smoothing": 0.5}
    r0 = render_face(model, flat, cam, rng=np.random.default_rng(0))
    r1 = render_face(model, smooth, cam, rng=np.random.default_rng(0))

    def off_proxy(r, ok):
        cos = np.sum(r.normals[ok] * r.proxy_normals[ok], -1)
        return np.degrees(np.arccos(np.clip(cos, -1, 1)))

    face = r0.face_mask & r1.face_mask & r0.proxy_mask
    assert face.sum() > 0.95 * r0.face_mask.sum()
    e0, e1 = off_proxy(r0, face), off_proxy(r1, face)
    # facets: about a degree off the interpolated normals (median), a fifth less curved
    assert np.median(e0) > 0.6
    assert np.median(e1) < 0.85 * np.median(e0) and e1.mean() < 0.92 * e0.mean()
    # the surface moves by hundredths of a millimetre (a few pixels at occluding contours
    # see another layer)
    dz = np.abs(r1.depth - r0.depth)[face]
    assert np.nanmedian(dz) < 0.1 and np.nanpercentile(dz, 90) < 0.3
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="smoothing"):
            FaceConfig(smoothing=bad)


def test_expression_strength_in_mm_is_the_same_for_any_model(model):
    """`exp_rms_mm` draws the same expression at the scale that moves the face region by
    that many mm RMS; a model whose expression modes move twice as far gets half the
    scale; a model without expressions gets 0; bad values name the field."""
    per_unit = expression_rms_mm(model)
    assert 5.0 < per_unit < 8.0                       # built-in: 4.5 mm at the default 0.7
    assert expression_rms_mm(model, 0.7) == pytest.approx(0.7 * per_unit)
    assert expression_scale(model, expression_rms_mm(model, 0.7)) == pytest.approx(0.7)
    # a direct measure of the same quantity on independent draws agrees within a few %
    rng = np.random.default_rng(123)
    region = model.region > 0.5
    neutral = model.geometry()[region]
    rms = [np.sqrt(np.mean(np.sum((model.geometry(None, model.sample(
        rng, id_scale=0.0, exp_scale=1.0, albedo_scale=0.0).exp)[region] - neutral) ** 2, 1)))
        for _ in range(300)]
    assert np.mean(rms) == pytest.approx(per_unit, rel=0.06)

    wide = replace(model, exp_basis=model.exp_basis * 2.0)
    assert expression_scale(wide, 3.0) == pytest.approx(0.5 * expression_scale(model, 3.0))
    still = replace(model, exp_basis=model.exp_basis[:, :, :0], exp_std=model.exp_std[:0],
                    exp_names=None, exp_lower=None)
    assert expression_rms_mm(still) == 0.0 and expression_scale(still, 4.0) == 0.0

    cam = default_camera((160, 120))
    seed = next(s for s in range(20) if np.any(
        sample_face(np.random.default_rng(s), model, cam).coefficients.exp))
    plain = sample_face(np.random.default_rng(seed), model, cam)
    mm = sample_face(np.random.default_rng(seed), model, cam, FaceConfig(exp_rms_mm=3.0))
    wmm = sample_face(np.random.default_rng(seed), wide, cam, FaceConfig(exp_rms_mm=3.0))
    k = expression_scale(model, 3.0) / FaceConfig().exp_scale
    np.testing.assert_allclose(mm.coefficients.exp, plain.coefficients.exp * k, rtol=1e-9)
    np.testing.assert_allclose(wmm.coefficients.exp, mm.coefficients.exp * 0.5, rtol=1e-9)
    assert np.array_equal(mm.coefficients.id, plain.coefficients.id)
    assert np.array_equal(mm.lights.positions, plain.lights.positions)
    assert FaceConfig(exp_rms_mm=2).exp_rms_mm == 2.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="exp_rms_mm"):
            FaceConfig(exp_rms_mm=bad)
