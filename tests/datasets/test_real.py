"""The real-capture dataset builder: small synthetic sessions under a SUBJECT/EXPRESSION
tree (one of them broken) -> contract-4 shards of source ``real``; the failure log, the
stored maps against the reconstruction and the synthesiser's ground truth, reruns that
skip everything, refusal of other options, resumption after an interruption with two
workers, and the command-line entry point."""

import argparse
import json
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.core import ConfigError
from faceps.datasets import real
from faceps.datasets.info import dataset_info
from faceps.datasets.real import build_real_dataset, discover_sessions, sample_from_reconstruction
from faceps.datasets.schema import SAMPLES, read_sample, validate_file
from faceps.datasets.torch_data import FaceDataset
from faceps.model import load_model
from faceps.optimize.fit import FitConfig
from faceps.optimize.reconstruct import ReconstructConfig
from faceps.synth.session import SessionSynthConfig, synth_session

CAPTURE = (320, 240)
SIZE = 128
#: a fast reconstruction (landmark proxy, one pass): a few seconds per 320x240 session
FAST = ReconstructConfig(fit=FitConfig(photometric=False), refine_passes=0)
GOOD = ["s1/neutral", "s1/smile", "s2/neutral"]
BROKEN = "s2/broken"
ARGS = dict(config=FAST, size=SIZE, progress=False)


class Counter:
    """Wraps ``faceps.optimize.reconstruct.reconstruct``: counts the calls of this process
    and keeps each reconstruction by session folder; optionally interrupts the n-th call."""

    def __init__(self, original, interrupt_at=None):
        self.original, self.interrupt_at = original, interrupt_at
        self.calls, self.recs = 0, {}

    def __call__(self, capture, model, config=None, **kwargs):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        rec = self.original(capture, model, config, **kwargs)
        self.recs[capture.root.resolve()] = rec
        return rec


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def root(model, tmp_path_factory):
    """Two subjects (s1 with two expressions), plus a session.json naming missing images."""
    root = tmp_path_factory.mktemp("captures")
    for i, key in enumerate(GOOD):
        synth_session(root / key, seed=20 + i, model=model,
                      config=SessionSynthConfig(size=CAPTURE))
    (root / BROKEN).mkdir(parents=True)
    shutil.copy(root / GOOD[2] / "session.json", root / BROKEN / "session.json")
    return root


@pytest.fixture(scope="module")
def built(root, model, tmp_path_factory):
    """One uninterrupted build with one worker; the reconstructions it ran."""
    import faceps.optimize.reconstruct as module

    out = tmp_path_factory.mktemp("real") / "real.h5"
    counter = Counter(module.reconstruct)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "reconstruct", counter)
        result = build_real_dataset(root, out, model=model, **ARGS)
    return result, counter


def rows(path):
    """name under samples/ -> whole array (strings as str)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.asstr()[:] if h5py.check_string_dtype(obj.dtype) else obj[:])
        f[SAMPLES].visititems(visit)
    return out


def angles_deg(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0)))


def to_capture_pixels(K_crop, K_full, size):
    """Capture pixel (u, v) of every crop pixel centre, through the two intrinsics."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    U = (u - K_crop[0, 2]) * K_full[0, 0] / K_crop[0, 0] + K_full[0, 2]
    V = (v - K_crop[1, 2]) * K_full[1, 1] / K_crop[1, 1] + K_full[1, 2]
    return U, V


# ------------------------------------------------------------------ discovery
def test_discovery_and_subjects(root, tmp_path):
    assert discover_sessions(root) == sorted(GOOD + [BROKEN])
    assert real.subject_of("s1/smile", root) == "s1"
    assert real.subject_of(".", root) == root.resolve().name
    hidden = tmp_path / "a" / ".tmp-x"
    hidden.mkdir(parents=True)
    (hidden / "session.json").write_text("{}")
    (tmp_path / "session.json").write_text("{}")
    assert discover_sessions(tmp_path) == ["."]
    with pytest.raises(ConfigError, match="not a folder"):
        discover_sessions(tmp_path / "missing")


