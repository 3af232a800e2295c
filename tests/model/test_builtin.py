"""The built-in procedural face model: sizes, determinism, anatomy, landmarks, components,
albedo, caching, and the preview renderer."""

import time

import cv2
import numpy as np
import pytest

import faceps.model.builtin as builtin
from faceps.core.mesh import face_normals, vertex_normals
from faceps.model import MorphableModel, load_model
from faceps.model.builtin import (
    EXPRESSION_NAMES,
    ONE_SIDED_EXPRESSIONS,
    build_builtin_model,
    builtin_cache_path,
    builtin_model,
)
from faceps.model.morphable import Coefficients
from faceps.model.preview import preview_grid, render_expressions, render_face

# iBUG-68 mirror partners (k <-> MIRROR[k]) under x -> -x
MIRROR = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30]
    + [35, 34, 33, 32, 31] + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])


@pytest.fixture(scope="module")
def model() -> MorphableModel:
    return build_builtin_model()


@pytest.fixture(scope="module")
def lm(model) -> np.ndarray:
    return model.landmark_points(model.mean)


def surface_z(model, x, y, radius=2.0):
    """Mean z of the front surface vertices within ``radius`` of (x, y)."""
    P = model.mean
    near = (np.hypot(P[:, 0] - x, P[:, 1] - y) < radius) & (P[:, 2] > 0)
    assert near.any(), f"no front vertex near ({x}, {y})"
    return float(P[near, 2].mean())


def flipped(model, G):
    """Number of triangles whose normal turned by more than 90 degrees from the mean."""
    n0 = face_normals(model.mean, model.triangles)
    n = face_normals(G, model.triangles)
    return int(np.sum(np.einsum("ij,ij->i", n, n0) < 0))


# ------------------------------------------------------------------ sizes and identity
def test_sizes_and_metadata(model):
    assert 10_000 <= model.n_vertices <= 20_000
    assert model.n_triangles > 1.9 * model.n_vertices
    assert model.n_id >= 40
    assert np.all(np.diff(model.id_std) <= 0), "id_std must be non-increasing"
    assert model.id_std[0] > 3.0 and model.id_std[-1] > 0.2      # mm
    assert model.n_exp >= 15 and model.exp_names == EXPRESSION_NAMES
    assert set(ONE_SIDED_EXPRESSIONS) <= set(EXPRESSION_NAMES)
    assert np.allclose(model.exp_std, 1.0)
    assert model.n_albedo >= 8 and model.n_albedo == len(builtin.ALBEDO_NAMES)
    assert model.id_names is not None and len(set(model.id_names)) == model.n_id
    assert model.name == "faceps-builtin"
    assert model.license == "MIT (procedural model, part of faceps)"
    assert model.source == "procedural, faceps.model.builtin"
    assert model.mean.dtype == np.float32 and model.triangles.dtype == np.int32
    assert model.landmark_valid.all()


def test_deterministic():
    a, b = build_builtin_model().to_arrays(), build_builtin_model().to_arrays()
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"'{k}' differs between two builds"


def test_build_time():
    t0 = time.perf_counter()
    build_builtin_model()
    assert time.perf_counter() - t0 < 6.0      # about a second on one core; cached anyway


def test_identity_modes_are_orthogonal_and_normalised(model):
    B = model.id_basis.reshape(-1, model.n_id).astype(np.float64)
    G = B.T @ B
    off = G - np.diag(np.diag(G))
    assert np.abs(off).max() < 1e-4 * np.diag(G).min()
    peak = np.linalg.norm(model.id_basis, axis=1).max(axis=0)     # per mode, mm per unit
    assert np.allclose(peak, 1.0, atol=1e-4)


# ------------------------------------------------------------------ geometry
def test_orientation_outward(model):
    G = model.mean.astype(np.float64)
    n = face_normals(G, model.triangles)
    centres = G[model.triangles].mean(axis=1)
    radial = centres * np.array([1.0, 0.0, 1.0])                 # away from the vertical axis
    outward = np.einsum("ij,ij->i", n, radial) > 0
    assert outward.mean() > 0.97
    vn = vertex_normals(G, model.triangles)
    tip = int(np.argmax(G[:, 2]))
    assert vn[tip, 2] > 0.7
    assert abs(G[tip, 0]) < 0.5                                   # the nose tip is midline


