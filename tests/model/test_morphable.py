import numpy as np
import pytest

from faceps.core import ModelError
from faceps.model import MorphableModel
from tests.tolerances import assert_close


def small_model(V=30, ki=5, ke=3, ka=2, rng=None):
    rng = rng or np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(V)))
    g = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:V]
    mean = np.concatenate([g * 10.0, rng.normal(size=(V, 1))], 1)
    tris = []
    for r in range(side - 1):
        for c in range(side - 1):
            a, b, d, e = r * side + c, r * side + c + 1, (r + 1) * side + c, (r + 1) * side + c + 1
            if e < V:
                tris += [[a, b, e], [a, e, d]]
    lm = -np.ones(68, int)
    lm[:10] = np.arange(10)
    return MorphableModel(
        mean=mean, id_basis=rng.normal(size=(V, 3, ki)), id_std=np.linspace(3, 1, ki),
        exp_basis=rng.normal(size=(V, 3, ke)), exp_std=np.ones(ke),
        triangles=np.array(tris), landmarks68=lm, name="tiny", license="test", source="test",
        albedo_mean=np.full((V, 3), 0.5), albedo_basis=rng.normal(size=(V, 3, ka)) * 0.01,
        albedo_std=np.ones(ka), face_region=np.arange(V) < V // 2,
        exp_names=[f"e{i}" for i in range(ke)])


def test_geometry_follows_contract_formula():
    m = small_model()
    a, e = np.array([1.0, -0.5, 0, 0, 2]), np.array([0.3, 0, 1.0])
    G = m.geometry(a, e)
    want = (m.mean.astype(float) + np.einsum("vck,k->vc", m.id_basis.astype(float), a * m.id_std)
            + np.einsum("vck,k->vc", m.exp_basis.astype(float), e * m.exp_std))
    assert_close(G, want, rtol=1e-6, atol=1e-5)
    assert G.dtype == np.float64
    # shorter vectors are zero padded
    assert_close(m.geometry(a[:2]), m.geometry(np.r_[a[:2], 0, 0, 0]))
    with pytest.raises(ModelError):
        m.geometry(np.ones(9))


def test_torch_geometry_matches_numpy():
    torch = pytest.importorskip("torch")
    m = small_model()
    rng = np.random.default_rng(1)
    a, e = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    Gt = m.geometry_torch(torch.tensor(a, dtype=torch.float64), torch.tensor(e))
    for b in range(4):
        assert_close(Gt[b], m.geometry(a[b], e[b]), rtol=1e-6, atol=1e-5)
    At = m.albedo_torch(torch.zeros(2, 2))
    assert At.shape == (2, 30, 3)
    x = torch.zeros(1, 5, requires_grad=True)
    m.geometry_torch(x, torch.zeros(1, 3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_save_load_round_trip(tmp_path):
    m = small_model()
    path = m.save(tmp_path / "m.npz")
    m2 = MorphableModel.load(path)
    for k, v in m.to_arrays().items():
        assert np.array_equal(np.asarray(v), np.asarray(m2.to_arrays()[k])), k
    assert m2.exp_names == m.exp_names and m2.name == "tiny"
    with np.load(path, allow_pickle=False) as z:
        assert str(z["format"]) == "faceps.morphable/1"
        assert z["triangles"].dtype == np.int32 and z["mean"].dtype == np.float32


def test_crop_keeps_triangles_and_remaps_landmarks():
    m = small_model()
    keep = np.arange(5, 30)
    c = m.crop(keep)
    assert c.n_vertices == 25
    assert_close(c.mean, m.mean[keep])
    assert c.landmarks68[:5].tolist() == [-1] * 5 and c.landmarks68[5:10].tolist() == [0, 1, 2,
                                                                                        3, 4]
    assert c.triangles.max() < 25
    assert c.n_triangles < m.n_triangles
    mask_crop = m.crop(np.isin(np.arange(30), keep))
    assert np.array_equal(mask_crop.triangles, c.triangles)
    with pytest.raises(ModelError):
        m.crop([0, 0, 1])


def test_sampling_is_seeded_and_truncated():
    m = small_model()
    s1 = m.sample(np.random.default_rng(5))
    s2 = m.sample(np.random.default_rng(5))
    assert np.array_equal(s1.id, s2.id) and s1.albedo.shape == (2,)
    big = m.sample(np.random.default_rng(0), id_scale=1.0, truncate=0.5)
    assert np.all(np.abs(big.id) <= 0.5)
    assert m.truncated(n_id=2, n_exp=1).n_id == 2


def _write(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("mean"), "missing required array"),
    (lambda d: d.update(id_std=np.ones(2)), "id_std"),
    (lambda d: d.update(triangles=np.array([[0, 1, 99]])), "triangles"),
    (lambda d: d.update(landmarks68=np.zeros(10, int)), "landmarks68"),
    (lambda d: d.update(format=np.array("faceps.morphable/9")), "unsupported format"),
    (lambda d: d.update(mean=np.full((30, 3), np.nan)), "mean"),
    (lambda d: d.update(triangles=np.zeros((2, 3)) + 0.5), "integer"),
    (lambda d: d.update(id_basis=np.array([{"x": 1}], dtype=object)), "pickled"),
])
def test_malformed_files_raise_model_error(tmp_path, mutate, message):
    d = small_model().to_arrays()
    mutate(d)
    p = _write(tmp_path, **d)
    with pytest.raises(ModelError, match=message) as info:
        MorphableModel.load(p)
    assert "bad.npz" in str(info.value)


def test_not_a_zip(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelError, match="junk.npz"):
        MorphableModel.load(p)
    with pytest.raises(ModelError, match="not found"):
        MorphableModel.load(tmp_path / "missing.npz")


def test_one_sided_expressions_are_sampled_on_their_side(tmp_path):
    from dataclasses import replace

    m = replace(small_model(), exp_lower=np.array([0.0, -np.inf, 0.0]))
    draws = np.array([m.sample(np.random.default_rng(i)).exp for i in range(200)])
    assert draws[:, 0].min() >= 0 and draws[:, 2].min() >= 0 and draws[:, 1].min() < 0
    back = MorphableModel.load(m.save(tmp_path / "m.npz"))
    assert np.array_equal(back.exp_lower, m.exp_lower)
    assert m.truncated(n_exp=2).exp_lower.shape == (2,)
