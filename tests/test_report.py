"""The visual report (faceps.report, `faceps report`): a small synthetic session
reconstructed by the optimisation pipeline, the page with and without ground truth and
session, every picture a decodable PNG data URI, the comparison page, the errors for bad
folders, and (when a browser is installed) a real rendering of the page."""

import base64
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from faceps.capture import load_session
from faceps.cli import main
from faceps.core.errors import FacepsError, SessionError
from faceps.model import load_model
from faceps.optimize.fit import FitConfig
from faceps.optimize.reconstruct import ReconstructConfig, reconstruct, write_reconstruction
from faceps.report import (
    REPORT_NAME,
    load_ground_truth,
    mesh_views,
    score,
    write_comparison,
    write_report,
)
from faceps.synth.session import SessionSynthConfig, synth_session

SIZE = (320, 240)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def session(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "session"
    synth_session(d, seed=2, model=model, config=SessionSynthConfig(size=SIZE))
    return d


@pytest.fixture(scope="module")
def rec_dir(model, session, tmp_path_factory):
    """A contract-2 folder written by the optimisation pipeline (quick settings)."""
    out = tmp_path_factory.mktemp("report-rec") / "rec"
    config = ReconstructConfig(fit=FitConfig(photometric=False), refine_passes=0)
    write_reconstruction(out, reconstruct(load_session(session), model, config), model)
    return out


class _Page(HTMLParser):
    """Headings, images, table headers, links and scripts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images: list[dict] = []
        self.th: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self._tag: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data.strip())
        elif self._tag == "th" and data.strip():
            self.th.append(data.strip())


def parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_images(page: _Page) -> None:
    """Every <img> is a decodable PNG data URI of non-trivial size and content, and its
    width/height attributes are the PNG's."""
    assert page.images
    for a in page.images:
        src = a["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None
        assert img.shape[0] >= 100 and img.shape[1] >= 80, img.shape
        assert img.std() > 5, f"a blank picture: {a.get('alt')}"
        assert (int(a["width"]), int(a["height"])) == (img.shape[1], img.shape[0])
    assert not page.scripts and not page.external


def test_report_without_ground_truth(rec_dir, session):
    path = write_report(rec_dir, session=session)
    assert path == rec_dir / REPORT_NAME
    page = parse(path)
    for title in ("Summary", "Input images", "Normals, albedo, depth", "Mesh", "Timings"):
        assert title in page.h2, page.h2
    assert not any("ground truth" in h for h in page.h2)
    check_images(page)
    # 3 inputs, normals, proxy normals, albedo, depth, 2 mesh views
    assert len(page.images) == 9
    alts = [a["alt"] for a in page.images]
    assert "proxy normals (fitted model)" in alts and "mesh, turned 45 deg" in alts
    assert "seconds" in page.th
    assert not [p for p in rec_dir.iterdir() if p.name.startswith(".")], "temporaries left"


def test_report_with_ground_truth(rec_dir, session, tmp_path):
    out = tmp_path / "page.html"
    path = write_report(rec_dir, ground_truth=session / "ground_truth", path=out)
    assert path == out
    page = parse(out)
    assert "Accuracy against the ground truth" in page.h2
    assert "Input images" in page.h2, "the session is the ground truth's parent"
    check_images(page)
    alts = [a["alt"] for a in page.images]
    assert "angular error (deg)" in alts and "proxy: angular error (deg)" in alts
    assert any(a.startswith("depth error") for a in alts)
    for col in ("mean (deg)", "median (deg)", "< 11.25 deg (%)", "< 20 deg (%)",
                "< 30 deg (%)", "coverage (%)", "depth MAE (mm)"):
        assert col in page.th
    text = out.read_text()
    assert "optimisation" in text and "proxy (fitted model)" in text


def test_scores_are_exact_on_the_ground_truth(session, rec_dir):
    gt = load_ground_truth(session / "ground_truth")
    assert gt.region_name.startswith("face region") and gt.region.sum() > 1000
    s = score(gt.normals, gt.depth + 7.0, gt)
    assert s.stats["mean"] < 0.01 and s.stats["coverage"] == pytest.approx(100.0)
    assert s.stats["below_11.25"] == pytest.approx(100.0)
    assert s.stats["depth_mae_mm"] < 1e-3 and s.stats["depth_offset_mm"] == pytest.approx(7.0)
    # a normal flipped about the view axis by 90 degrees scores 90
    n = np.stack([-gt.normals[..., 2], gt.normals[..., 1], gt.normals[..., 0]], -1)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    err = score(n, None, gt)
    assert "depth_mae_mm" not in err.stats
    assert err.stats["below_30"] < 50
    rec = np.load(rec_dir / "normals.npy")
    s = score(rec, np.load(rec_dir / "depth.npy"), gt)
    assert 0 < s.stats["mean"] < 15 and 50 < s.stats["coverage"] <= 100


def test_report_without_session_or_optional_files(rec_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("normals.npy", "mask.png", "report.json"):
        shutil.copy(rec_dir / name, bare / name)
    page = parse(write_report(bare))
    assert "Input images" not in page.h2
    check_images(page)
    text = (bare / REPORT_NAME).read_text()
    assert "session is not known" in text and "mesh.ply is missing" in text
    assert "no depth map" in text


def test_comparison_page(rec_dir, session, tmp_path):
    out = tmp_path / "compare.html"
    write_comparison(out, {"optimisation": rec_dir, "again": rec_dir},
                     ground_truth=session / "ground_truth", proxy_of="optimisation",
                     notes=["the networks were skipped"], comments=["a comment"])
    page = parse(out)
    for title in ("Notes", "Input images", "Methods compared", "Normals and depth",
                  "Albedo and mesh"):
        assert title in page.h2, page.h2
    check_images(page)
    text = out.read_text()
    for row in ("ground truth", "proxy (optimisation)", "again", "the networks were skipped",
                "a comment", "longest stages"):
        assert row in text


def test_bad_input_names_the_file(rec_dir, tmp_path, capsys):
    with pytest.raises(FacepsError, match="no such reconstruction folder"):
        write_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FacepsError, match=r"empty/normals\.npy: missing"):
        write_report(empty)
    (empty / "normals.npy").write_text("not an array")
    with pytest.raises(FacepsError, match=r"normals\.npy: unreadable"):
        write_report(empty)
    np.save(empty / "normals.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(FacepsError, match=r"normals\.npy: expected a float \(H, W, 3\)"):
        write_report(empty)
    with pytest.raises(SessionError, match="no such ground-truth folder"):
        write_report(rec_dir, ground_truth=tmp_path / "no-gt")
    assert not (empty / REPORT_NAME).exists()

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_cli_report(rec_dir, session, capsys):
    assert main(["report", str(rec_dir), "--ground-truth", str(session / "ground_truth")]) == 0
    assert str(rec_dir / REPORT_NAME) in capsys.readouterr().out
    assert "Accuracy against the ground truth" in parse(rec_dir / REPORT_NAME).h2


def test_mesh_views_of_a_plane_and_a_box():
    # a square facing the camera: uniformly lit at the centre, background around it
    V = np.array([[-50, -50, 500], [50, -50, 500], [50, 50, 500], [-50, 50, 500]], float)
    F = np.array([[0, 3, 1], [1, 3, 2]])           # counter-clockwise seen from the camera
    front, turned = mesh_views(V, F, size=(120, 100))
    assert front.shape == (100, 120, 3) and front.dtype == np.uint8
    centre = front[45:55, 55:65, 0].astype(int)
    assert centre.min() > 200 and np.ptp(centre) <= 2
    assert front[2, 2, 0] == front[-3, -3, 0]       # background
    # turned by 45 degrees the square is darker (cos 45 under a headlight) and narrower
    hit = turned[..., 0] != turned[0, 0, 0]
    assert 0 < turned[hit][:, 0].mean() < centre.mean()


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="no headless browser (chromium) installed")
def test_page_renders_in_a_browser(rec_dir, session, tmp_path):
    path = write_report(rec_dir, ground_truth=session / "ground_truth")
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--screenshot={shot}", "--window-size=1400,3000", path.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=180, check=False)
    assert shot.is_file(), "the browser wrote no screenshot"
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (3000, 1400)
    assert img.std() > 20, "blank page"
    # the pictures are drawn: plenty of saturated colour (normal and error maps)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert np.mean(hsv[..., 1] > 100) > 0.02
