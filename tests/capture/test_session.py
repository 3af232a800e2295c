"""Capture sessions: writer/reader round trips, ingest steps, and one test per malformed input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceps.capture import (
    SESSION_FORMAT,
    Capture,
    inspect_session,
    load_session,
    read_landmarks,
    write_landmarks_pts,
    write_session,
)
from faceps.core import SessionError, ShapeError, decode, encode, read_image, save_png
from faceps.core.color import linear_to_srgb
from tests.capture.conftest import (
    HEIGHT,
    LIGHT_NAMES,
    WIDTH,
    make_camera,
    make_images,
    make_landmarks,
    make_lights,
    make_mask,
    read_json,
    write_json,
)
from tests.tolerances import assert_close


def code_values(linear: np.ndarray, encoding: str) -> np.ndarray:
    """Encoded values of linear data, clipped like the writer."""
    return np.clip(encode(np.maximum(linear, 0), encoding), 0, 1)


def assert_session_error(excinfo: pytest.ExceptionInfo, file_name: str, field: str | None
                         ) -> None:
    message = str(excinfo.value)
    assert file_name in message, f"{file_name!r} not in {message!r}"
    if field is not None:
        assert field in message, f"{field!r} not in {message!r}"
        assert excinfo.value.field is not None and field in excinfo.value.field


# ============================================================== round trips
def test_round_trip_8bit_srgb(session_dir: Path, images: np.ndarray) -> None:
    cap = load_session(session_dir)
    assert isinstance(cap, Capture)
    assert cap.images.dtype == np.float32 and cap.images.shape == (3, HEIGHT, WIDTH, 3)
    assert (cap.n_images, cap.height, cap.width) == (3, HEIGHT, WIDTH)
    assert cap.bit_depth == "8" and cap.encoding == "srgb"
    assert cap.light_names == LIGHT_NAMES
    # 8-bit quantisation: within half a code step in the encoded domain
    assert_close(code_values(cap.images, "srgb"), code_values(images, "srgb"),
                 atol=0.5 / 255 + 1e-6, rtol=0, name="sRGB codes")
    assert_close(cap.camera.K, make_camera().K, name="K")
    assert cap.camera.image_size == (WIDTH, HEIGHT) and not cap.camera.has_distortion
    assert cap.saturated.dtype == bool and cap.saturated.shape == (3, HEIGHT, WIDTH)
    assert not cap.saturated.any()
    assert cap.mask is not None and cap.mask.dtype == bool
    np.testing.assert_array_equal(cap.mask, make_mask())
    assert cap.landmarks is not None and cap.landmarks.dtype == np.float64
    assert_close(cap.landmarks, make_landmarks(), atol=1e-6, name="landmarks")
    assert cap.lights is not None and cap.lights.names == LIGHT_NAMES
    assert_close(cap.lights.positions, make_lights().positions, name="light positions")
    assert_close(cap.lights.intensities, make_lights().intensities, name="intensities")
    assert (cap.subject, cap.expression) == ("s001", "neutral")
    assert cap.root == session_dir
    assert [p.name for p in cap.image_paths] == ["left.png", "front.png", "right.png"]
    assert all(p.is_file() for p in cap.image_paths)
    assert_close(cap.image_sum(), cap.images.sum(axis=0), name="image_sum")
    assert cap.image_sum().dtype == np.float32


def test_round_trip_16bit_linear(tmp_path: Path) -> None:
    imgs = make_images(seed=3)
    out = write_session(tmp_path / "s16", imgs, make_camera(), light_names=LIGHT_NAMES,
                        bit_depth=16)
    assert read_json(out)["encoding"] == "linear"
    cap = load_session(out)
    assert cap.bit_depth == "16" and cap.encoding == "linear"
    assert_close(cap.images, imgs, atol=0.5 / 65535 + 1e-7, rtol=0, name="linear")
    stored, depth = read_image(out / "left.png")
    assert depth == "16"


def test_written_files_and_json(session_dir: Path) -> None:
    data = read_json(session_dir)
    assert data["format"] == SESSION_FORMAT and data["units"] == "mm"
    assert data["images"] == [{"path": f"{n}.png", "light": n} for n in LIGHT_NAMES]
    assert data["mask"] == "mask.png" and data["landmarks"] == "landmarks.pts"
    mask, depth = read_image(session_dir / "mask.png")
    assert depth == "8" and set(np.unique(mask * 255).astype(int)) == {0, 255}
    leftovers = [p.name for p in session_dir.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_load_from_json_path_and_other_cwd(session_dir: Path, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    cap = load_session(str(session_dir / "session.json"))
    assert cap.root == session_dir
    assert cap.n_images == 3


def test_paths_outside_the_folder_are_allowed(session_dir: Path, edit_session) -> None:
    shared = session_dir.parent / "shared"
    shared.mkdir()
    shutil.move(session_dir / "front.png", shared / "front.png")

    def change(d):
        d["images"][1]["path"] = "../shared/front.png"

    cap = load_session(edit_session(session_dir, change))
    assert cap.image_paths[1].resolve() == (shared / "front.png").resolve()


def test_gamma_encoding_is_honoured(tmp_path: Path) -> None:
    imgs = make_images(seed=4)
    out = write_session(tmp_path / "g", imgs, make_camera(), light_names=LIGHT_NAMES,
                        encoding="gamma:2.2")
    assert read_json(out)["encoding"] == "gamma:2.2"
    raw = cv2.imread(str(out / "front.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    expected_raw = np.round(np.clip(imgs[1], 0, 1) ** (1 / 2.2) * 255)
    assert np.abs(raw.astype(float) - expected_raw).max() <= 1
    cap = load_session(out)
    assert cap.encoding == "gamma:2.2"
    assert_close(cap.images[1], (raw / 255.0) ** 2.2, atol=1e-5, name="gamma decode")
    assert_close(code_values(cap.images, "gamma:2.2"), code_values(imgs, "gamma:2.2"),
                 atol=0.5 / 255 + 1e-6, rtol=0, name="gamma codes")
    # the same files read with another encoding give other values: the field is used
    for other in ("srgb", "linear"):
        data = read_json(out)
        data["encoding"] = other
        write_json(out, data)
        again = load_session(out)
        assert_close(again.images[1], decode(raw / 255.0, other), name=other)
        assert np.abs(again.images - cap.images).max() > 5e-3


def test_default_encoding_depends_on_bit_depth(tmp_path: Path, edit_session) -> None:
    imgs = make_images(seed=5)
    s8 = write_session(tmp_path / "s8", imgs, make_camera(), light_names=LIGHT_NAMES)
    s16 = write_session(tmp_path / "s16", imgs, make_camera(), light_names=LIGHT_NAMES,
                        bit_depth=16, encoding="linear")
    for folder in (s8, s16):
        edit_session(folder, lambda d: d.pop("encoding"))
    cap8, cap16 = load_session(s8), load_session(s16)
    assert cap8.encoding == "srgb" and cap16.encoding == "linear"
    raw8, _ = read_image(s8 / "left.png")
    assert_close(cap8.images[0], decode(raw8, "srgb"), name="sRGB default")


def test_float_npy_images(tmp_path: Path, minimal_dir: Path, edit_session) -> None:
    imgs = make_images(seed=6, peak=3.0)
    for name, img in zip(LIGHT_NAMES, imgs):
        np.save(minimal_dir / f"{name}.npy", img)

    def change(d):
        d.pop("encoding")
        for entry in d["images"]:
            entry["path"] = entry["path"].replace(".png", ".npy")

    cap = load_session(edit_session(minimal_dir, change))
    assert cap.bit_depth == "float" and cap.encoding == "linear"
    np.testing.assert_array_equal(cap.images, imgs)
    assert not cap.saturated.any()


def test_grey_images_become_rgb(minimal_dir: Path) -> None:
    grey = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 200).astype(np.uint8)
    for name in LIGHT_NAMES:
        save_png(minimal_dir / f"{name}.png", grey)
    cap = load_session(minimal_dir)
    assert cap.images.shape == (3, HEIGHT, WIDTH, 3)
    assert_close(cap.images[0, ..., 0], decode(grey / 255.0, "srgb"), name="grey")
    np.testing.assert_array_equal(cap.images[..., 0], cap.images[..., 2])


def test_16bit_tiff_images(minimal_dir: Path, edit_session) -> None:
    rng = np.random.default_rng(7)
    for name in LIGHT_NAMES:
        img = rng.integers(0, 60000, size=(HEIGHT, WIDTH, 3), dtype=np.uint16)
        assert cv2.imwrite(str(minimal_dir / f"{name}.tif"), img[..., ::-1])

    def change(d):
        d["encoding"] = "linear"
        for entry in d["images"]:
            entry["path"] = entry["path"].replace(".png", ".tif")

    cap = load_session(edit_session(minimal_dir, change))
    assert cap.bit_depth == "16"
    raw = cv2.imread(str(minimal_dir / "left.tif"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert_close(cap.images[0], (raw / 65535.0).astype(np.float32), name="tiff")


# ================================================================ ambient
def test_ambient_subtracted_16bit(tmp_path: Path) -> None:
    signal = make_images(seed=8, peak=0.6)
    amb = np.full((HEIGHT, WIDTH, 3), 0.05, np.float32)
    amb[:, : WIDTH // 2, 1] = 0.12
    out = write_session(tmp_path / "amb", signal + amb, make_camera(), light_names=LIGHT_NAMES,
                        bit_depth=16, ambient=amb)
    assert read_json(out)["ambient"] == "ambient.png"
    cap = load_session(out)
    assert_close(cap.images, signal, atol=1.0 / 65535 + 1e-6, rtol=0, name="ambient-free")


def test_ambient_subtracted_after_linearisation(tmp_path: Path) -> None:
    signal = make_images(seed=9, peak=0.5)
    amb = np.full((HEIGHT, WIDTH, 3), 0.1, np.float32)
    out = write_session(tmp_path / "amb8", signal + amb, make_camera(), light_names=LIGHT_NAMES,
                        ambient=amb)
    cap = load_session(out)
    raw, _ = read_image(out / "right.png")
    raw_amb, _ = read_image(out / "ambient.png")
    expected = decode(raw, "srgb") - decode(raw_amb, "srgb")
    assert_close(cap.images[2], expected, name="linear difference")
    # subtracting in the encoded domain would give a visibly different answer
    wrong = decode(np.clip(raw - raw_amb, 0, 1), "srgb")
    assert np.abs(wrong - expected).max() > 0.02
    # noise may leave small negatives: they are kept, not clipped
    assert_close(cap.images, signal, atol=0.01, rtol=0, name="signal")


def test_small_negatives_after_ambient_are_kept(minimal_dir: Path, edit_session) -> None:
    save_png(minimal_dir / "ambient.png", np.full((HEIGHT, WIDTH, 3), 255, np.uint8))
    cap = load_session(edit_session(minimal_dir, lambda d: d.update(ambient="ambient.png")))
    assert (cap.images < 0).any()


# ========================================================= camera handling
def test_k_scaled_for_half_size_images(tmp_path: Path) -> None:
    full = make_camera((2 * WIDTH, 2 * HEIGHT))
    out = write_session(tmp_path / "half", make_images(), full, light_names=LIGHT_NAMES)
    assert read_json(out)["camera"]["image_size"] == [2 * WIDTH, 2 * HEIGHT]
    cap = load_session(out)
    expected = full.scaled((WIDTH, HEIGHT))
    assert cap.camera.image_size == (WIDTH, HEIGHT)
    assert_close(cap.camera.K, expected.K, name="scaled K")
    assert cap.camera.K[0, 0] == pytest.approx(0.5 * full.K[0, 0])


def test_k_used_as_is_without_image_size(minimal_dir: Path, edit_session) -> None:
    cap = load_session(edit_session(minimal_dir, lambda d: d["camera"].pop("image_size")))
    assert_close(cap.camera.K, make_camera().K, name="K")
    assert cap.camera.image_size == (WIDTH, HEIGHT)


def test_different_aspect_ratio_warns(minimal_dir: Path, edit_session, caplog) -> None:
    def change(d):
        d["camera"]["image_size"] = [2 * WIDTH, HEIGHT]

    with caplog.at_level(logging.WARNING, logger="faceps.capture.session"):
        cap = load_session(edit_session(minimal_dir, change))
    assert "aspect" in caplog.text
    assert cap.camera.K[1, 1] == pytest.approx(make_camera().K[1, 1])


DIST = np.array([-0.25, 0.08, 0.002, -0.003, 0.01])


def _distorted_session(tmp_path: Path):
    size = (96, 80)
    cam = make_camera(size, DIST)
    true_pts = make_landmarks(size, seed=11)
    # forward model: undistorted pixels -> normalised rays -> distorted pixels (cv2)
    rays = np.concatenate([true_pts, np.ones((68, 1))], 1) @ np.linalg.inv(cam.K).T
    distorted, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), cam.K, DIST)
    distorted = distorted.reshape(-1, 2)
    imgs = make_images(size=size, seed=12)
    mask = make_mask(size)
    out = write_session(tmp_path / "dist", imgs, cam, light_names=LIGHT_NAMES, bit_depth=16,
                        landmarks=distorted, mask=mask)
    return out, cam, true_pts, distorted


def test_distortion_undistorts_landmarks(tmp_path: Path) -> None:
    out, cam, true_pts, distorted = _distorted_session(tmp_path)
    assert np.abs(distorted - true_pts).max() > 0.3  # the distortion is visible
    cap = load_session(out)
    assert not cap.camera.has_distortion
    assert_close(cap.camera.K, cam.K, name="K")
    assert_close(cap.landmarks, true_pts, atol=1e-4, rtol=0, name="undistorted landmarks")
    predicted = cv2.undistortPoints(distorted.reshape(-1, 1, 2), cam.K, DIST, P=cam.K)
    assert_close(cap.landmarks, predicted.reshape(-1, 2), atol=1e-2, rtol=0,
                 name="cv2 prediction")


def test_distortion_undistorts_images_and_mask(tmp_path: Path) -> None:
    out, cam, _, _ = _distorted_session(tmp_path)
    cap = load_session(out)
    raw, _ = read_image(out / "front.png")
    m1, m2 = cv2.initUndistortRectifyMap(cam.K, DIST, None, cam.K, cam.image_size,
                                         cv2.CV_32FC1)
    expected = cv2.remap(raw, m1, m2, cv2.INTER_LINEAR)
    assert_close(cap.images[1], expected, name="undistorted image")
    # cv2.undistort agrees up to its fixed-point interpolation tables
    assert_close(cap.images[1], cv2.undistort(raw, cam.K, DIST), atol=2e-3, rtol=0,
                 name="cv2.undistort")
    mask, _ = read_image(out / "mask.png")
    expected_mask = cv2.remap((mask > 0).astype(np.uint8), m1, m2, cv2.INTER_NEAREST) > 0
    np.testing.assert_array_equal(cap.mask, expected_mask)
    assert not np.array_equal(cap.mask, mask > 0)


def test_distortion_moves_a_bright_spot(tmp_path: Path, edit_session) -> None:
    size = (96, 80)
    cam = make_camera(size, DIST)
    target = np.array([12.0, 10.0])  # undistorted position, near a corner
    ray = np.array([*target, 1.0]) @ np.linalg.inv(cam.K).T
    spot, _ = cv2.projectPoints(ray[None], np.zeros(3), np.zeros(3), cam.K, DIST)
    su, sv = spot.reshape(2)
    u, v = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    blob = np.exp(-((u - su) ** 2 + (v - sv) ** 2) / (2 * 1.5**2)).astype(np.float32)
    imgs = np.repeat(np.repeat(blob[None, ..., None], 3, axis=3), 3, axis=0) * 0.9
    out = write_session(tmp_path / "spot", imgs, cam, light_names=LIGHT_NAMES, bit_depth=16)
    lum = load_session(out).images[0, ..., 1]
    w = lum / lum.sum()
    centroid = np.array([(w * u).sum(), (w * v).sum()])
    assert np.hypot(su - target[0], sv - target[1]) > 1.0
    assert np.hypot(*(centroid - target)) < 0.3


# ============================================================== saturation
def test_saturation_mask_8bit(minimal_dir: Path) -> None:
    base = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    img = base.copy()
    img[3, 4, 0] = 255
    img[5, 6, 2] = 254  # >= 0.995 * 255
    img[7, 8, 1] = 253  # below
    save_png(minimal_dir / "front.png", img)
    save_png(minimal_dir / "left.png", base)
    save_png(minimal_dir / "right.png", base)
    cap = load_session(minimal_dir)
    expected = np.zeros((HEIGHT, WIDTH), bool)
    expected[3, 4] = expected[5, 6] = True
    np.testing.assert_array_equal(cap.saturated[1], expected)
    assert not cap.saturated[0].any() and not cap.saturated[2].any()
    # per channel: only the clipped channel (the brightest one at those pixels)
    ch = cap.saturated_channels
    assert ch.shape == (3, HEIGHT, WIDTH, 3) and ch.dtype == bool
    np.testing.assert_array_equal(ch.any(-1), cap.saturated)
    for v, u in ((3, 4), (5, 6)):
        assert ch[1, v, u].sum() == 1 and ch[1, v, u].argmax() == cap.images[1, v, u].argmax()
    assert ch[1, 3, 4].argmax() != ch[1, 5, 6].argmax()


def test_saturated_channels_are_checked(minimal_dir: Path) -> None:
    from dataclasses import replace

    cap = load_session(minimal_dir)
    with pytest.raises(ShapeError, match="saturated_channels"):
        replace(cap, saturated_channels=np.zeros((3, HEIGHT, WIDTH), bool))
    flags = np.zeros((3, HEIGHT, WIDTH, 3), bool)
    flags[0, 1, 1, 2] = True                       # not in cap.saturated
    with pytest.raises(ShapeError, match="saturated does not"):
        replace(cap, saturated_channels=flags)
    assert replace(cap, saturated_channels=None).saturated_channels is None


def test_saturation_mask_16bit(tmp_path: Path) -> None:
    imgs = make_images(seed=13, peak=0.5)
    imgs[2, 10:12, 20:25, 1] = 1.5  # clipped at full scale by the writer
    imgs[2, 0, 0, 0] = 0.9955
    imgs[2, 0, 1, 0] = 0.99
    out = write_session(tmp_path / "sat", imgs, make_camera(), light_names=LIGHT_NAMES,
                        bit_depth=16)
    cap = load_session(out)
    expected = np.zeros((HEIGHT, WIDTH), bool)
    expected[10:12, 20:25] = True
    expected[0, 0] = True
    np.testing.assert_array_equal(cap.saturated[2], expected)
    assert cap.saturated.sum() == expected.sum()


def test_saturation_survives_ambient(tmp_path: Path) -> None:
    imgs = make_images(seed=14, peak=0.5)
    imgs[0, 5, 5] = 1.0
    amb = np.full((HEIGHT, WIDTH, 3), 0.1, np.float32)
    out = write_session(tmp_path / "sa", imgs, make_camera(), light_names=LIGHT_NAMES,
                        ambient=amb)
    cap = load_session(out)
    assert cap.saturated[0, 5, 5] and cap.saturated.sum() == 1


# =============================================================== landmarks
def test_pts_file_format_and_round_trip(tmp_path: Path) -> None:
    pts = make_landmarks()
    path = write_landmarks_pts(tmp_path / "lm.pts", pts)
    text = path.read_text()
    assert text.startswith("version: 1\nn_points: 68\n{\n")
    assert text.rstrip().endswith("}")
    first = [float(x) for x in text.splitlines()[3].split()]
    assert first == pytest.approx(pts[0] + 1.0, abs=1e-6)  # iBUG files count from 1
    assert_close(read_landmarks(path), pts, atol=1e-6, name="pts round trip")


def test_json_landmarks(minimal_dir: Path, edit_session) -> None:
    pts = make_landmarks(seed=15)
    (minimal_dir / "lm.json").write_text(json.dumps(pts.tolist()))
    (minimal_dir / "lm_obj.json").write_text(json.dumps({"landmarks": pts.tolist()}))
    cap = load_session(edit_session(minimal_dir, lambda d: d.update(landmarks="lm.json")))
    assert_close(cap.landmarks, pts, name="json landmarks")
    assert_close(read_landmarks(minimal_dir / "lm_obj.json"), pts, name="json object")


def test_pts_from_other_tools(tmp_path: Path) -> None:
    pts = make_landmarks(seed=16)
    body = "\n".join(f"{u + 1:.3f} {v + 1:.3f}" for u, v in pts)
    path = tmp_path / "other.pts"
    path.write_text(f"version: 1\r\nn_points:  68\r\n{{\r\n{body}\r\n}}\r\n")
    assert_close(read_landmarks(path), pts, atol=1e-3, name="crlf pts")


def test_read_landmarks_any_count(tmp_path: Path) -> None:
    path = write_landmarks_pts(tmp_path / "five.pts", np.arange(10.0).reshape(5, 2))
    assert read_landmarks(path, n_points=None).shape == (5, 2)
    with pytest.raises(SessionError) as ei:
        read_landmarks(path)
    assert_session_error(ei, "five.pts", "landmarks")


# ================================================================== lights
def test_lights_parsed_in_image_order(minimal_dir: Path, edit_session) -> None:
    def change(d):
        d["lights"] = {
            "right": {"position": [150, 0, 0], "intensity": 2.5},
            "spare": {"position": [0, 200, 0]},
            "front": {"position": [0, -10, 5], "intensity": [1, 2, 3],
                      "direction": [0, 0, 4], "anisotropy": 1.5},
            "left": {"position": [-150, 0, 0]},
        }

    cap = load_session(edit_session(minimal_dir, change))
    lights = cap.lights
    assert lights is not None and lights.names == LIGHT_NAMES
    assert_close(lights.positions, [[-150, 0, 0], [0, -10, 5], [150, 0, 0]], name="P")
    assert_close(lights.intensities, [[1, 1, 1], [1, 2, 3], [2.5, 2.5, 2.5]], name="beta")
    assert_close(lights.directions, [[0, 0, 0], [0, 0, 1], [0, 0, 0]], name="d")
    assert_close(lights.anisotropy, [0, 1.5, 0], name="mu")


def test_lights_written_from_pointlights(session_dir: Path) -> None:
    data = read_json(session_dir)
    assert set(data["lights"]) == set(LIGHT_NAMES)
    assert data["lights"]["left"]["position"] == make_lights().positions[0].tolist()


# ================================================================= inspect
def test_inspect_summary_and_sheet(tmp_path: Path, capsys) -> None:
    imgs = make_images(seed=17, peak=0.02)  # a dark near-light capture
    imgs[1, 4:8, 4:8] = 2.0
    out = write_session(tmp_path / "insp", imgs, make_camera(), light_names=LIGHT_NAMES,
                        landmarks=make_landmarks(), mask=make_mask(), lights=make_lights(),
                        subject="s042", expression="smile")
    cap = load_session(out)
    sheet_path = tmp_path / "sheet" / "contact.png"
    text = inspect_session(cap, sheet_path)
    assert capsys.readouterr().out == ""
    for word in (str(out), "3 x 40x32", "8-bit", "srgb", "fx=60.00", "left.png", "front",
                 "right", "landmarks:  yes", "lights:     given", "s042", "smile", "mask:"):
        assert word in text, word
    front_line = next(line for line in text.splitlines() if "front.png" in line)
    assert front_line.rstrip().endswith("%)")
    total, per = front_line.split("  (")
    assert float(total.split()[-2]) == pytest.approx(100 * 16 / (WIDTH * HEIGHT), abs=0.01)
    # per channel (red / green / blue): every channel of those 16 pixels clipped
    share = [float(v) for v in per.rstrip(" %)").split(" / ")]
    assert share == pytest.approx([100 * 16 / (WIDTH * HEIGHT)] * 3, abs=0.01)
    sheet, depth = read_image(sheet_path)
    assert depth == "8" and sheet.ndim == 3 and sheet.shape[1] > 3 * 300
    # auto exposure makes the dark images visible
    assert sheet.mean() > 0.15
    # saturated pixels are tinted red
    red = (sheet[..., 0] > 0.6) & (sheet[..., 1] < 0.45) & (sheet[..., 2] < 0.45)
    assert red.sum() > 100


def test_inspect_without_optional_fields(minimal_dir: Path, tmp_path: Path) -> None:
    text = inspect_session(minimal_dir, tmp_path / "c.png")
    assert "lights:     to be calibrated" in text
    assert "landmarks:  no" in text and "mask:       none" in text
    assert (tmp_path / "c.png").is_file()


def test_display_tone_mapping_is_srgb() -> None:
    from faceps.capture.inspect import DISPLAY_WHITE, display_gain

    img = np.full((10, 10, 3), 0.004, np.float32)
    gain = display_gain(img)
    assert gain == pytest.approx(DISPLAY_WHITE / 0.004)
    assert float(linear_to_srgb(np.float32(DISPLAY_WHITE))) > 0.9


# ========================================================= write_session args
def test_write_session_rejects_bad_arguments(tmp_path: Path) -> None:
    from faceps.core import ConfigError, ShapeError

    imgs = make_images()
    cam = make_camera()
    with pytest.raises(ConfigError):
        write_session(tmp_path / "a", imgs, cam, light_names=("a", "b"))
    with pytest.raises(ConfigError):
        write_session(tmp_path / "a", imgs, cam, light_names=("a", "a", "b"))
    with pytest.raises(ConfigError):
        write_session(tmp_path / "a", imgs, cam, light_names=LIGHT_NAMES, bit_depth=12)
    with pytest.raises(ConfigError):
        write_session(tmp_path / "a", imgs, cam, light_names=LIGHT_NAMES, encoding="log")
    with pytest.raises(ShapeError):
        write_session(tmp_path / "a", imgs[..., 0], cam, light_names=LIGHT_NAMES)
    bad = imgs.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ShapeError):
        write_session(tmp_path / "a", bad, cam, light_names=LIGHT_NAMES)
    assert not (tmp_path / "a" / "session.json").exists()


def test_write_session_custom_names(tmp_path: Path) -> None:
    out = write_session(tmp_path / "n", make_images(), make_camera(),
                        light_names=("L/1", "mask", "front"),
                        image_names=("img/a.png", "b.png", "c.png"))
    data = read_json(out)
    assert [e["path"] for e in data["images"]] == ["img/a.png", "b.png", "c.png"]
    assert load_session(out).light_names == ("L/1", "mask", "front")
    out2 = write_session(tmp_path / "m", make_images(), make_camera(),
                         light_names=("L/1", "mask", "front"), mask=make_mask())
    files = [e["path"] for e in read_json(out2)["images"]]
    assert "mask.png" not in files and len(set(files)) == 3
    assert load_session(out2).mask is not None


# ======================================================= malformed session.json
def _set(path: str, value):
    """A change that sets a nested key; path like 'camera.K' or 'images.1.path'."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def change(d):
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


