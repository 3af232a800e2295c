"""Evaluation: the Table 1 rows (1, 2 and 3 images plus the proxy) with finite, consistent
values, the Table 2 ablation, ProxyNet metrics, written files (eval.json, eval.md, error-map
PNGs), determinism, agreement with a direct computation, and the streaming statistics."""

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from faceps.core.errors import ConfigError
from faceps.datasets.build import build_dataset
from faceps.datasets.torch_data import FaceDataset, collate_samples
from faceps.learn.checkpoint import CheckpointError, load_network
from faceps.learn.evaluate import (
    ABLATION_OURS,
    ABLATION_TRAINED,
    ABLATION_ZEROED,
    ErrorAccumulator,
    evaluate,
    image_subsets,
    subset_name,
)
from faceps.learn.losses import angular_stats, normal_metrics
from faceps.learn.render_layer import EVAL_STREAM, ProxySource
from faceps.learn.train import TrainConfig, train
from faceps.model import load_model

N, SIZE = 6, 64
TABLE1 = ["S1", "S2", "S3", "S1&S2", "S1&S3", "S2&S3", "S1&S2&S3"]
SMALL = {"widths": [8, 16, 32], "normal_widths": [4, 8, 16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("eval") / "test.h5", N, size=SIZE,
                         seed=1).path


def _train(root, data, kind, name, **kw):
    net = {**SMALL, "cascade": 1} if kind == "normal" else {"widths": [8, 16, 32, 64]}
    cfg = TrainConfig.for_kind(kind, network=net, batch_size=2, max_steps=2,
                               progress=False, tensorboard=False, **kw)
    train(kind, cfg, data, out=root / name)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("runs")
    return {"normal": _train(root, data, "normal", "normal"),
            "none": _train(root, data, "normal", "none", proxy_source="none"),
            "proxy": _train(root, data, "proxy", "proxy")}


def test_table1_rows_files_and_maps(tmp_path, runs, data):
    res = evaluate(runs["normal"], data, out_dir=tmp_path / "ev", n_maps=2, device="cpu")
    assert res.kind == "normal" and res.n_samples == N
    assert list(res.rows) == TABLE1 + ["S*", "proxy"]
    for name, r in res.rows.items():
        assert np.isfinite([r["mean_deg"], r["median_deg"], r["rmse_deg"]]).all(), name
        assert r["std_deg"] ** 2 == pytest.approx(r["rmse_deg"] ** 2 - r["mean_deg"] ** 2,
                                                  rel=1e-6, abs=1e-9), name
        below = [r[f"below_{t}_pct"] for t in ("11.25", "20", "25", "30")]
        assert all(0 <= b <= 100 for b in below) and below == sorted(below), name
        assert r["n_pixels"] > 0 and r["n_samples"] == (3 * N if name == "S*" else N)
    # the same pixels in every row; the pooled single-image row has the three S rows'
    singles = [res.rows[k] for k in ("S1", "S2", "S3")]
    assert len({r["n_pixels"] for k, r in res.rows.items() if k != "S*"}) == 1
    assert res.rows["S*"]["n_pixels"] == 3 * singles[0]["n_pixels"]
    assert res.rows["S*"]["mean_deg"] == pytest.approx(
        np.mean([r["mean_deg"] for r in singles]), rel=1e-5)
    assert res.settings["parameters"] > 0
    # a cascade: every stage scored over all rows; the last stage is the rows' output
    T = load_network(runs["normal"], kind="normal").network.config.cascade
    assert T > 0 and list(res.stages) == [f"stage{t}" for t in range(T + 1)]
    rows = [res.rows[k] for k in TABLE1]
    last = res.stages[f"stage{T}"]
    assert last["n_pixels"] == sum(r["n_pixels"] for r in rows)
    assert last["mean_deg"] == pytest.approx(
        sum(r["mean_deg"] * r["n_pixels"] for r in rows) / last["n_pixels"], rel=1e-5)

    md = res.table_markdown()
    assert "| S1&S2&S3 |" in md and "| proxy |" in md and "mean (deg)" in md
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["format"] == "faceps.eval/1" and list(doc["rows"]) == list(res.rows)
    assert (tmp_path / "ev" / "eval.md").read_text() == md
    assert len(res.maps) == 2
    for p in res.maps:
        img = cv2.imread(p)
        assert img is not None and img.ndim == 3 and img.shape[0] >= 2 * SIZE


def test_rows_match_a_direct_computation_and_are_deterministic(runs, data):
    res = evaluate(runs["normal"], data, write=False, n_images=(3,), seed=4)
    assert list(res.rows) == ["S1&S2&S3", "proxy"]
    again = evaluate(runs["normal"], data, write=False, n_images=(3,), seed=4)
    assert again.rows == res.rows

    model = load_model("builtin")
    net = load_network(runs["normal"]).network
    ds = FaceDataset(data)
    b = collate_samples([ds[i] for i in range(len(ds))])
    p = ProxySource("perturbed", model, seed=4)(b, stream=EVAL_STREAM)
    region = b["face_mask"] * p.mask
    with torch.no_grad():
        out = net(b["images"], p.normals, b["image_mask"], p.mask)
    direct = normal_metrics(out.normals, b["normals"], region)
    assert res.rows["S1&S2&S3"]["mean_deg"] == pytest.approx(direct.mean, rel=1e-5)
    assert res.rows["S1&S2&S3"]["median_deg"] == pytest.approx(direct.median, abs=0.01)
    proxy = normal_metrics(p.normals, b["normals"], region)
    assert res.rows["proxy"]["mean_deg"] == pytest.approx(proxy.mean, rel=1e-5)

    # two passes: the second with the first's estimate as the proxy input
    two = evaluate(runs["normal"], data, write=False, n_images=(3,), seed=4, passes=2)
    with torch.no_grad():
        out2 = net(b["images"], out.normals, b["image_mask"], p.mask)
    direct2 = normal_metrics(out2.normals, b["normals"], region)
    assert two.rows["S1&S2&S3"]["mean_deg"] == pytest.approx(direct2.mean, rel=1e-5)
    assert two.settings["passes"] == 2 and res.settings["passes"] == 1
    assert "2 passes" in two.table_markdown() and "passes" not in res.table_markdown()
    with pytest.raises(ConfigError, match="passes"):
        evaluate(runs["normal"], data, write=False, passes=0)


def test_table2_ablation(runs, data):
    res = evaluate(runs["normal"], data, write=False, ablation_no_proxy=True,
                   no_proxy_run=runs["none"], n_images=(1, 3))
    assert list(res.rows) == ["S1", "S2", "S3", "S1&S2&S3", "S*", "proxy"]
    assert set(res.ablation) == {"1", "3"}
    for count, cols in res.ablation.items():
        assert list(cols) == [ABLATION_ZEROED, ABLATION_TRAINED, ABLATION_OURS]
        assert np.isfinite(list(cols.values())).all(), count
    assert res.ablation["3"][ABLATION_OURS] == pytest.approx(res.rows["S1&S2&S3"]["mean_deg"])
    assert "w/o proxy (zeroed input)" in res.table_markdown()
    # a run trained without proxy is evaluated with zeros as its proxy input
    none = evaluate(runs["none"], data, write=False, n_images=(3,))
    assert none.settings["proxy_input"] == "zeros"
    assert none.rows["S1&S2&S3"]["mean_deg"] == pytest.approx(
        res.ablation["3"][ABLATION_TRAINED], rel=1e-6)


def test_proxynet_evaluation(tmp_path, runs, data):
    res = evaluate(runs["proxy"], data, out_dir=tmp_path / "ev", n_maps=1)
    assert res.kind == "proxy" and list(res.rows) == TABLE1
    for r in res.rows.values():
        for key in ("vertex_mm", "vertex_median_mm", "landmark_px", "normal_mean_deg"):
            assert np.isfinite(r[key]) and r[key] > 0, key
    assert "vertex mean (mm)" in res.table_markdown()
    assert len(res.maps) == 1 and cv2.imread(res.maps[0]) is not None
    with pytest.raises(ConfigError, match="NormalNet"):
        evaluate(runs["proxy"], data, write=False, ablation_no_proxy=True)


def test_proxynet_as_proxy_source(runs, data, tmp_path):
    """A NormalNet trained and evaluated on a ProxyNet's proxy."""
    spec = f"proxynet:{runs['proxy']}"
    run = _train(tmp_path, data, "normal", "on-proxynet", proxy_source=spec)
    assert TrainConfig.load(run).proxy_source == spec
    res = evaluate(runs["normal"], data, write=False, n_images=(1,), proxy=spec)
    assert res.settings["proxy_source"] == spec
    assert np.isfinite(res.rows["proxy"]["mean_deg"])


def test_a_self_fed_network_runs_two_passes_except_over_the_files_proxy(runs, data,
                                                                          tmp_path):
    w = torch.load(runs["normal"] / "weights.pt", weights_only=True)
    w["config"]["self_feed"] = 0.5
    fed = tmp_path / "fed.pt"
    torch.save(w, fed)
    perturbed = evaluate(fed, data, write=False, n_images=(3,), seed=4)
    assert perturbed.settings["passes"] == 2
    explicit = evaluate(runs["normal"], data, write=False, n_images=(3,), seed=4, passes=2)
    assert perturbed.rows == explicit.rows
    assert evaluate(fed, data, write=False, n_images=(3,), proxy="dataset"
                    ).settings["passes"] == 1


def test_evaluation_errors(runs, data, tmp_path):
    with pytest.raises(ConfigError, match="image counts"):
        evaluate(runs["normal"], data, write=False, n_images=(4,))
    with pytest.raises(CheckpointError, match="morphable model"):
        evaluate(runs["normal"], data, write=False, model=load_model().truncated(n_id=10))
    with pytest.raises(CheckpointError, match="no such"):
        evaluate(tmp_path / "missing", data, write=False)
    with pytest.raises(ConfigError, match="proxy_source='none'"):
        evaluate(runs["normal"], data, write=False, no_proxy_run=runs["normal"])
    from faceps.core.errors import DatasetError
    from faceps.datasets.torch_data import write_split

    empty = write_split(data, tmp_path / "split", (1.0, 0.0, 0.0)).files["test"]
    with pytest.raises(DatasetError, match="no samples"):
        evaluate(runs["normal"], empty, write=False)


def test_normalnet_on_faces_of_another_model(runs, tmp_path):
    """Data of another morphable model (here the built-in one under another name): a
    NormalNet takes its faces with the file's proxy normals or a ProxyNet's proxy, a
    ProxyNet is scored without the vertex error; the perturbed proxy, which needs the
    data's coefficients in the run's model, refuses it, naming the way out."""
    other = dataclasses.replace(load_model(), name="another-model")
    data = build_dataset(tmp_path / "other.h5", 3, size=SIZE, seed=2, model=other).path
    default = evaluate(runs["normal"], data, write=False, n_images=(1, 3))
    assert default.settings["proxy_source"] == "dataset"
    assert default.settings["data_model"] == "another-model"
    assert "another-model" in default.settings["notes"][0]
    assert "Note: the data's faces are of morphable model 'another-model'" in \
        default.table_markdown()
    explicit = evaluate(runs["normal"], data, write=False, n_images=(1, 3), proxy="dataset")
    assert explicit.rows == default.rows and explicit.settings["notes"] == []
    for r in default.rows.values():
        assert np.isfinite(r["mean_deg"]) and r["n_pixels"] > 0
    spec = f"proxynet:{runs['proxy']}"
    via_proxynet = evaluate(runs["normal"], data, write=False, n_images=(3,), proxy=spec)
    assert via_proxynet.settings["proxy_source"] == spec
    assert np.isfinite(via_proxynet.rows["proxy"]["mean_deg"])
    with pytest.raises(ConfigError, match="--proxy dataset"):
        evaluate(runs["normal"], data, write=False, proxy="perturbed")
    # a ProxyNet: landmarks and proxy normals, no vertex error (no vertex correspondence)
    res = evaluate(runs["proxy"], data, out_dir=tmp_path / "ev-proxy", n_images=(1, 3))
    for r in res.rows.values():
        assert np.isnan(r["vertex_mm"]) and np.isnan(r["vertex_median_mm"])
        assert np.isfinite(r["landmark_px"]) and np.isfinite(r["normal_mean_deg"])
    assert "no vertex error" in res.settings["notes"][0]
    doc = json.loads((tmp_path / "ev-proxy" / "eval.json").read_text())
    assert doc["rows"]["S1&S2&S3"]["vertex_mm"] is None
    assert "| S1&S2&S3 | - | - |" in (tmp_path / "ev-proxy" / "eval.md").read_text()


def test_subsets_and_accumulator():
    assert [subset_name(s) for s in image_subsets(3)] == TABLE1
    assert image_subsets(3, (2,)) == [(0, 1), (0, 2), (1, 2)]
    assert image_subsets(8, (4,)) == [(0, 1, 2, 3)]     # 70 combinations: first lights only
    rng = np.random.default_rng(0)
    e = rng.gamma(2.0, 5.0, size=10001)
    acc = ErrorAccumulator()
    for part in np.array_split(e, 7):
        acc.add(torch.from_numpy(part))
    acc.add(torch.tensor([float("nan")]))
    got, ref = acc.stats(), angular_stats(e)
    assert got.n == ref.n and got.mean == pytest.approx(ref.mean, rel=1e-12)
    assert got.rmse == pytest.approx(ref.rmse, rel=1e-12) and got.below == ref.below
    assert abs(got.median - ref.median) <= 0.005 + 1e-9
