import json

import numpy as np
import pytest

from faceps.capture import write_session
from faceps.cli import main
from faceps.core import Camera, PointLights, shade_point
from tests.core.test_lights import sphere_maps

LIGHTS = PointLights([[-220.0, -60.0, 260.0], [0.0, -180.0, 200.0], [230.0, -40.0, 270.0]],
                     [[6e4, 6e4, 6e4], [5e4, 5e4, 5e4], [7e4, 7e4, 7e4]],
                     names=("left", "front", "right"))


def pose_session(root, name, centre, radius, cam):
    P, N, mask = sphere_maps(cam, centre, radius)
    albedo = np.where(mask[..., None], np.full(P.shape, 0.8), 0.0)
    imgs = shade_point(np.where(mask[..., None], P, 0), np.where(mask[..., None], N, 0),
                       albedo, LIGHTS)
    write_session(root / name, imgs, cam, light_names=LIGHTS.names, bit_depth=16)


def test_calibrate_sphere_target(tmp_path, capsys):
    cam = Camera(np.array([[900.0, 0, 159.5], [0, 900.0, 119.5], [0, 0, 1]]), (320, 240))
    poses = [([0, 0, 500], 40.0), ([30, -10, 520], 40.0), ([-25, 15, 480], 40.0)]
    for k, (c, r) in enumerate(poses):
        pose_session(tmp_path, f"pose{k}", c, r, cam)
    desc = {"target": "sphere", "albedo": 0.8,
            "poses": [{"session": f"pose{k}", "centre": c, "radius": r}
                      for k, (c, r) in enumerate(poses)]}
    (tmp_path / "target.json").write_text(json.dumps(desc))
    out = tmp_path / "lights.json"
    assert main(["calibrate", str(tmp_path / "target.json"), "--out", str(out)]) == 0
    assert "calibrated 3 lights" in capsys.readouterr().out
    got = PointLights.from_dict(json.loads(out.read_text())["lights"], order=LIGHTS.names)
    assert np.abs(got.positions - LIGHTS.positions).max() < 3.0
    assert np.abs(got.intensities / LIGHTS.intensities - 1).max() < 0.02


@pytest.mark.parametrize("desc, field", [
    ({"target": "cube", "poses": []}, "target"),
    ({"target": "sphere", "poses": []}, "poses"),
    ({"target": "sphere", "poses": [{"session": "nope", "centre": [0, 0, 1], "radius": 1}]},
     "session.json"),
])
def test_malformed_target_files(tmp_path, capsys, desc, field):
    (tmp_path / "t.json").write_text(json.dumps(desc))
    assert main(["calibrate", str(tmp_path / "t.json"), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not (tmp_path / "o.json").exists()