def test_frame_and_proportions(model, lm):
    P = model.mean.astype(np.float64)
    # frame: origin near the head centre, face at z ~ 80..110, nose tip the largest z
    assert abs(P[:, 0].mean()) < 1.0
    assert 110 < P[:, 2].max() < 125
    assert int(np.argmax(P[:, 2])) == model.landmarks68[30]
    for x, y in [(0, 40), (0, 20), (30, -35), (0, -45), (0, -85)]:
        assert 80 < surface_z(model, x, y) < 110, (x, y)
    # bizygomatic width: the widest point of the face in front of the ears
    band = (np.abs(P[:, 1]) < 6) & (P[:, 2] > 5)
    width = P[band, 0].max() - P[band, 0].min()
    assert 125 < width < 155
    # nasion to menton
    assert 105 < lm[27, 1] + 3 - lm[8, 1] < 130
    # nose: tip protrudes 20-30 mm from the cheeks beside the alar base
    beside = (np.abs(np.abs(P[:, 0]) - 25) < 3) & (np.abs(P[:, 1] + 26) < 4) & (P[:, 2] > 0)
    protrusion = P[:, 2].max() - P[beside, 2].mean()
    assert 20 < protrusion < 30
    # eyes, mouth, nose widths (mm)
    assert 28 < lm[42, 0] - lm[39, 0] < 42               # intercanthal
    assert 80 < lm[45, 0] - lm[36, 0] < 100              # biocular
    assert 42 < lm[54, 0] - lm[48, 0] < 58               # mouth
    assert 22 < lm[35, 0] - lm[31, 0] < 40               # nose base
    # concave orbits: the closed lid lies behind the brow ridge and the nasal bridge
    eye = surface_z(model, 32, 11)
    assert eye < surface_z(model, 30, 28) - 5
    assert eye < surface_z(model, 0, 11) - 8
    # the lips protrude beyond the labiomental fold, the chin beyond the fold too
    assert surface_z(model, 0, -60) > surface_z(model, 0, -71) + 4
    assert surface_z(model, 0, -87) > surface_z(model, 0, -71) + 1


def test_mirror_symmetric(model):
    P = model.mean.astype(np.float64)
    mirrored = P * np.array([-1.0, 1.0, 1.0])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(P).query(mirrored)
    assert d.max() < 1e-3


def test_landmark_layout(model, lm):
    x, y, z = lm[:, 0], lm[:, 1], lm[:, 2]
    assert len(set(model.landmarks68.tolist())) == 68
    # mirror pairs: x negated, same y and z
    assert np.allclose(lm[MIRROR] * [-1, 1, 1], lm, atol=0.5)
    assert np.all(np.abs(x[27:31]) < 0.5) and abs(x[33]) < 0.5 and abs(x[8]) < 0.5
    # subject's right (image left of a frontal face) has x < 0
    assert x[0] < 0 < x[16] and x[36] < 0 < x[45] and x[48] < 0 < x[54]
    assert np.all(x[17:22] < 0) and np.all(x[22:27] > 0)
    assert np.all(x[36:42] < 0) and np.all(x[42:48] > 0)
    # the contour runs down to the chin and back up; 8 is its lowest point
    assert int(np.argmin(y[:17])) == 8
    assert np.all(np.diff(x[:17]) > 0)
    assert np.all(np.diff(y[:9]) < 0) and np.all(np.diff(y[8:17]) > 0)
    # eye corners: outer (36, 45) lateral to inner (39, 42); lids above / below
    assert x[36] < x[39] and x[45] > x[42]
    assert y[37] > y[41] and y[38] > y[40] and y[43] > y[47] and y[44] > y[46]
    # vertical order: brows > eyes > nose base > lips > chin
    assert y[17:27].min() > y[36:48].max()
    assert y[36:48].min() > y[27] - 12 > y[31:36].max()
    assert y[31:36].min() > y[48:68].max()
    assert y[48:68].min() > y[8]
    # nose bridge descends to the tip; 30 is the most anterior landmark
    assert np.all(np.diff(y[27:31]) < 0)
    assert int(np.argmax(z)) == 30
    # lips: upper outer above inner, inner upper above inner lower, lower outer below
    assert y[51] > y[62] > y[66] > y[57]
    assert y[50] > y[61] and y[58] < y[67]


