"""Contract 4 in code: exact layout of written files, chunk encoding, validation errors."""

import json
from datetime import datetime

import h5py
import numpy as np
import pytest

from faceps.core import DatasetError
from faceps.datasets.build import DatasetConfig, build_dataset
from faceps.datasets.schema import (
    EXTRAS,
    FIELDS,
    FORMAT,
    GZIP_LEVEL,
    REQUIRED,
    SAMPLES,
    create_file,
    create_virtual_index,
    encode_chunk,
    read_sample,
    validate_file,
    write_chunk,
)
from faceps.model import load_model

N, L, H, W, KI, KE, KA = 3, 2, 8, 6, 5, 4, 3
DIMS = {"L": L, "H": H, "W": W, "k_id": KI, "k_exp": KE, "k_alb": KA}
ATTRS = {"generator": {"builder": "test", "seed": 1}, "model": "test-model"}

CONTRACT = {  # dataset -> (per-sample shape, dtype) as written in DESIGN.md contract 4
    "images": ((L, H, W, 3), np.float16),
    "lights": ((L, 11), np.float32),
    "normals": ((H, W, 3), np.float16),
    "proxy_normals": ((H, W, 3), np.float16),
    "mask": ((H, W), np.uint8),
    "albedo": ((H, W, 3), np.float16),
    "depth": ((H, W), np.float32),
    "K": ((3, 3), np.float32),
    "landmarks": ((68, 2), np.float32),
    "params/id": ((KI,), np.float32),
    "params/exp": ((KE,), np.float32),
    "params/albedo": ((KA,), np.float32),
    "params/pose": ((6,), np.float32),
    "subject": ((), "str"),
    "source": ((), "str"),
}


def random_row(fld, rng, dims=DIMS):
    shape = tuple(dims[s] if isinstance(s, str) else s for s in fld.shape)
    if fld.is_string:
        return f"s{rng.integers(100)}"
    if fld.dtype.kind == "f":
        a = rng.normal(size=shape).astype(fld.dtype)
        if a.size > 4:
            a.reshape(-1)[::5] = np.nan
        return a
    return rng.integers(0, 2, size=shape).astype(fld.dtype)


def write_file(path, rng, n=N, dims=DIMS, extras=EXTRAS):
    rows = []
    with create_file(path, n, dims["L"], dims["H"], dims["W"], dims["k_id"], dims["k_exp"],
                     dims["k_alb"], ATTRS, extras=extras) as f:
        for i in range(n):
            row = {}
            for fld in FIELDS:
                if fld.required or fld.name in extras:
                    row[fld.name] = random_row(fld, rng, dims)
                    if np.size(row[fld.name]) or isinstance(row[fld.name], str):
                        f[fld.path][i] = row[fld.name]
            rows.append(row)
    return rows


def test_contract_table_matches_fields():
    assert set(REQUIRED) == set(CONTRACT)
    assert set(EXTRAS) == {"face_mask", "shadow", "exposure", "sample_index", "lighting",
                           "wild_lighting"}


def test_create_file_exact_layout(tmp_path):
    path = tmp_path / "a.h5"
    write_file(path, np.random.default_rng(0))
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == FORMAT
        datetime.fromisoformat(f.attrs["created"])
        assert json.loads(f.attrs["generator"]) == ATTRS["generator"]
        assert f.attrs["model"] == "test-model"
        for name, (shape, dtype) in CONTRACT.items():
            ds = f[f"{SAMPLES}/{name}"]
            assert ds.shape == (N,) + shape, name
            assert ds.chunks == (1,) + shape, name
            if dtype == "str":
                info = h5py.check_string_dtype(ds.dtype)
                assert info is not None and info.encoding == "utf-8" and info.length is None
                assert ds.compression is None
            else:
                assert ds.dtype == np.dtype(dtype), name
                assert ds.compression == "gzip" and ds.compression_opts == GZIP_LEVEL, name
                assert ds.shuffle, name
        assert f[f"{SAMPLES}/shadow"].shape == (N, L, H, W)
        assert f[f"{SAMPLES}/shadow"].dtype == np.uint8
        assert f[f"{SAMPLES}/face_mask"].shape == (N, H, W)
        assert f[f"{SAMPLES}/exposure"].dtype == np.float32
    s = validate_file(path, full=True)
    assert (s.n, s.n_lights, s.height, s.width, s.k_id, s.k_exp, s.k_alb) == (N, L, H, W, KI,
                                                                               KE, KA)
    assert not s.virtual and s.model == "test-model" and s.generator["seed"] == 1
    assert set(s.extras) == set(EXTRAS)