def _delete(path: str):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def change(d):
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return change


def _with_lights(entry_changes: dict | None = None):
    def change(d):
        lights = {n: {"position": [10.0 * i, 0, 0], "intensity": 1.0}
                  for i, n in enumerate(LIGHT_NAMES)}
        for name, entry in (entry_changes or {}).items():
            if entry is None:
                lights.pop(name)
            else:
                lights[name] = entry
        d["lights"] = lights

    return change


NAN = float("nan")
INF = float("inf")

MALFORMED_JSON = [
    ("format missing", _delete("format"), "format"),
    ("format version 2", _set("format", "faceps.session/2"), "format"),
    ("format other", _set("format", "something/1"), "format"),
    ("format number", _set("format", 1), "format"),
    ("units cm", _set("units", "cm"), "units"),
    ("camera missing", _delete("camera"), "camera"),
    ("camera list", _set("camera", [1, 2]), "camera"),
    ("K missing", _delete("camera.K"), "camera.K"),
    ("K string", _set("camera.K", "[[1,0,0],[0,1,0],[0,0,1]]"), "camera.K"),
    ("K 2x3", _set("camera.K", [[50, 0, 20], [0, 50, 16]]), "camera.K"),
    ("K 3x2", _set("camera.K", [[50, 0], [0, 50], [0, 0]]), "camera.K"),
    ("K nan", _set("camera.K.0.0", NAN), "camera.K"),
    ("K inf", _set("camera.K.1.2", INF), "camera.K"),
    ("K string entry", _set("camera.K.0.2", "20"), "camera.K"),
    ("K bool entry", _set("camera.K.0.1", True), "camera.K"),
    ("K negative focal", _set("camera.K.1.1", -50), "camera.K"),
    ("K last row", _set("camera.K.2", [0, 0, 2]), "camera.K"),
    ("image_size short", _set("camera.image_size", [40]), "camera.image_size"),
    ("image_size negative", _set("camera.image_size", [40, -32]), "camera.image_size"),
    ("image_size fractional", _set("camera.image_size", [40.5, 32]), "camera.image_size"),
    ("image_size string", _set("camera.image_size", "40x32"), "camera.image_size"),
    ("distortion 3", _set("camera.distortion", [0.1, 0, 0]), "camera.distortion"),
    ("distortion string", _set("camera.distortion", [0.1, "x", 0, 0, 0]),
     "camera.distortion"),
    ("distortion nan", _set("camera.distortion", [NAN, 0, 0, 0, 0]), "camera.distortion"),
    ("encoding unknown", _set("encoding", "log"), "encoding"),
    ("encoding gamma 0", _set("encoding", "gamma:0"), "encoding"),
    ("encoding number", _set("encoding", 2.2), "encoding"),
    ("images missing", _delete("images"), "images"),
    ("images object", _set("images", {"path": "left.png", "light": "left"}), "images"),
    ("images empty", _set("images", []), "images"),
    ("image entry string", _set("images.0", "left.png"), "images[0]"),
    ("image without path", _delete("images.1.path"), "images[1].path"),
    ("image path number", _set("images.1.path", 3), "images[1].path"),
    ("image path empty", _set("images.2.path", ""), "images[2].path"),
    ("image without light", _delete("images.0.light"), "images[0].light"),
    ("image light list", _set("images.0.light", ["left"]), "images[0].light"),
    ("duplicate image light", _set("images.2.light", "left"), "images[2].light"),
    ("lights list", _set("lights", [1, 2, 3]), "lights"),
    ("light undefined", _with_lights({"front": None}), "images[1].light"),
    ("light entry number", _with_lights({"left": 5}), "lights.left"),
    ("light position missing", _with_lights({"left": {"intensity": 1}}),
     "lights.left.position"),
    ("light position short", _with_lights({"left": {"position": [1, 2]}}),
     "lights.left.position"),
    ("light position nan", _with_lights({"right": {"position": [NAN, 0, 0]}}),
     "lights.right.position"),
    ("light intensity negative", _with_lights({"front": {"position": [0, 0, 0],
                                                         "intensity": -1}}),
     "lights.front.intensity"),
    ("light rgb negative", _with_lights({"front": {"position": [0, 0, 0],
                                                    "intensity": [1, -0.5, 1]}}),
     "lights.front.intensity"),
    ("light intensity string", _with_lights({"front": {"position": [0, 0, 0],
                                                        "intensity": "bright"}}),
     "lights.front.intensity"),
    ("light intensity inf", _with_lights({"front": {"position": [0, 0, 0],
                                                     "intensity": INF}}),
     "lights.front.intensity"),
    ("light anisotropy negative", _with_lights({"left": {"position": [0, 0, 0],
                                                          "anisotropy": -2}}),
     "lights.left.anisotropy"),
    ("led without direction", _with_lights({"left": {"position": [0, 0, 0],
                                                      "anisotropy": 2}}),
     "lights.left.direction"),
    ("light direction short", _with_lights({"left": {"position": [0, 0, 0],
                                                      "direction": [0, 1]}}),
     "lights.left.direction"),
    ("subject number", _set("subject", 7), "subject"),
    ("expression list", _set("expression", ["smile"]), "expression"),
    ("mask number", _set("mask", 1), "mask"),
    ("ambient object", _set("ambient", {"path": "a.png"}), "ambient"),
    ("landmarks list", _set("landmarks", [[1, 2]] * 68), "landmarks"),
]


