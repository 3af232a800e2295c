"""Robustness of every command against bad input, and resumption after a kill.

Each bad input is made in ``tmp_path`` from a good one written by the project's own code (a
small synthetic session, a small dataset, two tiny training runs) and run through
``faceps.cli.main`` in this process. The contract checked for each case:

- exit code 2 (``SystemExit(2)`` for argument errors);
- one non-empty line on stderr, naming the offending file (and the field where there is
  one), no traceback;
- nothing new on disk: no output under a final name and no temporary file (``.tmp-`` or
  dot names) anywhere under the folders involved;
- a pickle-based file is refused without running code: its ``__reduce__`` would create a
  marker file, which must not exist afterwards.

The kill tests interrupt ``faceps synth dataset`` and ``faceps build-dataset`` with SIGKILL
after their first shard, run the same command again and compare the result with an
uninterrupted build array by array.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from faceps.cli import main
from faceps.datasets.build import build_dataset
from faceps.learn.train import TrainConfig, train
from faceps.model import load_model
from faceps.synth.session import SessionSynthConfig, synth_session

_SCRIPT = Path(sys.executable).parent / "faceps"
#: the installed command (a real process), or the module when the script is not installed
FACEPS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "faceps"]
SESSION_SIZE = (160, 120)
DATA_N, DATA_SIZE = 4, 32
#: tiny network widths (as in tests/learn/test_train.py) keep the runs fast on a CPU
SMALL = {"normal": {"widths": [8, 16, 32], "normal_widths": [4, 8, 16]},
         "proxy": {"widths": [8, 16, 32, 64], "norm": "group"}}
#: other widths: a checkpoint of SMALL does not fit them
OTHER = {"normal": {"widths": [4, 8, 16], "normal_widths": [4, 8, 8]},
         "proxy": {"widths": [4, 8, 16, 32], "norm": "group"}}


# ------------------------------------------------------------------ helpers
def run_cli(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``faceps ARGV`` in this process; the exit code and stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def tree(*roots: Path) -> set[str]:
    """The paths of ``roots`` and of every file and folder under them."""
    out: set[str] = set()
    for root in roots:
        if root.exists():
            out.add(str(root))
            out.update(str(p) for p in root.rglob("*"))
    return out


def temporaries(*roots: Path) -> list[str]:
    """Names under ``roots`` that look like temporary files (``.tmp`` in the name or a dot
    name)."""
    return sorted(str(p) for root in roots if root.exists() for p in root.rglob("*")
                  if ".tmp" in p.name or p.name.startswith("."))


def assert_bad_input(code: int, err: str, names: Iterable[str] = ()) -> str:
    """Exit 2, one stderr line without a traceback, naming each of ``names``."""
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line; got:\n{err}"
    for name in names:
        assert name in lines[0], f"'{name}' not named in: {lines[0]}"
    return lines[0]


def check_command(argv: Sequence[object], capsys: pytest.CaptureFixture[str],
                  names: Iterable[str], watch: Iterable[Path]) -> str:
    """Run a command expected to refuse its input; nothing may appear under ``watch``."""
    watch = [Path(w) for w in watch]
    before = tree(*watch)
    code, err = run_cli(argv, capsys)
    line = assert_bad_input(code, err, names)
    new = sorted(tree(*watch) - before)
    assert not new, f"new files after a refused command: {new}"
    assert not [t for t in temporaries(*watch) if t not in before]
    return line


class MarkerPayload:
    """Pickles to a call that would create ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return (Path.touch, (Path(self.path),))


def evil_pickle(path: Path, marker: Path, wrap: object = None) -> Path:
    """A plain pickle at ``path`` whose loading would create ``marker``."""
    payload = MarkerPayload(marker)
    path.write_bytes(pickle.dumps(payload if wrap is None else {wrap: payload}, protocol=2))
    return path


