"""The synthetic dataset builder: determinism across workers, resume after interruption,
refusal of other arguments, the virtual index, ground truth consistent with eq. 1, and the
``faceps synth dataset`` / ``faceps dataset info`` commands."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from faceps.cli import main
from faceps.core import Camera, ConfigError, DatasetError, PointLights, shade_point
from faceps.datasets.build import DatasetConfig, build_dataset, face_crop_box
from faceps.datasets.schema import SAMPLES, read_sample, validate_file
from faceps.model import load_model
from faceps.synth.render import SensorConfig, ShadingConfig

N, SIZE, SHARD, SEED = 12, 64, 4, 5
ARGS = dict(size=SIZE, seed=SEED, shard_size=SHARD)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model):
    """An uninterrupted 12-sample build with one worker (default sheen and noise)."""
    out = tmp_path_factory.mktemp("clean") / "data.h5"
    return build_dataset(out, N, model=model, **ARGS)


def all_datasets(path):
    """name under samples/ -> whole array (strings as str)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.asstr()[:] if h5py.check_string_dtype(obj.dtype)
                             else obj[:])
        f[SAMPLES].visititems(visit)
    return out


def assert_same_data(a, b):
    da, db = all_datasets(a), all_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert da[name].dtype == db[name].dtype, name
        nan = da[name].dtype.kind == "f"
        assert np.array_equal(da[name], db[name], equal_nan=nan), f"{name} differs"


def test_layout_and_index_files(clean):
    folder = clean.path.parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "data-00000.h5", "data-00001.h5", "data-00002.h5", "data.h5", "data.index.json"]
    assert (clean.n, clean.kept_shards, clean.built_shards, clean.rendered) == (N, 0, 3, N)
    index = json.loads((folder / "data.index.json").read_text())
    assert index["n"] == N and index["config_hash"] == clean.config_hash
    assert [(s["path"], s["start"], s["stop"]) for s in index["shards"]] == [
        ("data-00000.h5", 0, 4), ("data-00001.h5", 4, 8), ("data-00002.h5", 8, 12)]
    assert index["generator"]["seed"] == SEED
    s = validate_file(clean.path, full=True)
    assert s.virtual and s.n == N and s.n_lights == 3 and (s.height, s.width) == (SIZE, SIZE)
    assert clean.timings["write"] > 0 and clean.timings["raycast"] > 0


def test_virtual_index_reads_the_shards(clean):
    whole = all_datasets(clean.path)
    parts = [all_datasets(p) for p in clean.shards]
    for name, arr in whole.items():
        cat = np.concatenate([p[name] for p in parts])
        assert np.array_equal(arr, cat, equal_nan=arr.dtype.kind == "f"), name
    assert list(whole["sample_index"]) == list(range(N))
    assert len(set(whole["subject"])) == N and set(whole["source"]) == {"synthetic"}


def test_same_data_with_two_workers(tmp_path, clean, model):
    r = build_dataset(tmp_path / "data.h5", N, workers=2, model="builtin", **ARGS)
    assert r.config_hash == clean.config_hash
    assert_same_data(r.path, clean.path)