@pytest.mark.parametrize("change, field", [m[1:] for m in MALFORMED_JSON],
                         ids=[m[0] for m in MALFORMED_JSON])
def test_malformed_session_json(session_dir: Path, edit_session, change, field) -> None:
    edit_session(session_dir, change)
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "session.json", field)


def test_missing_session_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SessionError) as ei:
        load_session(tmp_path / "empty")
    assert_session_error(ei, "session.json", None)
    with pytest.raises(SessionError) as ei:
        load_session(tmp_path / "nowhere")
    assert_session_error(ei, "nowhere", None)


@pytest.mark.parametrize("text", [b'{"format": ', b"not json", b"", b'{"a": 1,}',
                                  b'{"format": "\xff\xfe"}'])
def test_invalid_json(session_dir: Path, text: bytes) -> None:
    (session_dir / "session.json").write_bytes(text)
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "session.json", None)


def test_top_level_not_object(session_dir: Path) -> None:
    write_json(session_dir, [1, 2, 3])
    with pytest.raises(SessionError, match="session.json"):
        load_session(session_dir)


def test_duplicate_light_names_in_lights(session_dir: Path) -> None:
    text = (session_dir / "session.json").read_text()
    data = json.loads(text)
    lights = json.dumps(data["lights"]["left"])
    text = text.replace('"lights": {', f'"lights": {{\n  "left": {lights},', 1)
    (session_dir / "session.json").write_text(text)
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "session.json", "lights.left")