def test_encoded_chunks_read_back_like_normal_writes(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "a.h5"
    rows = []
    with create_file(path, 2, L, H, W, KI, KE, KA, ATTRS) as f:
        for i in range(2):
            row = {}
            for fld in FIELDS:
                row[fld.name] = random_row(fld, rng)
                if fld.is_string:
                    f[fld.path][i] = row[fld.name]
                else:
                    a = row[fld.name]
                    write_chunk(f[fld.path], i, encode_chunk(a), a.nbytes)
            rows.append(row)
        with pytest.raises(DatasetError, match="samples/images"):
            write_chunk(f[f"{SAMPLES}/images"], 0, b"", 7)
    for i, row in enumerate(rows):
        got = read_sample(path, i)
        for name, value in row.items():
            if isinstance(value, str):
                assert got[name] == value
            else:
                assert got[name].dtype == value.dtype
                np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_zero_size_albedo_modes(tmp_path):
    dims = {**DIMS, "k_alb": 0}
    write_file(tmp_path / "a.h5", np.random.default_rng(2), dims=dims)
    s = validate_file(tmp_path / "a.h5", full=True)
    assert s.k_alb == 0 and s.datasets["params/albedo"][0] == (N, 0)
    create_virtual_index(tmp_path / "i.h5", [("a.h5", N)], L, H, W, KI, KE, 0, ATTRS)
    assert validate_file(tmp_path / "i.h5").k_alb == 0


def test_virtual_index_over_two_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    (tmp_path / "d").mkdir()
    a = write_file(tmp_path / "d" / "a.h5", rng)
    b = write_file(tmp_path / "d" / "b.h5", rng, n=2)
    create_virtual_index(tmp_path / "d" / "i.h5", [("a.h5", N), ("b.h5", 2)], L, H, W, KI, KE,
                         KA, ATTRS)
    (tmp_path / "d").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)  # relative sources resolve from the index's folder
    s = validate_file(tmp_path / "moved" / "i.h5", full=True)
    assert s.virtual and s.n == N + 2 and [p.name for p in s.shards] == ["a.h5", "b.h5"]
    for i, row in enumerate(a + b):
        got = read_sample(tmp_path / "moved" / "i.h5", i)
        np.testing.assert_array_equal(got["images"], row["images"])
        assert got["subject"] == row["subject"]
    (tmp_path / "moved" / "b.h5").unlink()
    with pytest.raises(DatasetError, match=r"i\.h5.*samples/images.*b\.h5.*missing"):
        validate_file(tmp_path / "moved" / "i.h5")


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.h5"
    write_file(path, np.random.default_rng(4))
    return path


def test_truncated_file(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"good\.h5: not a readable HDF5 file"):
        validate_file(good)