def test_face_region(model):
    P = model.mean
    r = model.face_region
    assert r.dtype == bool and 0.25 < r.mean() < 0.7
    assert r[model.landmarks68[[30, 36, 45, 48, 54, 57, 27]]].all()
    assert not r[P[:, 1] < -115].any()                 # neck
    assert not r[P[:, 1] > 90].any()                   # top of the head
    theta = np.degrees(np.arctan2(P[:, 0], P[:, 2]))
    assert not r[np.abs(theta) > 85].any()             # ear-side band and behind


def test_identity_samples_are_plausible_and_distinct(model):
    rng = np.random.default_rng(7)
    shapes = []
    for _ in range(24):
        c = model.sample(rng)
        G = model.geometry(c.id)
        assert flipped(model, G) == 0, "an identity sample folds the mesh"
        disp = np.linalg.norm(G - model.mean, axis=1)
        assert disp.max() < 40.0
        # smooth: neighbouring vertices move alike (no spikes)
        e = model.triangles[:, [0, 1]]
        assert np.abs(disp[e[:, 0]] - disp[e[:, 1]]).max() < 2.5
        shapes.append(G)
    S = np.stack(shapes)
    rms = [np.sqrt(np.mean(np.sum((S[i] - S[j]) ** 2, 1))) for i in range(5) for j in range(i)]
    assert min(rms) > 2.0                                # mm: visibly different people


# ------------------------------------------------------------------ expressions
def test_expressions_are_localised_and_plausible(model):
    P = model.mean.astype(np.float64)
    lmk = model.landmarks68
    for k, name in enumerate(model.exp_names):
        for alpha in (1.0, 2.0):
            e = np.zeros(model.n_exp)
            e[k] = alpha
            G = model.geometry(None, e)
            assert flipped(model, G) <= 16, f"{name} at {alpha} folds the mesh"
        d = np.linalg.norm(model.exp_basis[:, :, k], axis=1)
        assert d.max() > 2.5, f"{name} barely moves"
        # localised: most of the head does not move
        assert np.mean(d > 0.1 * d.max()) < 0.5, f"{name} is not localised"
        assert d[P[:, 1] < -135].max() < 0.3 * d.max()           # neck bottom stays
    e = np.zeros(model.n_exp)

    def moved(name, alpha=1.5):
        ee = e.copy()
        ee[model.exp_names.index(name)] = alpha
        return model.geometry(None, ee) - P

    d = moved("jaw_open")
    assert d[lmk[8], 1] < -8 and d[lmk[57], 1] < -6 and abs(d[lmk[51], 1]) < 1.0
    d = moved("smile_left")
    assert d[lmk[54], 1] > 4 and abs(d[lmk[48], 1]) < 1.0
    d = moved("smile_right")
    assert d[lmk[48], 1] > 4 and abs(d[lmk[54], 1]) < 1.0
    d = moved("brow_raise")
    assert d[lmk[19], 1] > 3 and d[lmk[24], 1] > 3 and abs(d[lmk[8], 1]) < 0.1
    d = moved("eye_close_left")
    assert np.abs(d[lmk[42:48]]).max() > 1.0 and np.abs(d[lmk[36:42]]).max() < 0.1
    d = moved("lip_pucker")
    assert d[lmk[51], 2] > 5 and d[lmk[54], 0] < -3