def test_deeply_nested_json(session_dir: Path) -> None:
    (session_dir / "session.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SessionError, match="session.json"):
        load_session(session_dir)


def test_huge_integer_in_k(session_dir: Path) -> None:
    text = json.dumps({**read_json(session_dir), "camera": {"K": [[10**400, 0, 1], [0, 1, 1],
                                                                  [0, 0, 1]]}})
    (session_dir / "session.json").write_text(text)
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "session.json", "camera.K")


# ========================================================== malformed files
def test_missing_image_file(session_dir: Path) -> None:
    (session_dir / "front.png").unlink()
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "front.png", "images[1].path")


def test_truncated_png(session_dir: Path) -> None:
    path = session_dir / "right.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "right.png", "images[2].path")


def test_png_without_end_chunk(session_dir: Path) -> None:
    path = session_dir / "left.png"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "left.png", "images[0].path")


def test_not_an_image(session_dir: Path) -> None:
    (session_dir / "front.png").write_text("hello")
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "front.png", "images[1].path")


def test_image_path_is_a_folder(session_dir: Path, edit_session) -> None:
    (session_dir / "sub").mkdir()
    edit_session(session_dir, _set("images.0.path", "sub"))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "sub", "images[0].path")


def test_images_of_different_sizes(session_dir: Path) -> None:
    save_png(session_dir / "right.png", np.zeros((HEIGHT, WIDTH + 2, 3), np.uint8))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "right.png", "images[2].path")


