import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from faceps.core import atomic_path, read_image, save_json, save_npy, save_npz, save_png


def test_writers_produce_readable_files(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_npy(tmp_path / "a.npy", a)
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)
    save_npz(tmp_path / "b.npz", x=a, y=np.ones(2))
    with np.load(tmp_path / "b.npz") as z:
        assert np.array_equal(z["x"], a)
    save_json(tmp_path / "c.json", {"a": a, "n": np.float32(1.5)})
    assert json.loads((tmp_path / "c.json").read_text())["n"] == 1.5
    img = np.zeros((5, 6, 3), np.uint8)
    img[..., 0] = 255
    save_png(tmp_path / "d.png", img)
    back, depth = read_image(tmp_path / "d.png")
    assert depth == "8" and back[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError):
        save_npy(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_nothing(tmp_path, exc):
    target = tmp_path / "out.npy"
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "keep.json"
    save_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise RuntimeError
    assert json.loads(target.read_text()) == {"v": 1}


def test_killed_writer_never_leaves_the_final_name(tmp_path):
    target = tmp_path / "big.npy"
    code = textwrap.dedent(f"""
        import sys, time
        from faceps.core.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_plain_json():
    from pathlib import Path

    import numpy as np

    from faceps.core.atomic import plain_json

    data = {"a": (1, np.float32(2.5)), "b": np.arange(3), "c": Path("x/y")}
    assert plain_json(data) == {"a": [1, 2.5], "b": [0, 1, 2], "c": "x/y"}
    with pytest.raises(TypeError):
        plain_json({"d": object()})
    assert plain_json({"d": range(2)}, strings=True) == {"d": "range(0, 2)"}
