"""Importers of research morphable models: small files in each format, made here."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from faceps.cli import main
from faceps.core.errors import ModelError
from faceps.core.mesh import vertex_normals
from faceps.model import MorphableModel
from faceps.model.importers import (
    ICT_FACE_VERTICES,
    ICT_LANDMARKS68,
    KINDS,
    import_bfm2009,
    import_bfm2017,
    import_flame,
    import_ict_facekit,
    import_model,
    import_sfm,
    orient_outward,
    read_landmark_ids,
    read_obj,
)
from faceps.model.importers import read_sfm_landmark_mapping as read_mapping
from faceps.model.safe_pickle import PickledChumpy, load_pickle, loads_pickle
from tests.shared_data import shared_data_root
from tests.tolerances import assert_close

#: geometry reproduced from coefficients, mm
GEOM_ATOL = 0.01

SFM_DIR = shared_data_root() / "sfm"


# ------------------------------------------------------------------ mesh helpers
def grid(n: int, spacing: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """An n x n grid bulging toward +z (max z at the centre) and its quads, CCW from +z.

    Vertex (r, c) is r * n + c with x = c, y = r (y up), so (a, b, e, d) below runs
    counter-clockwise seen from +z.
    """
    c, r = np.meshgrid(np.arange(n), np.arange(n))
    x = (c.reshape(-1) - (n - 1) / 2) * spacing
    y = (r.reshape(-1) - (n - 1) / 2) * spacing
    half = (n - 1) / 2 * spacing
    z = height * np.exp(-(x**2 + y**2) / (0.5 * half) ** 2)
    quads = []
    for rr in range(n - 1):
        for cc in range(n - 1):
            a = rr * n + cc
            quads.append([a, a + 1, a + n + 1, a + n])
    return np.stack([x, y, z], 1), np.asarray(quads, np.int64)


def quads_to_tris(quads: np.ndarray) -> np.ndarray:
    return np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]], 1).reshape(-1, 3)


def write_obj(path: Path, vertices: np.ndarray, quads: np.ndarray | None = None) -> None:
    """An OBJ with v, vt, vn and v/vt/vn faces; the first face uses negative indices."""
    lines = ["# test mesh", "o head"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    if quads is not None:
        n = len(vertices)
        lines += [f"vt {u:.4f} {v:.4f}" for u, v in vertices[:, :2] * 0.01]
        lines += ["vn 0 0 1"]
        for k, q in enumerate(quads + 1):
            if k == 0:
                q = q - n - 1  # the same vertices as negative (relative) indices
            lines.append("f " + " ".join(f"{i}/{i if i > 0 else -1}/1" for i in q))
    path.write_text("\n".join(lines) + "\n")


# ===================================================================== OBJ reader
def test_read_obj_polygons_negative_indices_and_noise(tmp_path):
    text = (
        "# comment\r\n"
        "mtllib x.mtl\r\n"
        "v 0 0 0 1 0 0\r\n"          # vertex colour columns are ignored
        "v 1 0 0\r\n"
        "  v 1 1 0 # trailing comment\r\n"
        "v 0 1 0\r\n"
        "v 2 0 0\r\n"
        "vt 0 0\r\nvn 0 0 1\r\n"
        "usemtl skin\r\n"
        "f 1/1/1 2/1/1 3/1/1 4/1/1\r\n"   # quad
        "f -4//1 -1//1 -3//1\r\n"          # triangle by negative indices: 2 5 3
        "f 1 2 5 3 4\r\n"                  # pentagon
    )
    path = tmp_path / "poly.obj"
    path.write_bytes(text.encode())
    V, F = read_obj(path)
    assert V.shape == (5, 3)
    assert_close(V[2], [1, 1, 0])
    expected = [[0, 1, 2], [0, 2, 3], [1, 4, 2], [0, 1, 4], [0, 4, 2], [0, 2, 3]]
    np.testing.assert_array_equal(F, expected)
    V2, F2 = read_obj(path, faces=False)
    assert F2 is None and np.array_equal(V, V2)


def test_read_obj_scattered_vertex_lines(tmp_path):
    path = tmp_path / "scattered.obj"
    path.write_text("v 0 0 0\nvt 0 0\nv 1 0 0 1.0\n# c\nv 0 1 0\nf 1 2 3\nv 1 1 0\n"
                    "f 2 -1 3\n")
    V, F = read_obj(path)
    np.testing.assert_array_equal(V, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(F, [[0, 1, 2], [1, 3, 2]])


@pytest.mark.parametrize("body, message", [
    ("v 0 0\n", "fewer than 3"),
    ("v 0 0 x\n", "unparsable vertex"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n", "outside"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", "1-based"),
    ("v 0 0 0\nv 1 0 0\nf 1 2\n", "at least 3"),
    ("# nothing\n", "no vertices"),
])
def test_read_obj_malformed(tmp_path, body, message):
    path = tmp_path / "bad.obj"
    path.write_text(body)
    with pytest.raises(ModelError, match=message) as exc:
        read_obj(path)
    assert "bad.obj" in str(exc.value)


# ==================================================================== ICT-FaceKit
ICT_N = 100  # a 100 x 100 grid: 10000 vertices, more than the 9409-vertex face area


@pytest.fixture(scope="module")
def ict_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ICT-FaceKit")
    base = root / "FaceXModel"
    base.mkdir()
    rng = np.random.default_rng(1)
    neutral, quads = grid(ICT_N, 0.25, 3.0)  # centimetres
    write_obj(base / "generic_neutral_mesh.obj", neutral, quads)
    meshes = {}
    smooth = np.stack([np.sin(neutral[:, 0] / 5), np.cos(neutral[:, 1] / 7),
                       neutral[:, 0] * neutral[:, 1] / 100], 1)
    for name in ("identity000", "identity002", "identity010", "jawOpen", "mouthSmile_L",
                 "eyeBlink_L"):
        v = neutral + smooth * rng.normal(size=3) * 0.5 + rng.normal(size=neutral.shape) * 0.01
        meshes[name] = v
        write_obj(base / f"{name}.obj", v)
    (base / "readme.txt").write_text("not a mesh")
    return root, neutral, quads, meshes


def test_ict_face_crop_round_trip(ict_folder, tmp_path):
    root, neutral, quads, meshes = ict_folder
    model = import_ict_facekit(root)
    n = ICT_FACE_VERTICES
    assert model.n_vertices == n
    assert model.id_names == ("identity000", "identity002", "identity010")
    assert model.exp_names == ("eyeBlink_L", "jawOpen", "mouthSmile_L")
    np.testing.assert_array_equal(model.id_std, 1)
    np.testing.assert_array_equal(model.exp_std, 1)
    np.testing.assert_array_equal(model.landmarks68, ICT_LANDMARKS68)
    assert model.license == "MIT (ICT-FaceKit)" and model.source == str(root)
    assert_close(model.mean, neutral[:n] * 10, atol=GEOM_ATOL, rtol=0, name="mean")
    for k, name in enumerate(model.id_names):
        alpha = np.eye(3)[k]
        assert_close(model.geometry(alpha_id=alpha), meshes[name][:n] * 10, atol=GEOM_ATOL,
                     rtol=0, name=name)
    for k, name in enumerate(model.exp_names):
        w = 0.5 * np.eye(3)[k]
        want = (neutral + 0.5 * (meshes[name] - neutral))[:n] * 10
        assert_close(model.geometry(alpha_exp=w), want, atol=GEOM_ATOL, rtol=0, name=name)
    tris = quads_to_tris(quads)
    np.testing.assert_array_equal(model.triangles, tris[np.all(tris < n, axis=1)])
    out = model.save(tmp_path / "ict.npz")
    back = MorphableModel.load(out)
    for key, value in model.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[key], value, err_msg=key)


def test_ict_whole_head_and_facexmodel_folder(ict_folder):
    root, neutral, quads, _ = ict_folder
    model = import_model("ict-facekit", root / "FaceXModel", whole_head=True)
    assert model.n_vertices == ICT_N**2
    assert int(model.region.sum()) == ICT_FACE_VERTICES
    np.testing.assert_array_equal(model.triangles, quads_to_tris(quads))
    np.testing.assert_array_equal(model.landmarks68, ICT_LANDMARKS68)
    n = vertex_normals(model.mean, model.triangles)
    assert n[np.argmax(model.mean[:, 2]), 2] > 0.99  # orientation kept: CCW from +z


def test_ict_errors_name_the_file(ict_folder, tmp_path):
    with pytest.raises(ModelError, match="generic_neutral_mesh.obj"):
        import_ict_facekit(tmp_path)
    base = tmp_path / "FaceXModel"
    base.mkdir()
    root, neutral, quads, _ = ict_folder
    write_obj(base / "generic_neutral_mesh.obj", neutral, quads)
    write_obj(base / "identity000.obj", neutral[:-5])
    with pytest.raises(ModelError, match="identity000.obj.*9995 vertices"):
        import_ict_facekit(tmp_path)


# ==================================================================== BFM 2009
def bfm_arrays(rng, n=21, k=5, ka=4):
    """Flat BFM-style arrays (3V, ...) in mm, and quads CCW from +z."""
    V, quads = grid(n, 8.0, 40.0)
    basis, _ = np.linalg.qr(rng.normal(size=(3 * n * n, k)))
    tex_basis, _ = np.linalg.qr(rng.normal(size=(3 * n * n, ka)))
    return dict(
        mean=V.reshape(-1), basis=basis, std=np.linspace(30, 5, k),
        tex_mean=rng.uniform(60, 200, 3 * n * n), tex_basis=tex_basis * 255,
        tex_std=np.linspace(0.2, 0.05, ka), tris=quads_to_tris(quads), n=n * n)


def bfm2009_vars(a, clockwise=True):
    tl = a["tris"][:, [0, 2, 1]] if clockwise else a["tris"]
    return {
        "shapeMU": (a["mean"] * 1000)[:, None].astype(np.float32),
        "shapePC": (a["basis"] * 1000).astype(np.float32),
        "shapeEV": a["std"][:, None], "texMU": a["tex_mean"][:, None],
        "texPC": a["tex_basis"], "texEV": a["tex_std"][:, None],
        "tl": (tl + 1).astype(np.float64),
    }


def check_bfm(model, a, alpha):
    want = (a["mean"] + a["basis"] @ (alpha * a["std"])).reshape(-1, 3)
    assert_close(model.geometry(alpha_id=alpha), want, atol=GEOM_ATOL, rtol=0, name="geometry")
    assert_close(model.mean, a["mean"].reshape(-1, 3), atol=GEOM_ATOL, rtol=0, name="mean")
    n = vertex_normals(model.mean, model.triangles)
    assert n[np.argmax(model.mean[:, 2]), 2] > 0.99
    np.testing.assert_array_equal(model.triangles, a["tris"])


def test_bfm2009_v5_mat_flips_clockwise_triangles(tmp_path):
    rng = np.random.default_rng(2)
    a = bfm_arrays(rng)
    path = tmp_path / "01_MorphableModel.mat"
    scipy.io.savemat(path, bfm2009_vars(a, clockwise=True))
    model = import_bfm2009(path)
    check_bfm(model, a, rng.normal(size=5))
    assert model.n_exp == 0 and model.exp_basis.shape == (a["n"], 3, 0)
    assert np.all(model.landmarks68 == -1)
    assert_close(model.albedo_mean, a["tex_mean"].reshape(-1, 3) / 255, atol=1e-6)
    beta = rng.normal(size=4)
    want = (a["tex_mean"] + a["tex_basis"] @ (beta * a["tex_std"])) / 255
    assert_close(model.albedo(beta), np.clip(want.reshape(-1, 3), 0, 1), atol=1e-5)
    assert model.license == "BFM licence: non-commercial research"
    back = MorphableModel.load(model.save(tmp_path / "bfm.npz"))
    assert np.array_equal(back.id_basis, model.id_basis)
    assert np.array_equal(back.triangles, model.triangles)


def test_bfm2009_v73_hdf5_and_landmark_file(tmp_path):
    rng = np.random.default_rng(3)
    a = bfm_arrays(rng)
    path = tmp_path / "01_MorphableModel.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in bfm2009_vars(a, clockwise=False).items():
            f[name] = np.ascontiguousarray(value.T)  # MATLAB is column-major
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    ids = np.full(68, -1)
    ids[30], ids[8] = np.argmax(a["mean"].reshape(-1, 3)[:, 2]), 3
    lm_path = tmp_path / "bfm_landmarks.txt"
    lm_path.write_text("# 68 iBUG vertex ids\n" + "\n".join(map(str, ids)) + "\n")
    model = import_model("bfm2009", path, landmarks=lm_path)
    check_bfm(model, a, rng.normal(size=5))
    np.testing.assert_array_equal(model.landmarks68, ids)


def test_bfm2009_malformed(tmp_path):
    rng = np.random.default_rng(4)
    a = bfm_arrays(rng)
    v = bfm2009_vars(a)
    del v["shapePC"]
    path = tmp_path / "missing.mat"
    scipy.io.savemat(path, v)
    with pytest.raises(ModelError, match="missing.mat.*shapePC"):
        import_bfm2009(path)
    v = bfm2009_vars(a)
    v["tl"] = v["tl"] - 1  # 0-based where 1-based is expected
    scipy.io.savemat(tmp_path / "zero.mat", v)
    with pytest.raises(ModelError, match="zero.mat.*'tl'"):
        import_bfm2009(tmp_path / "zero.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 20)
    with pytest.raises(ModelError, match="junk.mat"):
        import_bfm2009(tmp_path / "junk.mat")


# =============================================================== BFM 2017 / 2019
def write_bfm2017(path: Path, a: dict, rng, *, clockwise=True, ke=3) -> dict:
    n = a["n"]
    exp_basis, _ = np.linalg.qr(rng.normal(size=(3 * n, ke)))
    extra = {"exp_mean": rng.normal(size=3 * n) * 0.1, "exp_basis": exp_basis,
             "exp_std": np.linspace(4, 1, ke)}
    tris = a["tris"][:, [0, 2, 1]] if clockwise else a["tris"]
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = a["mean"].astype(np.float32)
        f["shape/model/pcaBasis"] = a["basis"].astype(np.float32)
        f["shape/model/pcaVariance"] = (a["std"] ** 2).astype(np.float32)
        f["shape/representer/cells"] = tris.T.astype(np.uint32)
        f["shape/representer/points"] = a["mean"].reshape(-1, 3).T
        f["color/model/mean"] = a["tex_mean"] / 255
        f["color/model/pcaBasis"] = a["tex_basis"] / 255
        f["color/model/pcaVariance"] = a["tex_std"] ** 2
        f["expression/model/mean"] = extra["exp_mean"]
        f["expression/model/pcaBasis"] = extra["exp_basis"]
        f["expression/model/pcaVariance"] = extra["exp_std"] ** 2
    return extra


@pytest.mark.parametrize("kind", ["bfm2017", "bfm2019"])
def test_bfm2017_round_trip(tmp_path, kind):
    rng = np.random.default_rng(5)
    a = bfm_arrays(rng)
    path = tmp_path / "model2017-1_face12_nomouth.h5"
    e = write_bfm2017(path, a, rng)
    model = import_model(kind, path)
    alpha, beta = rng.normal(size=5), rng.normal(size=3)
    want = (a["mean"] + e["exp_mean"] + a["basis"] @ (alpha * a["std"])
            + e["exp_basis"] @ (beta * e["exp_std"])).reshape(-1, 3)
    assert_close(model.geometry(alpha, beta), want, atol=GEOM_ATOL, rtol=0, name="geometry")
    assert_close(model.id_std, a["std"], rtol=1e-6, atol=1e-6)
    assert_close(model.exp_std, e["exp_std"], rtol=1e-6, atol=1e-6)
    assert_close(model.albedo_mean, a["tex_mean"].reshape(-1, 3) / 255, atol=1e-6)
    np.testing.assert_array_equal(model.triangles, a["tris"])  # clockwise cells flipped
    assert model.name.startswith(f"BFM {kind[3:]}")
    back = MorphableModel.load(model.save(tmp_path / "out.npz"))
    for key, value in model.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[key], value, err_msg=key)


def test_bfm2017_shape_only_and_json_landmarks(tmp_path):
    rng = np.random.default_rng(6)
    a = bfm_arrays(rng)
    path = tmp_path / "shape_only.h5"
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = a["mean"]
        f["shape/model/pcaBasis"] = a["basis"]
        f["shape/model/pcaVariance"] = a["std"] ** 2
        f["shape/representer/cells"] = a["tris"].T
    ids = list(range(68))
    (tmp_path / "lm.json").write_text(json.dumps({"landmarks68": ids}))
    model = import_bfm2017(path, landmarks=tmp_path / "lm.json")
    check_bfm(model, a, rng.normal(size=5))
    assert not model.has_albedo and model.n_exp == 0
    np.testing.assert_array_equal(model.landmarks68, ids)


def test_bfm2017_malformed(tmp_path):
    rng = np.random.default_rng(7)
    a = bfm_arrays(rng)
    path = tmp_path / "broken.h5"
    write_bfm2017(path, a, rng)
    with h5py.File(path, "a") as f:
        del f["shape/model/pcaVariance"]
    with pytest.raises(ModelError, match="broken.h5.*shape/model/pcaVariance"):
        import_bfm2017(path)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ModelError, match="text.h5.*not an HDF5"):
        import_bfm2017(tmp_path / "text.h5")
    with pytest.raises(ModelError, match="absent.h5.*not found"):
        import_bfm2017(tmp_path / "absent.h5")


@pytest.mark.parametrize("content, message", [
    ("1 2 3", "expected 68"),
    (" ".join(["5"] * 67 + ["400"]), r"\[0, 400\)"),
    (" ".join(["x"] * 68), "integer"),
    ("[1, 2", "not valid JSON"),
])
def test_landmark_file_errors(tmp_path, content, message):
    path = tmp_path / "lm.txt"
    path.write_text(content)
    with pytest.raises(ModelError, match=message) as exc:
        read_landmark_ids(path, 400)
    assert "lm.txt" in str(exc.value)


def test_orient_outward_flips_only_inward_meshes():
    V, quads = grid(5, 1.0, 2.0)
    tris = quads_to_tris(quads)
    np.testing.assert_array_equal(orient_outward(V, tris), tris)
    np.testing.assert_array_equal(orient_outward(V, tris[:, ::-1]), tris[:, ::-1][:, [0, 2, 1]])


# ========================================================================= FLAME
FLAME_K = 400


def flame_arrays(rng, n=12):
    V, quads = grid(n, 0.01, 0.03)  # metres
    return {
        "v_template": V,
        "shapedirs": rng.normal(size=(n * n, 3, FLAME_K)) * 1e-4,
        "f": quads_to_tris(quads).astype(np.uint32),
        "posedirs": rng.normal(size=(n * n, 3, 36)),
        "weights": rng.uniform(size=(n * n, 5)),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "bs_style": "lbs", "bs_type": "lrotmin",
    }


def check_flame(model, arrays, rng):
    assert model.n_id == 300 and model.n_exp == 100
    alpha, beta = rng.normal(size=300), rng.normal(size=100)
    d = arrays["shapedirs"].reshape(-1, FLAME_K)
    want = (arrays["v_template"].reshape(-1) + d @ np.concatenate([alpha, beta])) * 1000
    assert_close(model.geometry(alpha, beta), want.reshape(-1, 3), atol=GEOM_ATOL, rtol=0)
    np.testing.assert_array_equal(model.triangles, arrays["f"].astype(np.int64))
    assert np.all(model.landmarks68 == -1)
    assert model.license == "FLAME licence: non-commercial"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_flame_numpy_pickle(tmp_path, protocol):
    rng = np.random.default_rng(8)
    arrays = flame_arrays(rng)
    arrays["J_regressor"] = sp.csc_matrix(rng.uniform(size=(5, 144)) * (rng.uniform(size=(5, 144))
                                                                           > 0.8))
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    model = import_model("flame", path)
    check_flame(model, arrays, rng)
    back = MorphableModel.load(model.save(tmp_path / "flame.npz"))
    for key, value in model.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[key], value, err_msg=key)


class FakeCh:
    """Pickles like chumpy's ``Ch`` (state dict without the weakref caches)."""

    def __init__(self, x=None, **terms):
        self.__dict__.update(terms)
        if x is not None:
            self.x = np.asarray(x, np.float64)
        self._dirty_vars = {"x"}
        self._itr = None
        self._depends_on_deps = {}
        self._make_dense = False
        self._make_sparse = False