def test_images_of_different_bit_depths(session_dir: Path) -> None:
    save_png(session_dir / "front.png", np.zeros((HEIGHT, WIDTH, 3), np.uint16))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "front.png", "images[1].path")


def test_mask_of_different_size(session_dir: Path) -> None:
    save_png(session_dir / "mask.png", np.zeros((HEIGHT - 1, WIDTH), np.uint8))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "mask.png", "mask")


def test_ambient_problems(session_dir: Path, edit_session) -> None:
    edit_session(session_dir, _set("ambient", "ambient.png"))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "ambient.png", "ambient")
    save_png(session_dir / "ambient.png", np.zeros((HEIGHT, WIDTH // 2, 3), np.uint8))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "ambient.png", "ambient")
    save_png(session_dir / "ambient.png", np.zeros((HEIGHT, WIDTH, 3), np.uint16))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "ambient.png", "ambient")


def test_missing_mask_file(session_dir: Path) -> None:
    (session_dir / "mask.png").unlink()
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "mask.png", "mask")


def test_missing_landmark_file(session_dir: Path) -> None:
    (session_dir / "landmarks.pts").unlink()
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "landmarks.pts", "landmarks")


@pytest.mark.parametrize("n", [67, 69])
def test_landmark_count_pts(session_dir: Path, n: int) -> None:
    write_landmarks_pts(session_dir / "landmarks.pts", np.ones((n, 2)))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "landmarks.pts", "landmarks")
    assert str(n) in str(ei.value)


