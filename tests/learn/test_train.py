"""Training runs: two-step ProxyNet / NormalNet (and cascade) runs and their files, exact
resumption, NaN detection, checkpoint compatibility errors, the render layer and the
perturbed proxy, the learning-rate schedule, and data-parallel training under torchrun."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from faceps.core.errors import ConfigError, FacepsError
from faceps.datasets.build import build_dataset
from faceps.datasets.torch_data import FaceDataset, collate_samples
from faceps.learn.checkpoint import (
    CHECKPOINT_FORMAT,
    WEIGHTS_FORMAT,
    CheckpointError,
    build_network,
    load_file,
    load_network,
    load_state,
    model_fingerprint,
    model_matches,
    model_signature,
    network_config,
)
from faceps.learn.losses import angular_error_deg
from faceps.learn.normalnet import NormalNet
from faceps.learn.render_layer import (
    EVAL_STREAM,
    ProxyNoise,
    ProxySource,
    render_params,
    sample_proxy_noise,
)
from faceps.learn.train import (
    TrainConfig,
    TrainingError,
    lr_factor,
    train,
)
from faceps.model import load_model
from tests.tolerances import assert_close

N, SIZE = 8, 64
REPO = Path(__file__).resolve().parents[2]
#: small widths keep the CPU runs fast
SMALL = {"normal": {"widths": [8, 16, 32], "normal_widths": [4, 8, 16]},
         "proxy": {"widths": [8, 16, 32, 64], "norm": "group"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "data.h5"
    return build_dataset(out, N, size=SIZE, seed=0).path


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


def config(kind, cascade=0, **kw):
    net = dict(SMALL[kind])
    if kind == "normal":
        net["cascade"] = cascade
    base = dict(network=net, batch_size=2, max_steps=2, log_every=1, checkpoint_every=1,
                progress=False, tensorboard=False)
    return TrainConfig.for_kind(kind, **{**base, **kw})


def read_metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("kind,cascade", [("proxy", 0), ("normal", 0), ("normal", 2)])
def test_two_step_run_writes_the_run_files(tmp_path, data, kind, cascade):
    cfg = config(kind, cascade)
    run = tmp_path / "run"
    res = train(kind, cfg, data, val_data=data, out=run)
    assert res.step == 2 and res.finished and len(res.losses) == 2
    assert all(np.isfinite(res.losses))
    for name in ("config.json", "run.json", "metrics.csv", "checkpoint.pt", "weights.pt",
                 "best.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp-*")), "temporary files left behind"

    # the configuration reads back with json, resolved (every network field present)
    saved = TrainConfig.load(run)
    assert saved.kind == kind and saved.batch_size == 2 and saved.max_steps == 2
    assert json.loads((run / "config.json").read_text())["format"] == "faceps.train-config/1"
    resolved = network_config(kind, saved.network, load_model("builtin")).to_dict()
    assert saved.network == json.loads(json.dumps(resolved))

    rows = read_metrics(run)
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"),
                                                       ("2", "val")]
    for r in rows[:2]:
        assert float(r["loss"]) > 0 and float(r["samples_per_s"]) > 0 and float(r["lr"]) > 0
    metric = "vertex_mm" if kind == "proxy" else "mean_deg"
    assert np.isfinite(float(rows[2][metric])) and res.best == pytest.approx(
        float(rows[2][metric]), rel=1e-5)
    if kind == "normal":
        assert {f"stage{i}" for i in range(cascade + 1)} <= set(rows[0])
        # an untrained residual network returns about its proxy input
        assert abs(res.val["mean_deg"] - res.val["proxy_mean_deg"]) < 2.0

    # checkpoint: one file with everything, loadable weights-only
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["format"] == CHECKPOINT_FORMAT and ck["step"] == 2 and ck["kind"] == kind
    assert {"state_dict", "optimizer", "scheduler", "config", "model", "architecture",
            "network_config"} <= set(ck)
    w = torch.load(run / "weights.pt", weights_only=True)
    assert w["format"] == WEIGHTS_FORMAT and "optimizer" not in w
    assert w["config"]["kind"] == kind and isinstance(w["network_config"], dict)
    loaded = load_network(run, kind=kind)
    assert_close(next(iter(loaded.network.state_dict().values())),
                 next(iter(w["state_dict"].values())))
    assert not loaded.network.training


def test_proxy_source_dataset_and_none(tmp_path, data):
    for source in ("dataset", "none"):
        res = train("normal", config("normal", proxy_source=source), data, val_data=data,
                    out=tmp_path / source)
        assert res.step == 2 and all(np.isfinite(res.losses)), source
        assert np.isfinite(res.val["mean_deg"])


@pytest.mark.parametrize("kind", ["normal", "proxy"])
def test_resume_gives_the_same_losses(tmp_path, data, kind):
    """4 batches per epoch: stop after step 3, resume across the epoch boundary to 6."""
    cfg = config(kind, cascade=1 if kind == "normal" else 0, max_steps=6, epochs=2,
                 checkpoint_every=100)
    full = train(kind, cfg, data, out=tmp_path / "full")
    part = train(kind, cfg, data, out=tmp_path / "part", stop_at=3)
    assert part.step == 3 and not part.finished
    rest = train(kind, None, data, out=tmp_path / "part", resume=True)
    assert rest.step == 6 and rest.finished
    assert part.losses + rest.losses == full.losses
    a = [r["loss"] for r in read_metrics(tmp_path / "full")]
    b = [r["loss"] for r in read_metrics(tmp_path / "part")]
    assert a == b
    sa = load_file(tmp_path / "full" / "weights.pt")["state_dict"]
    sb = load_file(tmp_path / "part" / "weights.pt")["state_dict"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_settings(tmp_path, data):
    cfg = config("normal", max_steps=3)
    run = tmp_path / "run"
    train("normal", cfg, data, out=run, stop_at=1)
    with pytest.raises(ConfigError, match="already holds a run"):
        train("normal", cfg, data, out=run)
    with pytest.raises(ConfigError, match="lr"):
        train("normal", cfg.replace(lr=0.5), data, out=run, resume=True)
    # runtime fields may change
    res = train("normal", cfg.replace(log_every=2, checkpoint_every=5), data, out=run,
                resume=True)
    assert res.step == 3
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train("normal", cfg, data, out=tmp_path / "empty", resume=True)


def test_init_weights_warm_start(tmp_path, data, model):
    first = tmp_path / "first"
    train("normal", config("normal", max_steps=2), data, out=first)
    start = load_file(first / "weights.pt")["state_dict"]
    # zero steps of training would be the loaded weights: check through one step at lr ~ 0
    cfg = config("normal", max_steps=1, lr=1e-12, init_weights=str(first))
    res = train("normal", cfg, data, out=tmp_path / "warm")
    assert res.step == 1
    warm = load_file(tmp_path / "warm" / "weights.pt")["state_dict"]
    for k in start:
        assert_close(warm[k], start[k], atol=1e-8)
    cold = load_file(train("normal", config("normal", max_steps=1, lr=1e-12, seed=3), data,
                           out=tmp_path / "cold").weights)["state_dict"]
    assert any(not torch.allclose(cold[k], start[k]) for k in start)
    assert TrainConfig.load(tmp_path / "warm").init_weights == str(first)
    # another architecture or kind is refused with the file named
    other = config("normal", network={"widths": [8, 16, 24], "normal_widths": [4, 8, 16]},
                   init_weights=str(first))
    with pytest.raises(CheckpointError, match="architecture differs"):
        train("normal", other, data, out=tmp_path / "other")
    with pytest.raises(CheckpointError, match="holds a NormalNet"):
        train("proxy", config("proxy", init_weights=str(first)), data,
              out=tmp_path / "proxy")


def test_export_weights_float16(tmp_path, data):
    from faceps.cli import main as cli_main
    from faceps.learn.checkpoint import export_weights

    run = tmp_path / "run"
    train("normal", config("normal", max_steps=2), data, out=run)
    full = export_weights(run, tmp_path / "full.pt")
    half = tmp_path / "half.pt"
    assert cli_main(["export-weights", str(run), "--out", str(half), "--float16"]) == 0
    raw = torch.load(half, weights_only=True)
    assert raw["float16"] and all(v.dtype == torch.float16 for v in raw["state_dict"].values()
                                  if v.is_floating_point())
    assert "optimizer" not in raw and raw["kind"] == "normal"
    a, b = load_network(full, kind="normal"), load_network(half, kind="normal")
    assert next(b.network.parameters()).dtype == torch.float32
    ds = FaceDataset(data)
    batch = collate_samples([ds[i] for i in range(2)])
    with torch.no_grad():
        na = a.network(batch["images"], batch["proxy_normals"], batch["image_mask"]).normals
        nb = b.network(batch["images"], batch["proxy_normals"], batch["image_mask"]).normals
    assert float(angular_error_deg(na, nb).max()) < 0.5
    with pytest.raises(CheckpointError, match="no such"):
        export_weights(tmp_path / "missing.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_non_finite_loss_stops_with_the_step(tmp_path, data):
    cfg = config("proxy", lr=1e30, max_steps=6, schedule="constant")
    with pytest.raises(TrainingError, match=r"non-finite .* step \d") as info:
        train("proxy", cfg, data, out=tmp_path / "run")
    assert isinstance(info.value, FacepsError)


def test_incompatible_checkpoints_give_clear_errors(tmp_path, data, model):
    run = tmp_path / "normal"
    train("normal", config("normal"), data, out=run)
    proxy_run = tmp_path / "proxy"
    train("proxy", config("proxy"), data, out=proxy_run)

    other = config("normal", network={"widths": [8, 16, 24], "normal_widths": [4, 8, 16]})
    with pytest.raises(CheckpointError, match="architecture differs.*widths"):
        train("normal", other, data, out=run, resume=True)
    net = build_network("normal", network_config("normal", {"cascade": 1, **SMALL["normal"]}))
    with pytest.raises(CheckpointError, match="unexpected|missing"):
        load_state(net, load_file(run / "checkpoint.pt"), kind="normal")
    with pytest.raises(CheckpointError, match="holds a NormalNet"):
        load_network(run, kind="proxy")
    with pytest.raises(CheckpointError, match="holds a ProxyNet"):
        train("normal", None, data, out=proxy_run, resume=True)
    with pytest.raises(CheckpointError, match="morphable model"):
        load_network(run, model=model.truncated(n_id=10))
    assert load_file(run / "checkpoint.pt")["model"]["signature"] == model_signature(model)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_file(bad)
    torch.save({"format": "something/1"}, bad)
    with pytest.raises(CheckpointError, match="not a faceps checkpoint"):
        load_file(bad)
    torch.save({"format": WEIGHTS_FORMAT, "obj": ConfigError("x")}, bad)  # needs pickle
    with pytest.raises(CheckpointError, match="not a readable"):
        load_file(bad)


def test_model_signature_tolerates_rounding_not_changes(model):
    """A model rebuilt on another CPU differs in the last bits of some float32 values:
    its exact fingerprint changes, its signature still matches. A flipped basis column,
    a scaled mean or other topology do not match; entries without a signature fall back
    to the fingerprint."""
    from dataclasses import replace

    sig = model_signature(model)
    stored = {"name": model.name, "fingerprint": model_fingerprint(model), "signature": sig}
    assert model_matches(stored, model)
    # the last bit of a tenth of the basis values
    basis = model.id_basis.copy()
    flat = basis.reshape(-1)
    pick = np.random.default_rng(0).random(flat.size) < 0.1
    flat[pick] = np.nextafter(flat[pick], np.float32(np.inf))
    rounded = replace(model, id_basis=basis)
    assert model_fingerprint(rounded) != model_fingerprint(model)
    assert model_matches(stored, rounded)
    assert not model_matches({"fingerprint": stored["fingerprint"]}, rounded)
    flipped = model.id_basis.copy()
    flipped[..., 5] *= -1
    assert not model_matches(stored, replace(model, id_basis=flipped))
    assert not model_matches(stored, replace(model, mean=model.mean * np.float32(1.001)))
    assert not model_matches(stored, model.truncated(n_id=10))
    tris = model.triangles.copy()
    tris[0] = tris[0][::-1]
    assert not model_matches(stored, replace(model, triangles=tris))
    assert model_matches({}, rounded)                   # nothing stored: no check


def test_self_feed_trains_on_the_networks_own_estimates(tmp_path, data, monkeypatch):
    import faceps.learn.train as train_mod

    # which samples are fed their own estimate: per sample, not per batch
    a = train_mod.self_feed_mask(torch.arange(200), 0.5, 0, 3)
    b = train_mod.self_feed_mask(torch.arange(100, 200), 0.5, 0, 3)
    assert torch.equal(a[100:], b) and 70 < int(a.sum()) < 130
    assert not train_mod.self_feed_mask(torch.arange(50), 0.0, 0, 3).any()
    assert not torch.equal(a, train_mod.self_feed_mask(torch.arange(200), 0.5, 0, 4))

    calls = []
    real_forward = NormalNet.forward

    def spy(self, images, proxy_normals, *args, **kw):
        calls.append((images.shape[0], torch.is_grad_enabled(), kw.get("passes", 1)))
        return real_forward(self, images, proxy_normals, *args, **kw)

    monkeypatch.setattr(NormalNet, "forward", spy)
    res = train("normal", config("normal", self_feed=1.0), data, val_data=data,
                out=tmp_path / "fed")
    assert res.step == 2 and all(np.isfinite(res.losses))
    train_calls = [c for c in calls if c[1]]
    first_passes = [c for c in calls if not c[1] and c[2] == 1]
    # every training batch: a first pass without gradient, then the trained pass
    assert len(train_calls) == 2 and len(first_passes) >= 2
    # validation scores the network as it will be used: two passes
    assert any(c[2] == 2 for c in calls if not c[1])
    assert TrainConfig.load(tmp_path / "fed").self_feed == 1.0
    assert load_network(tmp_path / "fed").train_config["self_feed"] == 1.0
    for bad in ({"self_feed": 1.5}, {"self_feed": -0.1}, {"kind": "proxy", "self_feed": 0.5},
                {"self_feed": 0.5, "proxy_source": "none"}):
        with pytest.raises(ConfigError, match="self_feed"):
            TrainConfig(**{**{"kind": "normal"}, **bad})


def test_config_round_trip_and_validation(tmp_path):
    cfg = TrainConfig.for_kind("normal", network={"cascade": 2}, stage_weights=[0.5, 1, 1],
                               image_counts=[1, 3])
    assert cfg.batch_size == 6 and cfg.epochs == 100
    assert TrainConfig.for_kind("proxy").batch_size == 50
    again = TrainConfig.load(cfg.save(tmp_path / "c.json"))
    assert again == cfg and again.image_counts == (1, 3)
    for bad in ({"kind": "depth"}, {"lr": 0.0}, {"batch_size": 0}, {"schedule": "linear"},
                {"proxy_source": "proxynet:"}, {"image_counts": [0]},
                {"proxy_loss": {"w_geo": -1.0}}, {"max_steps": 0}, {"network": {"width": 3}}):
        with pytest.raises(ConfigError):
            TrainConfig(**{**{"kind": "normal"}, **bad})
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"kind": "normal", "learning_rate": 1.0})


def test_lr_schedule():
    cfg = TrainConfig(kind="normal", schedule="cosine", min_lr_ratio=0.1, warmup_steps=2)
    f = [lr_factor(s, cfg, 12, 4) for s in range(13)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    step = TrainConfig(kind="normal", schedule="step", step_epochs=2, step_gamma=0.5)
    assert [lr_factor(s, step, 100, 3) for s in (0, 5, 6, 12)] == [1.0, 1.0, 0.5, 0.25]


# ------------------------------------------------------------------ render layer
@pytest.fixture(scope="module")
def batch(data):
    ds = FaceDataset(data)
    return collate_samples([ds[i] for i in range(len(ds))])


def test_render_layer_reproduces_the_stored_proxy(batch, model):
    r = render_params(model, batch["params"], batch["K"], (SIZE, SIZE))
    assert r.normals.shape == (N, 3, SIZE, SIZE) and r.mask.dtype == torch.float32
    stored = batch["proxy_mask"] > 0
    agree = (r.mask > 0) == stored
    assert float(agree.float().mean()) > 0.999
    both = (r.mask > 0) & stored
    err = angular_error_deg(r.normals, batch["proxy_normals"])[both]
    assert float(err.mean()) < 0.1  # float16 storage


def test_perturbed_proxy_error_range_and_determinism(batch, model):
    gt, face = batch["normals"], batch["face_mask"] > 0
    stored = angular_error_deg(batch["proxy_normals"], gt)[face & (batch["proxy_mask"] > 0)]
    assert float(stored.mean()) < 2.0  # the stored proxy is almost the ground truth
    errors = []
    for seed in range(3):
        src = ProxySource("perturbed", model, seed=seed)
        p = src(batch, stream=EVAL_STREAM)
        errors.append(float(angular_error_deg(p.normals, gt)[face & (p.mask > 0)].mean()))
    assert all(6.0 < e < 10.0 for e in errors), errors      # a fitted proxy's error range

    a = ProxySource("perturbed", model, seed=1)(batch, stream=3)
    b = ProxySource("perturbed", model, seed=1)(batch, stream=3)
    c = ProxySource("perturbed", model, seed=1)(batch, stream=4)
    assert torch.equal(a.normals, b.normals) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.normals, c.normals)
    # the noise of a sample does not depend on the batch it is in
    n1 = sample_proxy_noise(ProxyNoise(), [5, 2], 4, 3, seed=1, stream=3)
    n2 = sample_proxy_noise(ProxyNoise(), [2], 4, 3, seed=1, stream=3)
    assert torch.equal(n1["pose"][1], n2["pose"][0]) and torch.equal(n1["id"][1], n2["id"][0])
    # more noise, more error
    big = ProxySource("perturbed", model, noise=ProxyNoise().scaled(2.0), seed=0)(batch)
    assert float(angular_error_deg(big.normals, gt)[face & (big.mask > 0)].mean()) > errors[0]


def test_proxy_noise_scale_range(batch, model):
    gt, face = batch["normals"], batch["face_mask"] > 0
    base = ProxyNoise()
    fixed = sample_proxy_noise(base, range(N), 4, 3, seed=2, stream=5)
    ranged = sample_proxy_noise(base.with_range((0.0, 3.0)), range(N), 4, 3, seed=2,
                                stream=5)
    # each sample's offsets are its fixed-level offsets times one factor in the range
    for i in range(N):
        f = float(ranged["id"][i, 0] / fixed["id"][i, 0])
        assert 0.0 <= f <= 3.0
        for key in ("id", "exp", "pose"):
            assert_close(ranged[key][i], fixed[key][i] * f, rtol=1e-4, atol=1e-6)
    factors = {round(float(ranged["id"][i, 0] / fixed["id"][i, 0]), 4) for i in range(N)}
    assert len(factors) == N                 # one draw per sample
    # a degenerate range reproduces the scaled levels
    one = sample_proxy_noise(base.with_range((2.0, 2.0)), [1, 4], 4, 3, seed=2, stream=5)
    two = sample_proxy_noise(base.scaled(2.0), [1, 4], 4, 3, seed=2, stream=5)
    for key in one:
        assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
    errs = [float(angular_error_deg(p.normals, gt)[face & (p.mask > 0)].mean()) for p in (
        ProxySource("perturbed", model, noise=base.with_range(r), seed=0)(batch)
        for r in ((0.1, 0.2), (2.5, 3.0)))]
    assert errs[0] < errs[1]
    # round trip through the run configuration, and bad ranges
    cfg = TrainConfig(kind="normal", proxy_noise=base.with_range((0.5, 2.5)))
    assert TrainConfig.from_dict(cfg.to_dict()).proxy_noise.scale_range == (0.5, 2.5)
    for bad in ((2.0, 1.0), (-1.0, 1.0), (0.0, float("nan")), "x"):
        with pytest.raises(ConfigError, match="scale_range"):
            base.with_range(bad)


# ------------------------------------------------------------------ data parallel
def test_torchrun_two_processes(tmp_path, data):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "faceps.learn.train", "--kind", "normal",
           "--data", str(data), "--out", str(run), "--max-steps", "3", "--batch-size", "2",
           "--network", json.dumps(SMALL["normal"]), "--no-progress", "--threads", "1",
           "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0/2:" in proc.stdout and "rank 1/2:" in proc.stdout, proc.stdout
    ck = load_file(run / "checkpoint.pt")
    assert ck["step"] == 3 and ck["world_size"] == 2
    assert [r["step"] for r in read_metrics(run)] == ["1", "2", "3"]
    assert (run / "weights.pt").is_file()


def test_leave_process_skips_teardown_only_when_data_parallel(monkeypatch):
    from faceps.learn import train as train_mod

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def flush(self):
            events.append(f"flush {self.name}")

    monkeypatch.setattr(train_mod.sys, "stdout", Stream("stdout"))
    monkeypatch.setattr(train_mod.sys, "stderr", Stream("stderr"))
    monkeypatch.setattr(train_mod.os, "_exit", lambda code: events.append(f"exit {code}"))
    assert train_mod.leave_process(1) == 0 and events == []
    train_mod.leave_process(2)
    assert events[-1] == "exit 0" and {"flush stdout", "flush stderr"} <= set(events[:-1])


def test_command_line_options(tmp_path, data):
    import argparse

    from faceps.learn.train import add_arguments, config_from_args, run_from_args

    parser = add_arguments(argparse.ArgumentParser())
    run = tmp_path / "run"
    args = parser.parse_args(["--kind", "normal", "--data", str(data), "--out", str(run),
                              "--max-steps", "2", "--batch-size", "2", "--cascade", "1",
                              "--network", json.dumps(SMALL["normal"]), "--no-progress",
                              "--image-counts", "1,3", "--no-augment", "--stop-at", "1"])
    cfg = config_from_args(args)
    assert cfg.network["cascade"] == 1 and cfg.network["widths"] == [8, 16, 32]
    assert cfg.image_counts == (1, 3) and cfg.augment is None and cfg.max_steps == 2
    ranged = config_from_args(parser.parse_args(
        ["--kind", "normal", "--data", str(data), "--out", str(run), "--proxy-noise-scale",
         "2", "--proxy-noise-range", "0.5,1.5", "--init-weights", "somewhere"]))
    assert ranged.proxy_noise.scale_range == (0.5, 1.5)
    assert ranged.proxy_noise.id_std == pytest.approx(0.7)
    assert ranged.init_weights == "somewhere"
    with pytest.raises(ConfigError, match="proxy-noise-range"):
        config_from_args(parser.parse_args(["--kind", "normal", "--data", str(data), "--out",
                                            str(run), "--proxy-noise-range", "1"]))
    assert run_from_args(args).step == 1
    # resuming: no --kind needed, the saved configuration is used (runtime changes allowed)
    again = parser.parse_args(["--data", str(data), "--out", str(run), "--resume"])
    assert config_from_args(again) is None
    res = run_from_args(again)
    assert res.step == 2 and res.kind == "normal"
    more = parser.parse_args(["--data", str(data), "--out", str(run), "--resume",
                              "--max-steps", "3"])
    assert config_from_args(more).max_steps == 3 and run_from_args(more).step == 3
