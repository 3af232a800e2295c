"""The examples in docs/formats.md are loaded by the code they document, so the docs and
the readers cannot drift apart: the session example (with small stand-in files for the
ones it names), the calibration-target example (with rendered sphere poses) and the
crop.json example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.cli import main
from faceps.core import Camera, PointLights
from faceps.learn.infer import CROP_FILE, _crop_from_file
from tests.capture.test_target import LIGHTS, pose_session

DOCS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def json_examples() -> list[dict]:
    text = DOCS.read_text(encoding="utf-8")
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def example(key: str, value: object = None) -> dict:
    found = [e for e in json_examples() if key in e and (value is None or e[key] == value)]
    assert len(found) == 1, f"expected one example with {key}={value!r} in {DOCS}"
    return found[0]


def test_every_json_example_is_checked():
    assert len(json_examples()) == 3


def test_session_example_loads(tmp_path):
    spec = example("format", "faceps.session/1")
    root = tmp_path / "session"
    root.mkdir()
    W, H = 160, 120                       # a tenth of image_size: K is scaled on load
    rng = np.random.default_rng(0)
    for entry in spec["images"]:
        cv2.imwrite(str(root / entry["path"]), rng.integers(20, 200, (H, W, 3), np.uint8))
    cv2.imwrite(str(root / spec["ambient"]), np.full((H, W, 3), 5, np.uint8))
    mask = np.zeros((H, W), np.uint8)
    mask[20:100, 40:120] = 255
    cv2.imwrite(str(root / spec["mask"]), mask)
    pts = np.stack([np.linspace(40, 120, 68), np.linspace(30, 90, 68)], 1)
    (root / spec["landmarks"]).write_text(
        "version: 1\nn_points: 68\n{\n" + "".join(f"{u + 1} {v + 1}\n" for u, v in pts)
        + "}\n")
    (root / "session.json").write_text(json.dumps(spec))
    cap = load_session(root)
    assert (cap.width, cap.height) == (W, H)
    np.testing.assert_allclose(cap.camera.K[0, 0], spec["camera"]["K"][0][0] / 10)
    assert cap.light_names == tuple(e["light"] for e in spec["images"])
    assert cap.lights is not None
    got = cap.lights
    for k, name in enumerate(cap.light_names):
        np.testing.assert_allclose(got.positions[k], spec["lights"][name]["position"])
    assert got.anisotropy[cap.light_names.index("right")] == pytest.approx(1.5)
    np.testing.assert_allclose(cap.landmarks, pts, atol=1e-9)   # 1-based .pts -> 0-based
    assert (cap.subject, cap.expression) == (spec["subject"], spec["expression"])


def test_target_example_calibrates(tmp_path, capsys):
    desc = example("target", "sphere")
    cam = Camera(np.array([[900.0, 0, 159.5], [0, 900.0, 119.5], [0, 0, 1]]), (320, 240))
    for pose in desc["poses"]:
        pose_session(tmp_path, pose["session"], pose["centre"], pose["radius"], cam)
    (tmp_path / "target.json").write_text(json.dumps(desc))
    out = tmp_path / "lights.json"
    assert main(["calibrate", str(tmp_path / "target.json"), "--out", str(out)]) == 0
    got = PointLights.from_dict(json.loads(out.read_text())["lights"], order=LIGHTS.names)
    assert np.abs(got.positions - LIGHTS.positions).max() < 5.0


def test_crop_example_reads(tmp_path):
    spec = example("format", "faceps.crop/1")
    (tmp_path / CROP_FILE).write_text(json.dumps(spec))
    for kind in ("proxy", "normal"):
        crop = _crop_from_file(tmp_path / CROP_FILE, kind)
        assert (crop.size, crop.scale) == (spec["size"], spec["scale"])