# ------------------------------------------------------------------ the build
def test_contract_4_file_read_by_the_dataset_tools(built):
    result, counter = built
    assert (result.sessions, result.skipped, result.written, result.n) == (4, 0, 3, 3)
    assert counter.calls == result.reconstructed == 3
    s = validate_file(result.path, full=True)
    assert s.virtual and s.n == 3 and s.n_lights == 3 and (s.height, s.width) == (SIZE, SIZE)
    assert "face_mask" in s.extras and "shadow" not in s.extras
    index = json.loads(result.index_json.read_text())
    assert [x for shard in index["shards"] for x in shard["sessions"]] == GOOD
    assert index["failures"] == {"path": "real.failures.jsonl", "count": 1}

    ds = FaceDataset(result.path)
    assert len(ds) == 3
    item = ds[2]
    assert item["source"] == "real" and item["subject"] == "s2"
    assert tuple(item["images"].shape) == (3, 3, SIZE, SIZE)
    assert float(item["mask"].sum()) > 1000 and float(item["proxy_mask"].sum()) > 1000
    assert ds.subjects() == ["s1", "s1", "s2"]
    info = dataset_info(result.path)
    assert info.sources == {"real": 3} and info.n_subjects == 2
    assert "real: 3" in info.text()


def test_failure_log_names_the_broken_session(built, root):
    result, _ = built
    assert [f.session for f in result.failures] == [BROKEN]
    lines = result.failures_path.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["session"] == BROKEN and entry["stage"] == "load"
    assert entry["error"] == "SessionError" and "not found" in entry["message"]
    assert entry["path"] == str(root / BROKEN)
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]


def test_stored_maps_follow_the_reconstruction_and_the_ground_truth(built, root, model):
    result, counter = built
    data = rows(result.path)
    for i, key in enumerate(GOOD):
        capture = load_session(root / key)
        rec = counter.recs[(root / key).resolve()]
        n = data["normals"][i].astype(np.float32)
        mask = data["mask"][i] > 0
        # NaN exactly outside the mask; unit normals facing the camera inside
        for name in ("normals", "albedo"):
            arr = data[name][i].astype(np.float32)
            assert np.all(np.isfinite(arr[mask])) and np.all(np.isnan(arr[~mask])), name
        assert np.all(np.isfinite(data["depth"][i][mask]))
        assert np.all(np.isnan(data["depth"][i][~mask]))
        np.testing.assert_allclose(np.linalg.norm(n[mask], axis=-1), 1.0, atol=2e-3)
        np.testing.assert_array_equal(data["face_mask"][i], data["mask"][i])
        # the crop's K maps its pixels onto the capture: the stored normals are the
        # reconstruction's there (up to resampling) and near the synthetic ground truth
        U, V = to_capture_pixels(data["K"][i], capture.camera.K, SIZE)
        ui, vi = np.rint(U).astype(int), np.rint(V).astype(int)
        inside = mask & (ui >= 0) & (ui < CAPTURE[0]) & (vi >= 0) & (vi < CAPTURE[1])
        ref = rec.normals[vi[inside], ui[inside]]
        ok = np.all(np.isfinite(ref), -1)
        assert ok.mean() > 0.95
        err = angles_deg(n[inside][ok], ref[ok])
        assert np.median(err) < 1.5 and err.mean() < 3.0, (key, err.mean())
        gt = np.load(root / key / "ground_truth" / "normals.npy")[vi[inside], ui[inside]]
        ok = np.all(np.isfinite(gt), -1)
        assert angles_deg(n[inside][ok], gt[ok]).mean() < 10.0, key
        # landmarks: the session's, mapped by the same K
        lm = capture.landmarks
        lm_crop = data["landmarks"][i].astype(np.float64)
        Kc, Kf = data["K"][i].astype(np.float64), capture.camera.K
        back = (lm_crop - Kc[:2, 2]) * np.diag(Kf)[:2] / np.diag(Kc)[:2] + Kf[:2, 2]
        np.testing.assert_allclose(back, lm, atol=1e-2)
        # lights and the fitted proxy
        np.testing.assert_allclose(data["lights"][i], rec.lights.to_array(), rtol=1e-6)
        proxy = rec.fit.proxy
        np.testing.assert_allclose(data["params/pose"][i],
                                   np.r_[proxy.angles, proxy.translation], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(data["params/id"][i], proxy.coefficients.id, rtol=1e-6)
        assert data["subject"][i] == key.split("/")[0] and data["source"][i] == "real"
    # the sample function is what was stored
    capture = load_session(root / GOOD[0])
    again = sample_from_reconstruction(capture, counter.recs[(root / GOOD[0]).resolve()], model,
                                       size=SIZE, subject="s1")
    stored = read_sample(result.path, 0)
    for name, value in again.items():
        if isinstance(value, str):
            assert stored[name] == value
        else:
            np.testing.assert_array_equal(stored[name], value, err_msg=name)


def test_rerun_skips_everything(built, root, model):
    import faceps.optimize.reconstruct as module

    result, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in result.shards}
    counter = Counter(module.reconstruct)
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "reconstruct", counter)
        again = build_real_dataset(root, result.path, model=model, **ARGS)
    assert time.perf_counter() - t0 < 20
    assert counter.calls == 0 and again.reconstructed == 0
    assert (again.skipped, again.written, again.n) == (3, 0, 3)
    assert [f.session for f in again.failures] == [BROKEN]  # failures are tried again
    assert {p: p.stat().st_mtime_ns for p in again.shards} == stamps
    assert again.config_hash == result.config_hash


