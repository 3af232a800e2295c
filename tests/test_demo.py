import json

import cv2

from faceps.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "400x300", "-q"]) == 0
    text = capsys.readouterr().out
    assert "near-light least squares" in text and "proxy normals" in text
    for name in ("model_preview.png", "contact_sheet.png", "overview.png", "summary.json",
                 "session/session.json", "session/ground_truth/normals.npy"):
        assert (out / name).exists(), name
    img = cv2.imread(str(out / "overview.png"))
    assert img is not None and img.shape[0] > 300 and img.std() > 10
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert abs(m["eq1"]["median_ratio"] - 1) < 0.05
    assert m["proxy"]["mean"] < 20 and m["landmark_fit"]["rmse_px"] < 3
    assert m["nearlight_ls"]["count"] > 0
    # running it again replaces the earlier run
    assert main(["demo", "--out", str(out), "--size", "400x300", "-q"]) == 0