def test_landmark_count_json(session_dir: Path, edit_session) -> None:
    (session_dir / "lm.json").write_text(json.dumps([[1.0, 2.0]] * 69))
    edit_session(session_dir, _set("landmarks", "lm.json"))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "lm.json", "landmarks")


@pytest.mark.parametrize("content", [
    "version: 1\nn_points: 68\n" + "1 2\n" * 68,                       # no braces
    "version: 1\nn_points: 68\n{\n" + "1 2\n" * 68,                    # not closed
    "version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "a b\n}\n",       # not numbers
    "version: 1\nn_points: 68\n{\n" + "1 2 3\n" * 68 + "}\n",          # three columns
    "version: 1\nn_points: 70\n{\n" + "1 2\n" * 68 + "}\n",            # count mismatch
    "version: 1\nn_points: many\n{\n" + "1 2\n" * 68 + "}\n",          # bad header
    "version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "nan 2\n}\n",     # NaN
    "garbage\n",
])
def test_malformed_pts(session_dir: Path, content: str) -> None:
    (session_dir / "landmarks.pts").write_text(content)
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "landmarks.pts", "landmarks")


@pytest.mark.parametrize("content", ['[[1, 2], "x"]', '{"points": []}', "[[1, NaN]]" ,
                                     "[[1, 2]", '[[1, 2, 3]]'])