@pytest.fixture
def fake_chumpy(monkeypatch):
    """Register 'chumpy.ch.Ch' (and 'chumpy.ch_ops.add') as FakeCh while pickling."""
    ch_cls = type("Ch", (FakeCh,), {"__module__": "chumpy.ch", "__qualname__": "Ch"})
    add_cls = type("add", (FakeCh,), {"__module__": "chumpy.ch_ops", "__qualname__": "add"})
    pkg = types.ModuleType("chumpy")
    ch_mod = types.ModuleType("chumpy.ch")
    ops_mod = types.ModuleType("chumpy.ch_ops")
    ch_mod.Ch = ch_cls
    ops_mod.add = add_cls
    pkg.ch, pkg.ch_ops = ch_mod, ops_mod
    monkeypatch.setitem(sys.modules, "chumpy", pkg)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch_mod)
    monkeypatch.setitem(sys.modules, "chumpy.ch_ops", ops_mod)
    return ch_cls, add_cls


@pytest.mark.parametrize("protocol", [0, 2])
def test_flame_chumpy_pickle(tmp_path, fake_chumpy, protocol):
    ch_cls, add_cls = fake_chumpy
    rng = np.random.default_rng(9)
    arrays = flame_arrays(rng)
    data = dict(arrays)
    data["shapedirs"] = ch_cls(arrays["shapedirs"])
    data["v_template"] = ch_cls(arrays["v_template"])
    data["J_regressor"] = sp.csc_matrix(np.eye(5, 144))
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_pickle(path)
    assert isinstance(loaded["shapedirs"], PickledChumpy)
    assert loaded["shapedirs"].chumpy_name == "chumpy.ch.Ch"
    assert loaded["shapedirs"].state["_dirty_vars"] == {"x"}
    assert np.array_equal(loaded["J_regressor"].to_scipy().toarray(), np.eye(5, 144))
    check_flame(import_flame(path), arrays, rng)

    data["shapedirs"] = add_cls(a=ch_cls(arrays["shapedirs"]), b=ch_cls(arrays["shapedirs"]))
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(ModelError, match="generic_model.pkl.*shapedirs.*chumpy.ch_ops.add"):
        import_flame(path)


class Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", ["system", "eval", "exec", "subprocess"])
def test_flame_malicious_pickle_runs_nothing(tmp_path, func):
    import builtins
    import subprocess

    marker = tmp_path / "marker"
    cmd = f"touch {marker}"
    payload = {
        "system": Evil(os.system, cmd),
        "eval": Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "exec": Evil(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "subprocess": Evil(subprocess.call, ["touch", str(marker)]),
    }[func]
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": payload, "f": np.zeros((1, 3))}, protocol=2))
    with pytest.raises(ModelError, match="generic_model.pkl.*not allowed"):
        import_flame(path)
    assert not marker.exists()


def test_safe_pickle_rejects_disguised_reconstructor(tmp_path):
    marker = tmp_path / "marker"
    # copy_reg._reconstructor builds only the inert stand-ins, not other classes.
    data = b"ccopy_reg\n_reconstructor\n(c__builtin__\ndict\nc__builtin__\nobject\nNtR."
    with pytest.raises(ModelError, match="not allowed"):
        loads_pickle(data)
    data = b"ccopy_reg\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nobject\nNtR."
    with pytest.raises(ModelError, match="disallowed object"):
        loads_pickle(data)
    data = b"c_codecs\nencode\n(Vx\nVrot13\ntR."
    with pytest.raises(ModelError, match="codec"):
        loads_pickle(data)
    assert not marker.exists()


def test_flame_malformed(tmp_path):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ModelError, match="generic_model.pkl"):
        import_flame(path)
    path.write_bytes(pickle.dumps({"v_template": np.zeros((5, 3))}, protocol=2))
    with pytest.raises(ModelError, match="generic_model.pkl.*'shapedirs'"):
        import_flame(path)
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ModelError, match="dict"):
        import_flame(path)