# ------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def good_session(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    folder = tmp_path_factory.mktemp("robust-session") / "s0"
    synth_session(folder, seed=0, model=model, config=SessionSynthConfig(size=SESSION_SIZE))
    return folder


@pytest.fixture(scope="module")
def good_data(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    """A small dataset: an index ``d.h5`` over two shards of two samples."""
    out = tmp_path_factory.mktemp("robust-data") / "d.h5"
    return build_dataset(out, DATA_N, size=DATA_SIZE, seed=0, shard_size=2, model=model).path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, good_data: Path, model) -> Path:
    """Two one-step runs ``proxy/`` and ``normal/`` (also a ``--weights`` folder)."""
    root = tmp_path_factory.mktemp("robust-runs")
    for kind in ("proxy", "normal"):
        cfg = TrainConfig.for_kind(kind, network=SMALL[kind], batch_size=2, max_steps=1,
                                   log_every=1, checkpoint_every=1, progress=False,
                                   tensorboard=False, augment=None)
        train(kind, cfg, good_data, out=root / kind, model=model)
    return root


@pytest.fixture
def session_copy(tmp_path: Path, good_session: Path) -> Path:
    dst = tmp_path / "session"
    shutil.copytree(good_session, dst)
    return dst


# ------------------------------------------------------------------ bad sessions
def _edit_json(session: Path, edit) -> None:
    path = session / "session.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # json.dumps writes NaN as the literal NaN


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _other_size(session: Path) -> None:
    import cv2

    img = cv2.imread(str(session / "front.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(session / "front.png"), cv2.resize(img, (100, 80)))


def _nan_light(data: dict) -> None:
    data["lights"]["left"]["position"][0] = float("nan")


def _nan_k(data: dict) -> None:
    data["camera"]["K"][0][0] = float("nan")


#: case -> (how to break a session copy, names the error line must contain)
SESSION_CASES = {
    "truncated-png": (lambda s: _truncate(s / "left.png"), ["left.png"]),
    "other-size": (_other_size, ["front.png"]),
    "nan-light": (lambda s: _edit_json(s, _nan_light), ["session.json", "lights"]),
    "nan-K": (lambda s: _edit_json(s, _nan_k), ["session.json", "camera.K"]),
    "missing-image": (lambda s: (s / "right.png").unlink(), ["right.png"]),
    "not-json": (lambda s: (s / "session.json").write_text("{\"format\": \"faceps.sess"),
                 ["session.json"]),
    "no-images-field": (lambda s: _edit_json(s, lambda d: d.pop("images")),
                        ["session.json", "images"]),
    "no-K-field": (lambda s: _edit_json(s, lambda d: d["camera"].pop("K")),
                   ["session.json", "camera.K"]),
}


def _session_command(command: str, session: Path, out: Path, runs: Path) -> list[object]:
    if command == "inspect":
        return ["inspect", session]  # the contact sheet goes into the session folder
    if command == "infer":
        return ["infer", session, "--out", out, "--weights", runs]
    if command == "reconstruct":
        return ["reconstruct", session, "--out", out, "-q"]
    return [command, session, "--out", out]


@pytest.mark.parametrize("command", ["inspect", "fit", "reconstruct", "infer"])
@pytest.mark.parametrize("case", sorted(SESSION_CASES))
def test_bad_session(case: str, command: str, session_copy: Path, tmp_path: Path,
                     runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    breaker, names = SESSION_CASES[case]
    breaker(session_copy)
    out = tmp_path / "out"
    check_command(_session_command(command, session_copy, out, runs), capsys, names,
                  [tmp_path, runs])
    assert not out.exists()


def test_infer_without_weights_names_the_option(session_copy: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An installation without the shipped weights (they are looked up beside the
    module): the error names the folder and the --weights option."""
    import faceps.learn.infer as infer_mod

    monkeypatch.setattr(infer_mod, "__file__", str(tmp_path / "pkg" / "infer.py"))
    line = check_command(["infer", session_copy, "--out", tmp_path / "out"], capsys,
                         ["weights"], [tmp_path])
    assert "--weights" in line


# ------------------------------------------------------------------ report
def _fake_reconstruction(folder: Path, gt: Path) -> Path:
    folder.mkdir()
    for name in ("normals.npy", "depth.npy", "albedo.npy", "mask.png"):
        shutil.copy(gt / name, folder / name)
    return folder


@pytest.mark.parametrize("case", ["empty", "session", "truncated-normals", "pickled-normals",
                                  "normals-shape"])
def test_report_on_a_folder_that_is_not_a_reconstruction(
        case: str, good_session: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    if case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
        names = ["normals.npy"]
    elif case == "session":
        folder = tmp_path / "session"
        shutil.copytree(good_session, folder)
        names = ["normals.npy"]
    else:
        folder = _fake_reconstruction(tmp_path / "rec", good_session / "ground_truth")
        names = ["normals.npy"]
        if case == "truncated-normals":
            _truncate(folder / "normals.npy", 0.3)
        elif case == "pickled-normals":
            arr = np.array([MarkerPayload(marker)], dtype=object)
            np.save(folder / "normals.npy", arr, allow_pickle=True)
        else:
            np.save(folder / "normals.npy", np.zeros((4, 5), np.float32))
    check_command(["report", folder], capsys, names, [tmp_path])
    assert not (folder / "report.html").exists() and not marker.exists()


# ------------------------------------------------------------------ bad datasets
def _empty_dataset(src: Path, dst: Path) -> None:
    """A valid-looking file of zero samples: the same attributes and datasets, first axis 0."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v

        def copy(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                g.create_dataset(name, shape=(0,) + obj.shape[1:], dtype=obj.dtype,
                                 maxshape=(None,) + obj.shape[1:])

        f.visititems(copy)


def _without_field(src: Path, dst: Path, field: str = "samples/normals") -> None:
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        del f[field]


def _bad_dataset(case: str, data: Path, dst_dir: Path) -> tuple[Path, list[str]]:
    """A broken copy of the dataset ``data`` in ``dst_dir``; the file and expected names."""
    shard = data.parent / f"{data.stem}-00000.h5"
    if case == "index-with-truncated-shard":
        for p in data.parent.iterdir():
            shutil.copy(p, dst_dir / p.name)
        _truncate(dst_dir / shard.name, 0.5)
        return dst_dir / data.name, [shard.name]
    dst = dst_dir / f"bad-{case}.h5"
    if case == "random-bytes":
        dst.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        shutil.copy(shard, dst)
        _truncate(dst, 0.5)
    elif case == "empty":
        _empty_dataset(shard, dst)
    elif case == "no-normals-field":
        _without_field(shard, dst)
        return dst, [dst.name, "normals"]
    elif case == "not-a-dataset":
        with h5py.File(dst, "w") as f:
            f["x"] = np.zeros(3)
    return dst, [dst.name]


DATASET_CASES = ["random-bytes", "truncated", "empty", "no-normals-field", "not-a-dataset",
                 "index-with-truncated-shard"]


def _dataset_command(command: str, file: Path, out: Path, runs: Path) -> list[object]:
    if command == "info":
        return ["dataset", "info", file, "--preview", out / "preview.png"]
    if command == "split":
        return ["dataset", "split", file, "--out", out]
    if command == "train":
        return ["train", "normal", "--data", file, "--out", out, "--network",
                json.dumps(SMALL["normal"]), "--max-steps", "1", "--batch-size", "2",
                "--no-progress", "--threads", "1"]
    return ["evaluate", runs / "normal", "--data", file, "--out", out, "-q"]


@pytest.mark.parametrize("command", ["info", "split", "train", "evaluate"])
@pytest.mark.parametrize("case", DATASET_CASES)
def test_bad_dataset(case: str, command: str, good_data: Path, runs: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    file, names = _bad_dataset(case, good_data, src)
    out = tmp_path / "out"
    check_command(_dataset_command(command, file, out, runs), capsys, names,
                  [tmp_path, runs])
    assert not out.exists()


@pytest.mark.parametrize("case", ["not-json", "missing-file", "not-a-split"])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_split_file(case: str, command: str, good_data: Path, runs: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """A split index (``faceps dataset split``) that is broken or points nowhere."""
    splits = tmp_path / "splits"
    code, err = run_cli(["dataset", "split", good_data, "--out", splits,
                         "--fractions", "0.5,0.5,0"], capsys)
    assert code == 0, err
    split = splits / "train.json"
    names = [split.name]
    if case == "not-json":
        split.write_text("{\"format\": ")
    elif case == "missing-file":
        data = json.loads(split.read_text())
        data["dataset"] = "../gone/gone.h5"
        split.write_text(json.dumps(data))
        names = ["gone.h5"]
    else:
        split.write_text(json.dumps({"hello": 1}))
    check_command(_dataset_command(command, split, tmp_path / "out", runs), capsys, names,
                  [tmp_path, runs])


# ------------------------------------------------------------------ networks
def test_resume_with_other_widths_is_refused(runs: Path, good_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "normal"
    shutil.copytree(runs / "normal", run)
    check_command(["train", "normal", "--data", good_data, "--out", run, "--resume",
                   "--network", json.dumps(OTHER["normal"]), "--max-steps", "2",
                   "--no-progress", "--threads", "1"], capsys, [run.name], [tmp_path])


def test_init_weights_of_other_widths_is_refused(runs: Path, good_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    check_command(["train", "normal", "--data", good_data, "--out", out,
                   "--network", json.dumps(OTHER["normal"]), "--max-steps", "1",
                   "--init-weights", runs / "normal", "--no-progress", "--threads", "1"],
                  capsys, ["normal"], [tmp_path, runs])
    assert not out.exists()


@pytest.mark.parametrize("case", ["no-proxy-run", "proxy-option", "train-proxy-source"])
def test_a_run_of_the_other_network_is_refused(case: str, runs: Path, good_data: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A ProxyNet run where a NormalNet run is expected, and the other way round."""
    out = tmp_path / "out"
    if case == "no-proxy-run":  # the Table 2 run must be a NormalNet
        argv = ["evaluate", runs / "normal", "--data", good_data, "--out", out, "-q",
                "--no-proxy-run", runs / "proxy"]
    elif case == "proxy-option":  # proxynet:RUN must be a ProxyNet
        argv = ["evaluate", runs / "normal", "--data", good_data, "--out", out, "-q",
                "--proxy", f"proxynet:{runs / 'normal'}"]
    else:
        argv = ["train", "normal", "--data", good_data, "--out", out, "--network",
                json.dumps(SMALL["normal"]), "--max-steps", "1", "--batch-size", "2",
                "--proxy-source", f"proxynet:{runs / 'normal'}", "--no-progress",
                "--threads", "1"]
    names = {"no-proxy-run": ["proxy", "NormalNet"]}.get(case, ["normal", "ProxyNet"])
    check_command(argv, capsys, names, [tmp_path, runs])
    assert not out.exists()


@pytest.mark.parametrize("case", ["swapped", "both-proxy", "truncated", "missing-normal"])
def test_infer_with_mismatching_weights(case: str, runs: Path, session_copy: Path,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    proxy, normal = runs / "proxy" / "weights.pt", runs / "normal" / "weights.pt"
    names = ["proxy.pt"]
    if case == "swapped":
        shutil.copy(normal, weights / "proxy.pt")
        shutil.copy(proxy, weights / "normal.pt")
    elif case == "both-proxy":
        shutil.copy(proxy, weights / "proxy.pt")
        shutil.copy(proxy, weights / "normal.pt")
        names = ["normal.pt"]
    elif case == "truncated":
        shutil.copy(proxy, weights / "proxy.pt")
        shutil.copy(normal, weights / "normal.pt")
        _truncate(weights / "proxy.pt", 0.5)
    else:
        shutil.copy(proxy, weights / "proxy.pt")
        names = ["normal.pt"]
    out = tmp_path / "out"
    check_command(["infer", session_copy, "--out", out, "--weights", weights], capsys, names,
                  [tmp_path, runs])
    assert not out.exists()


@pytest.mark.parametrize("form", ["plain-pickle", "torch-zip"])
@pytest.mark.parametrize("command", ["evaluate", "export-weights", "init-weights",
                                     "infer-proxy", "infer-normal"])
def test_pickle_checkpoint_is_refused_without_running(
        command: str, form: str, runs: Path, good_data: Path, session_copy: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose unpickling would run code: a plain pickle, and a ``torch.save``
    file (zip) holding a pickled object beside a faceps-looking dict."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    if form == "plain-pickle":
        evil_pickle(evil, marker, wrap="state_dict")
    else:
        torch.save({"format": "faceps.weights/1", "kind": "normal",
                    "state_dict": MarkerPayload(marker)}, evil)
    out = tmp_path / "out"
    if command == "evaluate":
        argv = ["evaluate", evil, "--data", good_data, "--out", out, "-q"]
    elif command == "export-weights":
        argv = ["export-weights", evil, "--out", out / "w.pt"]
    elif command == "init-weights":
        argv = ["train", "normal", "--data", good_data, "--out", out, "--network",
                json.dumps(SMALL["normal"]), "--max-steps", "1", "--init-weights", evil,
                "--no-progress", "--threads", "1"]
    else:
        weights = tmp_path / "weights"
        weights.mkdir()
        kind = command.split("-")[1]
        other = "normal" if kind == "proxy" else "proxy"
        shutil.copy(runs / other / "weights.pt", weights / f"{other}.pt")
        evil.rename(weights / f"{kind}.pt")
        evil = weights / f"{kind}.pt"
        argv = ["infer", session_copy, "--out", out, "--weights", weights]
    line = check_command(argv, capsys, [evil.name], [tmp_path, runs])
    assert "never runs code" in line and "add_safe_globals" not in line, line
    assert not marker.exists(), "loading the checkpoint ran code from the pickle"
    assert not out.exists()


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("case", ["pickle-as-npz", "object-array-npz", "truncated-npz",
                                  "missing-field"])
@pytest.mark.parametrize("command", ["info", "preview", "synth-session"])
def test_bad_model_file(case: str, command: str, tmp_path: Path, model,
                        capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "model.npz"
    names = [path.name]
    if case == "pickle-as-npz":
        evil_pickle(path, marker)
    elif case == "object-array-npz":
        good = tmp_path / "good.npz"
        model.save(good)
        with np.load(good, allow_pickle=False) as z:
            arrays = dict(z)
        good.unlink()
        arrays["mean"] = np.array([MarkerPayload(marker)], dtype=object)
        np.savez(path, **arrays)
        names.append("mean")
    elif case == "truncated-npz":
        model.save(path)
        _truncate(path, 0.5)
    else:
        good = tmp_path / "good.npz"
        model.save(good)
        with np.load(good, allow_pickle=False) as z:
            arrays = {k: v for k, v in z.items() if k != "id_basis"}
        good.unlink()
        np.savez(path, **arrays)
        names.append("id_basis")
    out = tmp_path / "out"
    argv: list[object] = {
        "info": ["model", "info", path],
        "preview": ["model", "preview", path, "--out", out / "p.png", "--n", "1", "--tile",
                    "32"],
        "synth-session": ["synth", "session", "--out", out, "--model", path, "--size",
                          "160x120"],
    }[command]
    line = check_command(argv, capsys, names, [tmp_path])
    assert "allow_pickle=`" not in line, "the message must not advise loading a pickle"
    assert not marker.exists(), "loading the model ran code from the pickle"
    assert not out.exists()


@pytest.mark.parametrize("case", ["malicious", "not-a-pickle", "list"])
def test_model_import_flame_refuses_bad_pickles(case: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    src = tmp_path / "generic_model.pkl"
    if case == "malicious":
        evil_pickle(src, marker, wrap="v_template")
    elif case == "not-a-pickle":
        src.write_bytes(b"\x80\x02}q\x00(X\x0a\x00\x00\x00v_temp")
    else:
        src.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    out = tmp_path / "out" / "flame.npz"
    check_command(["model", "import", "flame", src, "--out", out], capsys, [src.name],
                  [tmp_path])
    assert not marker.exists(), "importing ran code from the pickle"
    assert not out.parent.exists()


def test_malicious_pickle_runs_nothing_in_a_real_process(tmp_path: Path) -> None:
    """The same through the installed ``faceps`` command (a fresh interpreter)."""
    marker = tmp_path / "marker"
    src = evil_pickle(tmp_path / "generic_model.pkl", marker, wrap="v_template")
    r = subprocess.run([*FACEPS, "model", "import", "flame", str(src), "--out",
                        str(tmp_path / "flame.npz")], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert_bad_input(r.returncode, r.stderr, [src.name])
    assert not marker.exists() and not (tmp_path / "flame.npz").exists()


# ------------------------------------------------------------------ other commands
@pytest.mark.parametrize("command", ["build-dataset", "reconstruct-batch"])
def test_batch_commands_on_a_folder_without_sessions(command: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    root = tmp_path / "root"
    (root / "s1" / "neutral").mkdir(parents=True)
    (root / "s1" / "neutral" / "notes.txt").write_text("no session here")
    out = tmp_path / "out"
    target = out / "real.h5" if command == "build-dataset" else out
    line = check_command([command, root, "--out", target, "-q"], capsys, [root.name],
                         [tmp_path])
    assert "no capture sessions" in line
    assert not out.exists(), "an output (a failure log) was written for nothing"


def test_build_dataset_on_a_missing_folder(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "real.h5"
    check_command(["build-dataset", tmp_path / "nowhere", "--out", out, "-q"], capsys,
                  ["nowhere"], [tmp_path])


@pytest.mark.parametrize("size", ["0x10", "160by120", "-5x4"])
def test_synth_session_rejects_an_invalid_size(size: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, err = run_cli(["synth", "session", "--out", out, f"--size={size}"], capsys)
    # argparse prints its usage line, then one error line naming the option
    assert code == 2 and "Traceback" not in err
    assert "--size" in err.strip().splitlines()[-1] and size in err
    assert not out.exists() and not temporaries(tmp_path)


def test_synth_session_rejects_a_tiny_size(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    check_command(["synth", "session", "--out", out, "--size", "3x2"], capsys, ["size"],
                  [tmp_path])
    assert not out.exists()


@pytest.mark.parametrize("case", ["not-json", "unknown-target", "no-poses", "nan-centre",
                                  "nan-radius", "nan-albedo", "missing-session",
                                  "bad-session"])
def test_calibrate_bad_target(case: str, session_copy: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "target.json"
    pose = {"session": session_copy.name, "centre": [0.0, 0.0, 500.0], "radius": 40.0}
    desc: dict = {"target": "sphere", "poses": [pose], "albedo": 0.8}
    names = [target.name]
    if case == "unknown-target":
        desc["target"] = "cube"
        names.append("target")
    elif case == "no-poses":
        del desc["poses"]
        names.append("poses")
    elif case == "nan-centre":
        pose["centre"][1] = float("nan")
        names.append("poses[0].centre")
    elif case == "nan-radius":
        pose["radius"] = float("nan")
        names.append("poses[0].radius")
    elif case == "nan-albedo":
        desc["albedo"] = float("nan")
        names.append("albedo")
    elif case == "missing-session":
        pose["session"] = "nowhere"
        names = ["nowhere"]
    elif case == "bad-session":
        (session_copy / "session.json").write_text("[]")
        names = ["session.json"]
    if case == "not-json":
        target.write_text("{\"target\": \"sph")
    else:
        target.write_text(json.dumps(desc))
    out = tmp_path / "out" / "lights.json"
    check_command(["calibrate", target, "--out", out], capsys, names, [tmp_path])
    assert not out.parent.exists()


# ------------------------------------------------------------------ kill and resume
def _run_and_kill(argv: Sequence[str], first_shard: Path, cwd: Path,
                  timeout: float = 120.0) -> bool:
    """Start ``argv``, SIGKILL it as soon as ``first_shard`` exists; True when it was killed
    before it finished."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not first_shard.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    return killed


def _read_dataset(index: Path) -> dict[str, np.ndarray]:
    """Every dataset of ``index`` (through its virtual datasets) as arrays."""
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(index, "r") as f:
        def read(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]

        f.visititems(read)
    return arrays


def _assert_same_dataset(a: Path, b: Path) -> None:
    x, y = _read_dataset(a), _read_dataset(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].shape == y[name].shape, name
        if x[name].dtype.kind == "f":
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)
        else:
            assert np.array_equal(x[name], y[name]), name


def _shard_names(folder: Path, stem: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{stem}-*.h5"))


def _built_killed_and_resumed(args: list[str], stem: str, tmp_path: Path, timeout: int
                              ) -> tuple[Path, Path, str]:
    """Build ``--out STEM.h5`` once uninterrupted (in ``ref``) and once killed after its
    first shard and run again (in ``run``); returns (ref, run, stdout of the rerun)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    cmd = [*FACEPS, *args, "--out", f"{stem}.h5"]
    r = subprocess.run(cmd, cwd=ref, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    killed = _run_and_kill(cmd, run / f"{stem}-00000.h5", run)
    assert killed, "the build finished before the kill"
    assert not (run / f"{stem}.h5").exists(), "an index appeared before the build finished"
    r = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return ref, run, r.stdout


def test_synth_dataset_killed_after_the_first_shard_resumes(tmp_path: Path) -> None:
    args = ["synth", "dataset", "--n", "12", "--size", "32", "--shard-size", "4", "-q"]
    ref, run, stdout = _built_killed_and_resumed(args, "X", tmp_path, 300)
    kept = int(re.search(r"\((\d+) kept", stdout).group(1))
    assert kept >= 1, f"the rerun rebuilt the finished shards: {stdout}"
    assert _shard_names(run, "X") == _shard_names(ref, "X") == [
        f"X-{i:05d}.h5" for i in range(3)]
    _assert_same_dataset(ref / "X.h5", run / "X.h5")
    assert not temporaries(run)


@pytest.fixture(scope="module")
def session_root(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    """Three tiny synthetic sessions as ROOT/SUBJECT/EXPRESSION/session.json."""
    root = tmp_path_factory.mktemp("robust-root")
    for i in range(3):
        synth_session(root / f"s{i}" / "neutral", seed=10 + i, model=model,
                      config=SessionSynthConfig(size=SESSION_SIZE))
    return root


def test_build_dataset_killed_after_the_first_shard_resumes(tmp_path: Path,
                                                            session_root: Path) -> None:
    args = ["build-dataset", str(session_root), "--shard-size", "1", "--size", "32",
            "--no-photometric", "--passes", "0", "-q"]
    ref, run, stdout = _built_killed_and_resumed(args, "real", tmp_path, 600)
    assert re.search(r"[1-9]\d* already built", stdout), stdout
    assert _shard_names(run, "real") == _shard_names(ref, "real")
    assert len(_shard_names(run, "real")) == 3
    _assert_same_dataset(ref / "real.h5", run / "real.h5")
    assert not temporaries(run)
    assert (run / "real.failures.jsonl").read_text().strip() == ""