def test_malformed_json_landmarks(session_dir: Path, edit_session, content: str) -> None:
    (session_dir / "lm.json").write_text(content)
    edit_session(session_dir, _set("landmarks", "lm.json"))
    with pytest.raises(SessionError) as ei:
        load_session(session_dir)
    assert_session_error(ei, "lm.json", "landmarks")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.25])
def test_bad_values_in_float_images(minimal_dir: Path, edit_session, bad: float) -> None:
    imgs = make_images(seed=18)
    imgs[1, 3, 3, 1] = bad
    for name, img in zip(LIGHT_NAMES, imgs):
        np.save(minimal_dir / f"{name}.npy", img)

    def change(d):
        for entry in d["images"]:
            entry["path"] = entry["path"].replace(".png", ".npy")

    edit_session(minimal_dir, change)
    with pytest.raises(SessionError) as ei:
        load_session(minimal_dir)
    assert_session_error(ei, "front.npy", "images[1].path")


def test_nan_in_float_ambient(minimal_dir: Path, edit_session) -> None:
    amb = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    amb[0, 0, 0] = np.nan
    np.save(minimal_dir / "amb.npy", amb)
    edit_session(minimal_dir, _set("ambient", "amb.npy"))
    with pytest.raises(SessionError) as ei:
        load_session(minimal_dir)
    assert_session_error(ei, "amb.npy", "ambient")