# ====================================================================== SFM
def test_sfm_mapping_parser(tmp_path):
    path = tmp_path / "ibug_to_sfm.txt"
    path.write_text("# header\n[landmark_mappings]\n 9 = 33 # chin\n\"31\" = 114\n"
                    "40 = 9999 # not in this model\n[contour_landmarks]\nright = [ 1,\n 2 ]\n")
    lm = read_mapping(path, 3448)
    assert lm[8] == 33 and lm[30] == 114 and lm[39] == -1
    assert int((lm >= 0).sum()) == 2


def test_sfm_without_eos_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "sfm_shape_3448.bin").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "eos", None)
    with pytest.raises(ModelError, match=r"pip install 'faceps\[sfm\]'"):
        import_sfm(tmp_path)


def test_sfm_malformed_file_names_it(tmp_path):
    pytest.importorskip("eos", reason="eos-py (the 'sfm' extra) is not installed")
    (tmp_path / "sfm_shape_3448.bin").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="sfm_shape_3448.bin.*not a readable"):
        import_sfm(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        import_sfm(tmp_path / "absent")


def test_sfm_real_model(tmp_path):
    if not (SFM_DIR / "sfm_shape_3448.bin").is_file():
        pytest.skip(f"Surrey Face Model files not found in {SFM_DIR}")
    pytest.importorskip("eos", reason="eos-py (the 'sfm' extra) is not installed")
    model = import_model("sfm", SFM_DIR)
    assert model.n_vertices == 3448 and model.n_id == 63 and model.n_exp == 6
    assert model.exp_names == ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
    np.testing.assert_array_equal(model.exp_std, 1)
    assert np.all(np.diff(model.id_std) <= 0) and model.id_std[0] > 0
    extent = model.mean.max(0) - model.mean.min(0)
    assert 100 < extent[0] < 250 and 120 < extent[1] < 300 and 50 < extent[2] < 200
    assert model.landmarks68[30] == 114 and model.landmarks68[8] == 33
    assert model.landmarks68[0] == -1 and model.landmarks68[60] == -1
    assert int(model.landmark_valid.sum()) == 50
    tip = model.mean[model.landmarks68[30]]
    assert tip[2] > np.percentile(model.mean[:, 2], 99)  # the nose tip is in front
    n = model.vertex_normals(model.mean)
    assert n[np.argmax(model.mean[:, 2]), 2] > 0.9
    same = import_sfm(SFM_DIR / "sfm_shape_3448.bin")
    np.testing.assert_array_equal(same.mean, model.mean)
    back = MorphableModel.load(model.save(tmp_path / "sfm.npz"))
    assert back.exp_names == model.exp_names
    np.testing.assert_array_equal(back.id_basis, model.id_basis)


# ====================================================================== dispatch
def test_unknown_kind():
    with pytest.raises(ModelError, match="unknown model kind 'bfm2030'"):
        import_model("bfm2030", "x")
    assert set(KINDS) == {"ict-facekit", "sfm", "bfm2009", "bfm2017", "bfm2019", "flame"}


def test_cli_model_import(tmp_path, capsys):
    rng = np.random.default_rng(10)
    a = bfm_arrays(rng)
    src = tmp_path / "model2017-1_bfm_nomouth.h5"
    write_bfm2017(src, a, rng)
    out = tmp_path / "bfm.npz"
    assert main(["model", "import", "bfm2017", str(src), "--out", str(out)]) == 0
    model = MorphableModel.load(out)
    assert model.n_vertices == a["n"] and model.source == str(src)
    capsys.readouterr()
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["model", "import", "bfm2017", str(bad), "--out", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.h5" in err[0]
    assert not (tmp_path / "b.npz").exists()
