"""The executor (faceps.core.executor): results in submission order, bounded look-ahead and
failures naming the item, in this process and in a local process pool; without Ray a clear
error (exit 2 on the command line); with Ray (skipped when it is not installed) a local
instance of two workers whose synthetic dataset and batch reconstructions equal the local
ones byte for byte."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from faceps.cli import main
from faceps.core import ConfigError
from faceps.core.executor import TaskError, TaskFailure, make_executor

N_ITEMS = 8


# ------------------------------------------------------------------ work functions
def _slow_square(x: int) -> tuple[int, int]:
    """x squared, the first items slowest (so workers finish out of order)."""
    time.sleep(0.02 * max(0, 4 - x))
    return x * x, os.getpid()


def _fail_at_three(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def _die_at_two(x: int) -> int:
    if x == 2:
        os._exit(3)
    return x


class Pulled:
    """An iterable of 0..n-1 that counts how many items were taken."""

    def __init__(self, n: int):
        self.n, self.taken = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


# ------------------------------------------------------------------ local
@pytest.mark.parametrize("workers", [1, 2])
def test_local_order_and_bounded_look_ahead(workers):
    with make_executor("local", workers) as ex:
        assert ex.in_process == (workers == 1)
        items = Pulled(N_ITEMS)
        results = ex.map(_slow_square, items, ahead=3)
        first = next(results)
        assert first[0] == 0
        assert items.taken <= 1 + 3
        rest = list(results)
    assert [r[0] for r in [first, *rest]] == [i * i for i in range(N_ITEMS)]
    assert items.taken == N_ITEMS
    pids = {r[1] for r in [first, *rest]}
    if workers == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids


@pytest.mark.parametrize("workers", [1, 2])
def test_local_failure_names_the_item(workers):
    with make_executor("local", workers) as ex:
        results = ex.map(_fail_at_three, range(6))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TaskError, match=r"work item 3 failed: ValueError: three") as info:
            next(results)
        assert info.value.item == 3 and not info.value.worker_lost
        assert isinstance(info.value.__cause__, ValueError)

        out = list(ex.map(_fail_at_three, range(6), return_failures=True))
    assert out[:3] == [0, 1, 2] and out[4:] == [4, 5]
    assert isinstance(out[3], TaskFailure) and out[3].item == 3
    assert isinstance(out[3].error, ValueError)


def test_local_dead_worker_is_reported_and_replaced():
    """One item in flight, so the dead worker's item is known (with more, the oldest item
    in flight is reported: the pool cannot tell which worker died)."""
    with make_executor("local", 2) as ex:
        with pytest.raises(TaskError, match="work item 2 failed.*stopped") as info:
            list(ex.map(_die_at_two, range(5), ahead=1))
        assert info.value.worker_lost
        out = list(ex.map(_die_at_two, range(5), ahead=1, return_failures=True))
    assert out[:2] == [0, 1] and out[3:] == [3, 4]  # the later items ran on a new pool
    assert isinstance(out[2], TaskFailure) and out[2].item == 2 and out[2].worker_lost


def test_invalid_options():
    with pytest.raises(ConfigError, match="executor must be one of"):
        make_executor("dask", 2)
    with pytest.raises(ConfigError, match="workers"):
        make_executor("local", 0)
    with pytest.raises(ConfigError, match="executor ray"):
        make_executor("local", 2, address="head:6379")


def test_missing_ray_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'faceps\[ray\]'"):
        make_executor("ray", 2)
    assert main(["synth", "dataset", "--n", "2", "--size", "32", "--out",
                 str(tmp_path / "d.h5"), "--executor", "ray", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err
    assert not list(tmp_path.glob("d-*.h5"))
    assert main(["reconstruct-batch", str(tmp_path), "--out", str(tmp_path / "rec"),
                 "--executor", "ray", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err


# ------------------------------------------------------------------ Ray
@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with two worker CPUs for this module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_order_and_failure(ray_instance):
    with make_executor("ray", 2) as ex:
        assert ex.kind == "ray" and not ex.in_process
        values = [float(i * i) for i in range(N_ITEMS)]
        assert list(ex.map(math.sqrt, values, ahead=3)) == [float(i) for i in range(N_ITEMS)]
        with pytest.raises(TaskError, match=r"work item -1\.0 failed: ValueError"):
            list(ex.map(math.sqrt, [4.0, -1.0, 9.0]))
        out = list(ex.map(math.sqrt, [4.0, -1.0, 9.0], return_failures=True))
    assert out[0] == 2.0 and out[2] == 3.0
    assert isinstance(out[1], TaskFailure) and out[1].item == -1.0
    assert ray_instance.is_initialized()  # an instance it did not start is left running


def rows(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.asstr()[:] if h5py.check_string_dtype(obj.dtype) else obj[:])
        f["samples"].visititems(visit)
    return out


def test_ray_synthetic_dataset_equals_local(ray_instance, tmp_path):
    from faceps.datasets.build import build_dataset

    args = dict(size=64, seed=3, shard_size=2, model="builtin")
    local = build_dataset(tmp_path / "local" / "d.h5", 4, workers=1, **args)
    assert main(["synth", "dataset", "--n", "4", "--size", "64", "--seed", "3",
                 "--shard-size", "2", "--out", str(tmp_path / "ray" / "d.h5"),
                 "--executor", "ray", "--workers", "2", "-q"]) == 0
    for a_path, b_path in zip(local.shards, sorted((tmp_path / "ray").glob("d-*.h5"))):
        a, b = rows(a_path), rows(b_path)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            if a[name].dtype.kind in "OUS":
                assert list(a[name]) == list(b[name]), name
            else:
                assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Two small synthetic sessions and one whose images are missing."""
    from faceps.model import load_model
    from faceps.synth.session import SessionSynthConfig, synth_session

    root = tmp_path_factory.mktemp("sessions")
    model = load_model("builtin")
    for i, key in enumerate(["s1/neutral", "s2/neutral"]):
        synth_session(root / key, seed=40 + i, model=model,
                      config=SessionSynthConfig(size=(160, 120)))
    (root / "s2" / "broken").mkdir()
    shutil.copy(root / "s1" / "neutral" / "session.json", root / "s2" / "broken")
    return root


