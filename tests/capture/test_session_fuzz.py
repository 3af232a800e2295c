"""Property test: whatever session.json holds, load_session returns a Capture or raises
SessionError, never another exception."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faceps.capture import Capture, load_session, write_session
from faceps.core import SessionError, save_png
from tests.capture.conftest import (
    LIGHT_NAMES,
    make_camera,
    make_images,
    make_landmarks,
    make_lights,
    make_mask,
)

SIZE = (24, 20)

# names of files that exist in the fuzzed folder (valid or not as images) plus some that do not
KNOWN_PATHS = ["left.png", "front.png", "right.png", "ambient.png", "mask.png", "landmarks.pts",
               "lm.json", "session.json", "grey.png", "small.png", "deep16.png", "float.npy",
               "nan.npy", "truncated.png", "text.png", "missing.png", "", ".", "..", "/",
               "../fuzz/left.png", "sub", "sub/", "left.png\x00", "a" * 300]
ENCODINGS = ["srgb", "linear", "gamma:2.2", "gamma:0", "gamma:-1", "gamma:", "gamma:1e3",
             "gamma:99999999", "GAMMA:0.5", " srgb ", "sRGB", "log", ""]
FORMATS = ["faceps.session/1", "faceps.session/2", "faceps.session/", "FACEPS.SESSION/1", ""]

scalars = (st.none() | st.booleans()
           | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, -1, 1, -0.0, 1e-320, 1e308, -1e308, 10**400, 0.5, 3])
           | st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["path", "light", "K", "position", "intensity", "x"])
                      | st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)
numbers = (st.floats(allow_nan=True, allow_infinity=True)
           | st.integers(min_value=-(10**6), max_value=10**6)
           | st.sampled_from([0, -1, 1e-9, -1e-9, 1e300, 10**400, 0.3, -0.3]))
strings = (st.sampled_from(KNOWN_PATHS) | st.sampled_from(ENCODINGS) | st.sampled_from(FORMATS)
           | st.sampled_from(list(LIGHT_NAMES)) | st.text(max_size=12))


def _base_session(folder: Path) -> dict[str, Any]:
    """A valid session using every optional field, plus decoy files next to it."""
    imgs = make_images(size=SIZE, seed=21)
    write_session(folder, imgs + 0.02, make_camera(SIZE, np.array([-0.1, 0.02, 0, 0, 0])),
                  light_names=LIGHT_NAMES, lights=make_lights(), ambient=np.full(
                      (SIZE[1], SIZE[0], 3), 0.02, np.float32),
                  landmarks=make_landmarks(SIZE), mask=make_mask(SIZE), subject="s",
                  expression="e")
    (folder / "lm.json").write_text(json.dumps(make_landmarks(SIZE).tolist()))
    save_png(folder / "grey.png", np.full((SIZE[1], SIZE[0]), 90, np.uint8))
    save_png(folder / "small.png", np.zeros((5, 6, 3), np.uint8))
    save_png(folder / "deep16.png", np.full((SIZE[1], SIZE[0], 3), 65535, np.uint16))
    np.save(folder / "float.npy", imgs[0] * 5)
    bad = imgs[0].copy()
    bad[0, 0] = np.nan
    np.save(folder / "nan.npy", bad)
    data = (folder / "left.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    (folder / "sub").mkdir(exist_ok=True)
    session = json.loads((folder / "session.json").read_text())
    session["camera"]["image_size"] = [2 * SIZE[0], 2 * SIZE[1]]
    return session


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("fuzz")
    session = _base_session(folder)
    (folder / "session.json").write_text(json.dumps(session))
    load_session(folder)  # the base session is valid
    return folder, session


def _locations(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON document (the root included)."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _locations(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _locations(value, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated_sessions(draw, base: dict[str, Any]) -> str:
    doc: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        locations = _locations(doc)[1:]  # whole documents: see test_any_json_document
        if not locations:
            break
        path = draw(st.sampled_from(locations))
        op = draw(st.sampled_from(["delete", "json", "number", "string", "resize", "insert",
                                   "file", "file"]))
        if op == "file" and isinstance(doc, dict):
            # point a file field at an existing, broken or missing file
            fields = [("ambient",), ("mask",), ("landmarks",), ("encoding",)]
            if isinstance(doc.get("images"), list):
                fields += [("images", i, "path") for i, e in enumerate(doc["images"])
                           if isinstance(e, dict)]
            field = draw(st.sampled_from(fields))
            parent = _get(doc, field[:-1]) if len(field) > 1 else doc
            parent[field[-1]] = draw(st.sampled_from(ENCODINGS if field == ("encoding",)
                                                     else KNOWN_PATHS))
            continue
        if op == "delete":
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
            continue
        target = _get(doc, path)
        if op == "resize" and isinstance(target, list):
            if target and draw(st.booleans()):
                target.pop(draw(st.integers(0, len(target) - 1)))
            else:
                target.append(draw(json_values | numbers))
            continue
        if op == "insert" and isinstance(target, dict):
            key = draw(st.sampled_from(["format", "camera", "images", "lights", "encoding",
                                        "ambient", "mask", "landmarks", "units", "K",
                                        "image_size", "distortion", "path", "light",
                                        "position", "intensity", "direction", "anisotropy",
                                        "subject", "top"]))
            target[key] = draw(json_values | numbers | strings)
            continue
        value = draw({"json": json_values, "number": numbers,
                      "string": strings}.get(op, json_values))
        _get(doc, path[:-1])[path[-1]] = value
    return json.dumps(doc, allow_nan=True)


def _check(folder: Path, text: str) -> None:
    (folder / "session.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cap = load_session(folder)
    except SessionError as exc:
        assert "session.json" in str(exc) or exc.path is not None
        return
    assert isinstance(cap, Capture)
    assert cap.images.dtype == np.float32 and cap.images.ndim == 4
    assert np.all(np.isfinite(cap.images))
    assert cap.saturated.shape == cap.images.shape[:3]
    assert cap.camera.image_size == (cap.width, cap.height)
    assert not cap.camera.has_distortion


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_load_session_never_raises_anything_else(fuzz_folder, data) -> None:
    folder, base = fuzz_folder
    _check(folder, data.draw(mutated_sessions(base)))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_document(fuzz_folder, value) -> None:
    folder, _ = fuzz_folder
    _check(folder, json.dumps(value, allow_nan=True))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cut=st.floats(0.0, 1.0))
def test_truncated_json(fuzz_folder, cut) -> None:
    folder, base = fuzz_folder
    text = json.dumps(base)
    _check(folder, text[: int(cut * len(text))])