def test_not_hdf5_and_missing_file(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(DatasetError, match=r"x\.h5: not a readable HDF5"):
        validate_file(tmp_path / "x.h5")
    with pytest.raises(DatasetError, match=r"nope\.h5: no such file"):
        validate_file(tmp_path / "nope.h5")


@pytest.mark.parametrize("name", ["normals", "params/pose", "subject", "K"])
def test_missing_dataset_is_named(good, name):
    with h5py.File(good, "a") as f:
        del f[f"{SAMPLES}/{name}"]
    with pytest.raises(DatasetError, match=rf"good\.h5: dataset 'samples/{name}': missing"):
        validate_file(good)


def test_wrong_shape_dtype_and_rows_are_named(good):
    with h5py.File(good, "a") as f:
        del f[f"{SAMPLES}/depth"]
        f.create_dataset(f"{SAMPLES}/depth", shape=(N, H + 1, W), dtype=np.float32)
    with pytest.raises(DatasetError, match=r"'samples/depth': expected shape \(N, H, W\) "
                                           r"= \(3, 8, 6\); got \(3, 9, 6\)"):
        validate_file(good)
    with h5py.File(good, "a") as f:
        del f[f"{SAMPLES}/depth"]
        f.create_dataset(f"{SAMPLES}/depth", shape=(N, H, W), dtype=np.float64)
    with pytest.raises(DatasetError, match=r"'samples/depth': expected dtype float32"):
        validate_file(good)
    with h5py.File(good, "a") as f:
        del f[f"{SAMPLES}/depth"]
        f.create_dataset(f"{SAMPLES}/depth", shape=(N, H, W), dtype=np.float32)
        f.create_dataset(f"{SAMPLES}/extra_thing", shape=(N + 1, 2), dtype=np.float32)
    with pytest.raises(DatasetError, match=r"'samples/extra_thing': expected 3 rows"):
        validate_file(good)


def test_bad_root_attributes(good):
    with h5py.File(good, "a") as f:
        f.attrs["generator"] = "{not json"
    with pytest.raises(DatasetError, match="'generator' is not valid JSON"):
        validate_file(good)
    with h5py.File(good, "a") as f:
        f.attrs["format"] = "something/2"
    with pytest.raises(DatasetError, match="'format' is 'something/2'"):
        validate_file(good)


def test_damaged_chunk_found_by_full_check(good):
    with h5py.File(good, "r") as f:
        info = f[f"{SAMPLES}/images"].id.get_chunk_info(1)
    with open(good, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\xff" * min(64, info.size - 16))
    validate_file(good)  # samples 0 and N-1 are intact
    with pytest.raises(DatasetError, match=r"'samples/images': sample 1 is unreadable"):
        validate_file(good, full=True)


def test_read_sample_out_of_range(good):
    with pytest.raises(DatasetError, match="out of range"):
        read_sample(good, N)


def test_builder_shard_is_contract_4(tmp_path):
    model = load_model("builtin")
    r = build_dataset(tmp_path / "tiny.h5", 2, size=32, seed=9, shard_size=2, model=model,
                      config=DatasetConfig(n_lights=2))
    dims = {"L": 2, "H": 32, "W": 32, "k_id": model.n_id, "k_exp": model.n_exp,
            "k_alb": model.n_albedo}
    assert [p.name for p in r.shards] == ["tiny-00000.h5"]
    with h5py.File(r.shards[0], "r") as f:
        assert f.attrs["format"] == FORMAT and f.attrs["model"] == model.name
        gen = json.loads(f.attrs["generator"])
        assert gen["seed"] == 9 and gen["size"] == 32 and gen["model"]["name"] == model.name
        assert gen["faceps"] and gen["config"]["n_lights"] == 2
        assert (f.attrs["shard_start"], f.attrs["shard_stop"]) == (0, 2)
        assert f.attrs["config_hash"] == r.config_hash
        for fld in FIELDS:
            ds = f[fld.path]
            shape = tuple(dims[s] if isinstance(s, str) else s for s in fld.shape)
            assert ds.shape == (2,) + shape and ds.chunks == (1,) + shape, fld.name
            if fld.is_string:
                assert h5py.check_string_dtype(ds.dtype).encoding == "utf-8"
            else:
                assert ds.dtype == fld.dtype, fld.name
                assert ds.compression == "gzip" and ds.compression_opts == GZIP_LEVEL
                assert ds.shuffle
        assert list(f[f"{SAMPLES}/source"].asstr()[:]) == ["synthetic"] * 2
        assert np.all(f[f"{SAMPLES}/lights"][:, :, 10] == 1)
        mask = f[f"{SAMPLES}/mask"][:].astype(bool)
        assert np.array_equal(np.all(np.isfinite(f[f"{SAMPLES}/normals"][:]), -1), mask)
        assert np.array_equal(np.isfinite(f[f"{SAMPLES}/depth"][:]), mask)
        assert not np.any(f[f"{SAMPLES}/face_mask"][:].astype(bool) & ~mask)
        assert list(f[f"{SAMPLES}/sample_index"][:]) == [0, 1]
    with h5py.File(r.path, "r") as f:
        assert f.attrs["format"] == FORMAT
        assert all(f[fld.path].is_virtual for fld in FIELDS)