FAST = ["--no-photometric", "--passes", "0", "-q"]


def test_ray_reconstruct_batch_equals_local(ray_instance, sessions, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(["reconstruct-batch", str(sessions), "--out", str(local), *FAST]) == 1
    assert "2 reconstructed, 1 failed" in capsys.readouterr().out
    assert main(["reconstruct-batch", str(sessions), "--out", str(remote), "--executor",
                 "ray", "--workers", "2", *FAST]) == 1
    for out in (local, remote):
        failures = (out / "failures.jsonl").read_text().splitlines()
        assert len(failures) == 1 and '"session": "s2/broken"' in failures[0]
    for key in ("s1/neutral", "s2/neutral"):
        assert (remote / key / "report.json").is_file()
        for name in ("normals", "depth", "albedo"):
            a = np.load(local / key / f"{name}.npy")
            b = np.load(remote / key / f"{name}.npy")
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (key, name)
        assert (local / key / "mask.png").read_bytes() == (remote / key / "mask.png").read_bytes()

    capsys.readouterr()
    assert main(["reconstruct-batch", str(sessions), "--out", str(local), *FAST]) == 1
    assert "2 already done, 0 reconstructed, 1 failed" in capsys.readouterr().out


_DIGEST = """
import hashlib, numpy as np
from faceps.datasets.build import render_sample
from faceps.model import load_model
m = load_model("builtin")
h = hashlib.sha256()
rng = np.random.default_rng(0)
for _ in range(3):
    h.update(m.geometry(rng.normal(size=m.n_id), rng.normal(size=m.n_exp)).tobytes())
arrays, _ = render_sample(m, 5, seed=6, size=256)
for name in sorted(arrays):
    if isinstance(arrays[name], np.ndarray) and arrays[name].dtype.kind not in "OSU":
        h.update(arrays[name].tobytes())
print(h.hexdigest())
"""


def test_samples_do_not_depend_on_the_native_thread_count():
    """Local workers, the in-process build and Ray tasks run with different BLAS/OpenMP
    thread counts; a sample (here one whose proxy normals once differed by a float16 ULP:
    a threaded BLAS product in the model's geometry) must come out the same bytes."""
    import os
    import subprocess

    from faceps.core.executor import THREAD_VARS

    digests = []
    for n in ("1", "2"):
        env = dict(os.environ, **{k: n for k in THREAD_VARS})
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                             text=True, timeout=300, check=True)
        digests.append(out.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]
