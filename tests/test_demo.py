import json
from html.parser import HTMLParser

import cv2
import pytest

from faceps.cli import main
from faceps.demo import NETWORK_1, NETWORK_3, OPTIMISATION, PROXY, run_demo
from faceps.learn.infer import WEIGHT_FILES, default_weights_dir
from faceps.optimize.fit import FitConfig
from faceps.optimize.reconstruct import ReconstructConfig


class _Headings(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images = 0
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = tag == "h2"
        self.images += tag == "img"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())
            self._in_h2 = False


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "400x300", "-q"]) == 0
    text = capsys.readouterr().out
    assert "near-light least squares" in text and "proxy normals" in text
    for name in ("model_preview.png", "contact_sheet.png", "overview.png", "summary.json",
                 "session/session.json", "session/ground_truth/normals.npy",
                 "reconstruction/normals.npy", "reconstruction/mesh.ply",
                 "reconstruction/report.html", "report.html"):
        assert (out / name).exists(), name
    img = cv2.imread(str(out / "overview.png"))
    assert img is not None and img.shape[0] > 300 and img.std() > 10
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert abs(m["eq1"]["median_ratio"] - 1) < 0.05
    assert m["proxy"]["mean"] < 20 and m["landmark_fit"]["rmse_px"] < 3
    assert m["nearlight_ls"]["count"] > 0
    methods = m["methods"]
    assert methods[OPTIMISATION]["mean"] < 15 and methods[OPTIMISATION]["coverage"] > 50
    assert methods[OPTIMISATION]["depth_mae_mm"] < 10 and PROXY in methods
    assert OPTIMISATION in text and "MAE mm" in text
    shipped = all((default_weights_dir(check=False) / f).is_file()
                  for f in WEIGHT_FILES.values())
    if shipped:
        assert {NETWORK_1, NETWORK_3} <= set(methods)
        assert (out / "infer-1" / "normals.npy").exists()
    else:
        assert "skipped" in text and not (out / "infer-3").exists()
    page = _Headings()
    page.feed((out / "report.html").read_text())
    for title in ("Input images", "Methods compared", "Normals and depth", "Albedo and mesh"):
        assert title in page.h2, page.h2
    # inputs; ground truth, proxy and optimisation rows of both grids
    assert page.images >= 3 + 5 + 6 + 7

    # running it again replaces the earlier run; weights that are not there are a note
    # (a quicker optimisation: no photometric proxy refinement, one pass)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    quick = ReconstructConfig(fit=FitConfig(photometric=False), refine_passes=0)
    res = run_demo(out, size=(400, 300), weights=empty, reconstruct_config=quick)
    assert any("skipped" in n and str(empty) in n for n in res.notes)
    assert not (out / "infer-1").exists() and "skipped" in res.summary()
    assert "skipped" in (out / "report.html").read_text()