def test_other_options_refuse_and_force_rebuilds(built, root, model, tmp_path):
    result, _ = built
    with pytest.raises(ConfigError, match="size: 128 -> 64"):
        build_real_dataset(root, result.path, model=model, **{**ARGS, "size": 64})
    with pytest.raises(ConfigError, match="--force"):
        build_real_dataset(root, result.path, model=model,
                           **{**ARGS, "config": ReconstructConfig(refine_passes=0)})
    validate_file(result.path)  # untouched
    # force on a copy, with a ROOT holding only the broken session: the old shards go
    copy = tmp_path / "copy"
    shutil.copytree(result.path.parent, copy)
    only_broken = tmp_path / "captures"
    shutil.copytree(root / BROKEN, only_broken / "s9" / "broken")
    again = build_real_dataset(only_broken, copy / "real.h5", model=model, force=True,
                               **{**ARGS, "size": 64})
    assert again.n == 0 and again.path is None and [f.session for f in again.failures] == [
        "s9/broken"]
    assert sorted(p.name for p in copy.iterdir()) == ["real.failures.jsonl"]


def test_interrupted_build_resumes_with_two_workers(built, root, model, tmp_path):
    """One worker, one sample per shard, interrupted at the second reconstruction (a stray
    temporary file left behind as after a kill); the rerun with two workers keeps the first
    shard, reconstructs only the other two sessions and gives the same data."""
    import faceps.optimize.reconstruct as module

    result, _ = built
    out = tmp_path / "resumed" / "real.h5"
    counter = Counter(module.reconstruct, interrupt_at=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "reconstruct", counter)
        with pytest.raises(KeyboardInterrupt):
            build_real_dataset(root, out, model=model, shard_size=1, **ARGS)
    first = out.parent / "real-00000.h5"
    assert sorted(p.name for p in out.parent.iterdir()) == ["real-00000.h5",
                                                            "real.failures.jsonl"]
    stamp = first.stat().st_mtime_ns
    (out.parent / ".real-00001.tmp-abc.h5").write_bytes(b"partial")

    again = build_real_dataset(root, out, model=model, shard_size=1, workers=2, **ARGS)
    assert (again.skipped, again.written, again.reconstructed) == (1, 2, 2)
    assert first.stat().st_mtime_ns == stamp
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert [f.session for f in again.failures] == [BROKEN]
    a, b = rows(result.path), rows(again.path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


# ------------------------------------------------------------------ command line
def parse(argv):
    parser = argparse.ArgumentParser(prog="faceps build-dataset")
    real.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line(built, root, capsys, tmp_path):
    result, _ = built
    same = [str(root), "--out", str(result.path), "--size", str(SIZE), "--no-photometric",
            "--passes", "0", "--no-progress"]
    assert real.run_from_args(parse(same)) == 1  # everything built, one session failed
    out = capsys.readouterr().out
    assert "3 already built, 0 written, 1 failed" in out and BROKEN in out

    assert real.run_from_args(parse([str(tmp_path / "nowhere"), "--out",
                                     str(tmp_path / "x.h5")])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a folder" in err
    assert real.run_from_args(parse([str(root), "--out", str(tmp_path / "x.h5"),
                                     "--workers", "0"])) == 2
    assert "workers" in capsys.readouterr().err
    assert real.run_from_args(parse(same + ["--size", "64"])) == 2
    assert "--force" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.h5")