def test_resume_rebuilds_only_the_missing_shard(tmp_path, clean, model):
    folder = tmp_path / "run"
    shutil.copytree(clean.path.parent, folder)
    kept = {p: p.stat().st_mtime_ns for p in (folder / "data-00000.h5", folder / "data-00001.h5")}
    (folder / "data-00002.h5").unlink()
    (folder / "data.h5").unlink()
    stray = folder / ".data-00002.tmp-x1y2z3.h5"
    stray.write_bytes(b"\x89HDF half written")
    r = build_dataset(folder / "data.h5", N, model=model, **ARGS)
    assert (r.kept_shards, r.built_shards, r.rendered) == (2, 1, SHARD)
    assert not stray.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert_same_data(folder / "data.h5", clean.path)
    # a damaged shard under its final name is redone too
    data = (folder / "data-00001.h5").read_bytes()
    (folder / "data-00001.h5").write_bytes(data[: len(data) // 3])
    r = build_dataset(folder / "data.h5", N, model=model, **ARGS)
    assert (r.kept_shards, r.built_shards) == (2, 1)
    assert_same_data(folder / "data.h5", clean.path)
    # nothing to do: everything kept
    r = build_dataset(folder / "data.h5", N, model=model, **ARGS)
    assert (r.kept_shards, r.built_shards, r.rendered) == (3, 0, 0)


def test_other_arguments_refuse_unless_forced(tmp_path, clean, model):
    folder = tmp_path / "run"
    shutil.copytree(clean.path.parent, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.raises(ConfigError, match=r"different arguments \(n: 12 -> 8\).*--force"):
        build_dataset(folder / "data.h5", 8, model=model, **ARGS)
    with pytest.raises(ConfigError, match=r"seed: 5 -> 6"):
        build_dataset(folder / "data.h5", N, model=model, **{**ARGS, "seed": 6})
    cfg = DatasetConfig(crop_scale=1.4)
    with pytest.raises(ConfigError, match=r"config.crop_scale: 1.6 -> 1.4"):
        build_dataset(folder / "data.h5", N, model=model, config=cfg, **ARGS)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    r = build_dataset(folder / "data.h5", 3, model=model, force=True, **ARGS)
    assert r.n == 3 and r.built_shards == 1
    assert sorted(p.name for p in folder.iterdir()) == ["data-00000.h5", "data.h5",
                                                        "data.index.json"]
    first = all_datasets(folder / "data.h5")
    ref = all_datasets(clean.path)
    for name in ("images", "normals", "params/id"):
        assert np.array_equal(first[name], ref[name][:3], equal_nan=True), name


def children(pid):
    if shutil.which("pgrep") is None:
        return []
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(c) for c in out.split()]


def test_killed_build_continues(tmp_path, clean):
    """SIGKILL the command (two workers) once a shard exists, run it again: the workers
    end too, and the data are those of a clean build."""
    folder = tmp_path / "killed"
    cmd = [sys.executable, "-m", "faceps", "synth", "dataset", "--n", str(N), "--size",
           str(SIZE), "--seed", str(SEED), "--shard-size", str(SHARD), "--out",
           str(folder / "data.h5"), "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    first = folder / "data-00000.h5"
    while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = children(proc.pid)
    if proc.poll() is not None:
        pytest.skip("the build finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert first.exists() and not (folder / "data.h5").exists()
    mtime = first.stat().st_mtime_ns
    assert main(cmd[3:]) == 0
    assert first.stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(folder) if ".tmp-" in p]
    assert_same_data(folder / "data.h5", clean.path)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "orphaned workers"


@pytest.fixture(scope="module")
def lambertian(tmp_path_factory, model):
    cfg = DatasetConfig(shading=ShadingConfig(lambertian=True, cast_shadows=True),
                        sensor=SensorConfig(full_well=0, read_noise=0))
    out = tmp_path_factory.mktemp("lamb") / "lamb.h5"
    return build_dataset(out, 3, size=96, seed=2, shard_size=4, model=model, config=cfg)


def test_ground_truth_follows_eq1(lambertian):
    with h5py.File(lambertian.path, "r") as f:
        for i in range(3):
            s = read_sample(f, i)
            mask = s["mask"].astype(bool)
            cam = Camera(s["K"].astype(np.float64), (96, 96))
            P = cam.backproject(s["depth"])
            N_ = s["normals"].astype(np.float64)
            A = s["albedo"].astype(np.float64)
            lights = PointLights.from_array(s["lights"])
            assert len(lights) == 3
            pred = shade_point(np.nan_to_num(P), np.nan_to_num(N_), np.nan_to_num(A), lights)
            img = s["images"].astype(np.float32)
            shadow = s["shadow"].astype(bool)
            assert not np.any(shadow & ~mask[None])
            bright = pred.min(-1) > 0.05 * np.percentile(pred[:, mask].max(-1), 99)
            lit = mask[None] & ~shadow & bright & (img.max(-1) < 0.999)
            assert lit.sum() > 1.2 * mask.sum()  # summed over 3 lights
            ratio = img[lit] / pred[lit]
            # float16 images, normals and albedo (relative step 1e-3) are the only error
            assert np.abs(ratio - 1).max() < 0.01, np.abs(ratio - 1).max()
            assert np.median(np.abs(ratio - 1)) < 1e-3
            # cast shadows are black although eq. 1 predicts light there
            dark = mask[None] & shadow & bright
            assert np.all(img[dark] < 1e-3)
            # landmarks project inside the crop; mask and face mask are consistent
            lm = s["landmarks"]
            assert np.all((lm > 0) & (lm < 95))
            assert not np.any(s["face_mask"].astype(bool) & ~mask)
            assert s["exposure"] > 0


def test_face_crop_box():
    lm = np.array([[100.0, 200.0], [140.0, 260.0], [np.nan, np.nan]])
    x0, y0, side = face_crop_box(lm, 1.5)
    assert side == 90 and (x0 + (side - 1) / 2, y0 + (side - 1) / 2) == (120.5, 230.5)
    x0b, y0b, sideb = face_crop_box(lm, 1.5, np.array([0.1, 0.0]), 2.0)
    assert sideb == 180 and x0b + (sideb - 1) / 2 == pytest.approx(120 + 18, abs=0.5)
    with pytest.raises(ConfigError):
        face_crop_box(lm[2:], 1.5)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ConfigError, match="n must be"):
        build_dataset(tmp_path / "d.h5", 0)
    with pytest.raises(ConfigError, match=r"\.h5"):
        build_dataset(tmp_path / "d.npz", 2)
    with pytest.raises(ConfigError, match="crop_scale"):
        DatasetConfig(crop_scale=0)


def test_dataset_info_command(tmp_path, clean, capsys):
    png = tmp_path / "preview.png"
    assert main(["dataset", "info", str(clean.path), "--preview", str(png)]) == 0
    out = capsys.readouterr().out
    for text in ("N=12", "L=3", "64x64", "synthetic: 12", "subjects     12", "shards       3",
                 "image_mean", "mask_fraction", "seed 5", "MiB", "preview:"):
        assert text in out, text
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] >= 4 * 128 and img.shape[1] >= 6 * 128


def test_dataset_info_errors_exit_2_with_one_line(tmp_path, clean):
    bad = tmp_path / "bad.h5"
    data = clean.shards[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "faceps", "dataset", "info", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.h5" in lines[0] and "not a readable HDF5" in lines[0]
    folder = tmp_path / "copy"
    shutil.copytree(clean.path.parent, folder)
    with h5py.File(folder / "data-00001.h5", "a") as f:
        del f[f"{SAMPLES}/albedo"]
    assert main(["dataset", "info", str(folder / "data.h5")]) == 2
    (folder / "data-00001.h5").unlink()
    with pytest.raises(DatasetError, match=r"data\.h5: dataset 'samples/images'.*missing"):
        validate_file(folder / "data.h5")