# ------------------------------------------------------------------ albedo
def test_albedo_samples_stay_in_range(model):
    rng = np.random.default_rng(3)
    B = model.albedo_basis.reshape(-1, model.n_albedo).astype(np.float64)
    mean = model.albedo_mean.astype(np.float64)
    assert mean.min() >= 0 and mean.max() <= 1
    inside = 0
    for _ in range(400):
        c = model.sample(rng)
        raw = mean + (B @ (c.albedo * model.albedo_std)).reshape(-1, 3)   # not clipped
        # rare joint extremes (several components beyond 2.5 sd) graze 0 by a hair
        assert raw.min() > -0.02 and raw.max() < 1.0
        inside += raw.min() >= 0.0
        A = model.albedo(c.albedo)
        assert A.min() >= 0.0 and A.max() <= 1.0
    assert inside >= 0.99 * 400


def test_albedo_tone_axis_and_regions(model, lm):
    lmk = model.landmarks68
    cheek = int(np.argmin(np.sum((model.mean - [40.0, -18.0, 85.0]) ** 2, axis=1)))

    def tone(alpha):
        a = np.zeros(model.n_albedo)
        a[0] = alpha
        return model.albedo(a)[cheek]

    light, dark = tone(-2.5), tone(2.5)
    luma = np.array([0.2126, 0.7152, 0.0722])
    assert light @ luma > 0.4 and dark @ luma < 0.12               # very light .. dark
    assert dark[2] / dark[0] < light[2] / light[0]                 # darker is more saturated
    A = model.albedo_mean
    lips, skin = A[lmk[[51, 57]]].mean(0), A[cheek]
    assert lips[0] / lips[1] > skin[0] / skin[1]                   # redder lips
    brow = A[lmk[[19, 24]]].mean(0)
    assert brow.sum() < 0.7 * skin.sum()                           # darker brows


# ------------------------------------------------------------------ persistence and cache
def test_save_load_round_trip(model, tmp_path):
    path = model.save(tmp_path / "builtin.npz")
    back = MorphableModel.load(path)
    for k, v in model.to_arrays().items():
        assert np.array_equal(back.to_arrays()[k], v), k
    assert back.exp_names == model.exp_names and back.id_names == model.id_names


def test_builtin_model_is_memoised_and_cached(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(builtin, "_MODEL", None)
    path = builtin_cache_path()
    assert path.parent == tmp_path / "faceps" and path.name.startswith("builtin-")
    stale = path.parent / "builtin-000000000000.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older version")
    m1 = builtin_model()
    assert path.is_file() and not stale.exists()
    assert builtin_model() is m1 and load_model("builtin") is m1
    assert np.array_equal(m1.mean, model.mean)
    # a corrupt cache file is rebuilt and rewritten
    path.write_bytes(b"not a zip file")
    monkeypatch.setattr(builtin, "_MODEL", None)
    m2 = builtin_model()
    assert np.array_equal(m2.id_basis, model.id_basis)
    assert MorphableModel.load(path).n_vertices == model.n_vertices
    # and a good cache file is used as is
    monkeypatch.setattr(builtin, "_MODEL", None)
    assert np.array_equal(builtin_model().exp_basis, model.exp_basis)


# ------------------------------------------------------------------ preview
def test_render_face_tile(model):
    img = render_face(model, None, yaw_deg=0.0, size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    bg = img[0, 0].astype(int)
    face = np.any(np.abs(img.astype(int) - bg) > 12, axis=2)
    assert 0.3 < face.mean() < 0.95                                # the face fills the tile
    side = render_face(model, Coefficients(np.zeros(3), np.zeros(1), np.zeros(1)),
                       yaw_deg=45.0, size=64)
    assert not np.array_equal(side, img)


def test_preview_grid_and_expression_sheet(model, tmp_path):
    out = preview_grid(model, tmp_path / "grid.png", n=3, seed=1, size=40, per_row=2)
    img = cv2.imread(str(out))
    assert img.shape == (2 * 40, 2 * 2 * 40, 3)
    sheet = render_expressions(model, tmp_path / "expr.png", size=40, per_row=7)
    img = cv2.imread(str(sheet))
    rows = -(-(model.n_exp + 1) // 7)
    assert img.shape == (rows * 40, 7 * 40, 3)