def test_float_images_overflowing_the_encoding(minimal_dir: Path, edit_session) -> None:
    for name in LIGHT_NAMES:
        np.save(minimal_dir / f"{name}.npy", np.full((HEIGHT, WIDTH, 3), 1e30, np.float32))

    def change(d):
        d["encoding"] = "gamma:3"
        for entry in d["images"]:
            entry["path"] = entry["path"].replace(".png", ".npy")

    edit_session(minimal_dir, change)
    with pytest.raises(SessionError) as ei:
        load_session(minimal_dir)
    assert_session_error(ei, "left.npy", "images[0].path")


def test_unreadable_npy(minimal_dir: Path, edit_session) -> None:
    (minimal_dir / "left.npy").write_bytes(b"\x93NUMPY garbage")
    edit_session(minimal_dir, _set("images.0.path", "left.npy"))
    with pytest.raises(SessionError) as ei:
        load_session(minimal_dir)
    assert_session_error(ei, "left.npy", "images[0].path")


def test_capture_validates_its_fields() -> None:
    from faceps.core import ShapeError

    imgs = make_images()
    sat = np.zeros((3, HEIGHT, WIDTH), bool)
    Capture(Path("."), make_camera(), imgs, LIGHT_NAMES, sat)
    with pytest.raises(ShapeError):
        Capture(Path("."), make_camera(), imgs, LIGHT_NAMES[:2], sat)
    with pytest.raises(ShapeError):
        Capture(Path("."), make_camera((WIDTH, HEIGHT + 1)), imgs, LIGHT_NAMES, sat)
    with pytest.raises(ShapeError):
        Capture(Path("."), make_camera(distortion=DIST), imgs, LIGHT_NAMES, sat)
    with pytest.raises(ShapeError):
        Capture(Path("."), make_camera(), imgs, LIGHT_NAMES, sat, mask=np.zeros((2, 2)))
    with pytest.raises(ShapeError):
        Capture(Path("."), make_camera(), imgs, LIGHT_NAMES, sat, lights=make_lights()
                .select([2, 1, 0]))
