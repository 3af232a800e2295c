import json

import h5py
import numpy as np
import pytest

from faceps.cli import main
from faceps.core import ModelError
from faceps.datasets.build import DatasetConfig, build_dataset
from faceps.model import load_model
from faceps.optimize import angular_error_deg
from faceps.synth.faces import default_camera, sample_face
from faceps.synth.scanface import ScanFace, render_scan
from tests.shared_data import shared_data


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def model_as_scan(model, seed=0):
    """A 'scan' that is exactly a model face: its proxy is itself."""
    rng = np.random.default_rng(seed)
    c = model.sample(rng)
    return ScanFace(name="exact", vertices=model.geometry(c.id, c.exp),
                    triangles=model.triangles.astype(np.int64), colors=None,
                    model_vertex=np.arange(model.n_vertices),
                    model_distance=np.zeros(model.n_vertices), alpha_id=c.id, alpha_exp=c.exp,
                    model_name=model.name, n_model_vertices=model.n_vertices)


def test_render_scan_ground_truth_and_proxy(model, tmp_path):
    scan = model_as_scan(model)
    path = scan.save(tmp_path / "scan_face.npz")
    back = ScanFace.load(tmp_path)
    assert np.array_equal(back.vertices, scan.vertices) and back.name == "exact"
    cam = default_camera((320, 240))
    rng = np.random.default_rng(1)
    r = render_scan(model, back, sample_face(rng, model, cam), cam, rng=rng)
    both = r.face_mask & r.proxy_mask
    assert both.sum() > 1000
    # the scan is the proxy's own surface: normals agree up to interpolation
    assert np.nanmedian(angular_error_deg(r.normals[both], r.proxy_normals[both])) < 0.5
    assert path.exists()


def test_scan_registered_with_another_model_is_refused(model):
    scan = model_as_scan(model)
    other = ScanFace(**{**scan.__dict__, "n_model_vertices": 10})
    cam = default_camera((64, 48))
    rng = np.random.default_rng(0)
    with pytest.raises(ModelError, match="registered with model"):
        render_scan(model, other, sample_face(rng, model, cam), cam, rng=rng)


def test_dataset_with_scans(model, tmp_path):
    scan_dir = tmp_path / "scan"
    model_as_scan(model).save(scan_dir / "scan_face.npz")
    cfg = DatasetConfig(scans=(str(scan_dir),), scan_fraction=1.0)
    build_dataset(tmp_path / "d.h5", 3, size=64, seed=2, shard_size=3, model=model, config=cfg)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        src = [s.decode() if isinstance(s, bytes) else s for s in f["samples/source"][:]]
        assert src == ["scan"] * 3
        assert np.allclose(f["samples/params/id"][0], model_as_scan(model).alpha_id, atol=1e-6)


def test_register_cli_on_the_real_scan(tmp_path, capsys):
    scan = shared_data("scans", "lee-perry-smith-head.obj")
    out = tmp_path / "lps"
    assert main(["synth", "register", str(scan), "--out", str(out), "-q"]) == 0
    assert "converged" in capsys.readouterr().out
    for name in ("scan_face.npz", "registered.ply", "fitted.ply", "registration.json"):
        assert (out / name).exists()
    report = json.loads((out / "registration.json").read_text())
    assert report["mean_distance_mm"] < 1.0 and report["scan_scale"] == 1000.0
    face = ScanFace.load(out)
    assert face.vertices.shape[0] == 8844 and face.model_vertex.max() < 20000
