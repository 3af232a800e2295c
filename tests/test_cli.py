import subprocess
import sys

import pytest

from faceps import __version__
from faceps.cli import main


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "faceps", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "model" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_console_exit_keeps_output_atexit_and_code(tmp_path):
    # The installed command leaves with os._exit: streams must be flushed, atexit handlers
    # run and the exit code kept, for success and for errors.
    code = ("import atexit, sys, threading, time; from faceps.cli import console; "
            "atexit.register(lambda: print('atexit ran', file=sys.stderr)); "
            "threading.Thread(target=lambda: (time.sleep(0.5), "
            "print('thread done', file=sys.stderr))).start(); "
            "console(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "model", "info", "builtin"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vertices" in r.stdout and r.stdout.endswith("\n")
    assert "atexit ran" in r.stderr and "thread done" in r.stderr
    r = subprocess.run([sys.executable, "-c", code, "model", "info", str(tmp_path / "no.npz")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no.npz" in r.stderr and "atexit ran" in r.stderr


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_facepserror_is_one_line_exit_2(tmp_path):
    r = run_cli("model", "info", str(tmp_path / "nope.npz"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.npz" in lines[0] and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "model", "info", str(tmp_path / "nope.npz"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    import faceps.cli as cli

    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_model_info", boom)
    assert cli.main(["model", "info"]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["inspect"], ["model", "import", "flame"]])
def test_usage_errors_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2 and "usage" in r.stderr


def test_load_session_importing_reads_while_importing(tmp_path):
    import numpy as np

    from faceps.capture import load_session
    from faceps.cli import load_session_importing
    from faceps.core.errors import SessionError
    from faceps.synth.session import SessionSynthConfig, synth_session

    synth_session(tmp_path / "s", seed=3, config=SessionSynthConfig(size=(160, 120)))
    sys.modules.pop("colorsys", None)
    got = load_session_importing(tmp_path / "s", ("json", "colorsys"))
    want = load_session(tmp_path / "s")
    assert np.array_equal(got.images, want.images) and got.width == 160
    assert "colorsys" in sys.modules
    # the session's own error, also while the imports run
    with pytest.raises(SessionError, match="session.json"):
        load_session_importing(tmp_path / "missing", ())
    # an import that fails is reported after the reading thread has finished
    with pytest.raises(ModuleNotFoundError):
        load_session_importing(tmp_path / "s", ("faceps_no_such_module",))
    # the heap the command asks for is sized on the capture just read
    asked = []
    got = load_session_importing(tmp_path / "s", (), prefault=lambda c: asked.append(c) or 0)
    assert len(asked) == 1 and asked[0] is got
