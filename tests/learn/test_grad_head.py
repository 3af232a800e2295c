"""The WLS paper's gradient-magnitude map W: its target from a depth map, the NormalNet head
that predicts it, and its training term."""

import csv

import numpy as np
import pytest
import torch

from faceps.core.errors import ConfigError
from faceps.datasets.build import build_dataset
from faceps.learn.losses import depth_gradient_magnitude, gradient_magnitude_loss
from faceps.learn.normalnet import NormalNet, NormalNetConfig
from faceps.learn.train import TrainConfig, train

F, CX, CY, Z0 = 500.0, 31.5, 23.5, 400.0


def plane_depth(slope: float, H: int = 48, W: int = 64) -> torch.Tensor:
    """Depth of the plane Z = Z0 + slope * X seen by a pinhole camera (f = F)."""
    u = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    return Z0 / (1 - slope * (u - CX) / F)


def K() -> torch.Tensor:
    return torch.tensor([[[F, 0, CX], [0, F, CY], [0, 0, 1]]], dtype=torch.float64)


@pytest.mark.parametrize("slope", [0.0, 0.5, 2.0])
def test_gradient_magnitude_of_a_plane_is_its_slope(slope):
    """W = f |grad z| / z: at the principal point of the plane Z = Z0 + s X it is s."""
    z = plane_depth(slope)[None]
    w, known = depth_gradient_magnitude(z, K(), torch.ones_like(z))
    assert bool(known[0, 1:-1, 1:-1].all())
    assert float(w[0, 24, 32]) == pytest.approx(slope * float(z[0, 24, 32]) / Z0, rel=2e-3)


def test_gradient_magnitude_marks_discontinuities_and_holes():
    """A depth step gives a large W; pixels without a known neighbour on an axis are not
    known; an isolated pixel gives nothing."""
    z = torch.full((1, 20, 20), 400.0, dtype=torch.float64)
    z[:, :, 10:] = 440.0
    mask = torch.ones_like(z)
    mask[:, 5, 5] = 0                     # a hole: its neighbours go one-sided
    w, known = depth_gradient_magnitude(z, K(), mask)
    assert float(w[0, 12, 9]) > 20 and float(w[0, 12, 3]) == 0.0
    assert not bool(known[0, 5, 5]) and bool(known[0, 5, 4])
    lone = torch.zeros_like(z)
    lone[:, 10, 10] = 1
    w2, known2 = depth_gradient_magnitude(z, K(), lone)
    assert not bool(known2.any()) and float(w2.abs().sum()) == 0.0


def test_gradient_magnitude_loss_is_zero_at_the_target():
    z = plane_depth(1.0)[None]
    m = torch.ones_like(z)
    target, _ = depth_gradient_magnitude(z, K(), m)
    assert float(gradient_magnitude_loss(target[:, None], z, K(), m)) == pytest.approx(0.0)
    assert float(gradient_magnitude_loss(target[:, None] + 1.0, z, K(), m)) > 0.3


def test_head_output_and_config():
    torch.manual_seed(0)
    net = NormalNet(NormalNetConfig(widths=(8, 16, 32), normal_widths=(4, 8, 16),
                                    grad_head=True))
    out = net(torch.rand(2, 2, 3, 30, 22), torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1)
              .expand(2, 3, 30, 22).contiguous())
    w = out.aux["grad_magnitude"]
    assert w.shape == (2, 1, 30, 22) and bool((w >= 0).all())
    assert net.extra_fields == ("depth", "K")
    plain = NormalNet(NormalNetConfig(widths=(8, 16, 32), normal_widths=(4, 8, 16)))
    assert plain.extra_fields == () and not plain(torch.rand(1, 3, 8, 8),
                                                  torch.zeros(1, 3, 8, 8)).aux
    with pytest.raises(ConfigError, match="grad_weight"):
        NormalNetConfig(grad_head=True, grad_weight=-1.0)


def test_two_step_run_trains_the_head(tmp_path):
    data = build_dataset(tmp_path / "d.h5", 4, size=48, seed=0).path
    cfg = TrainConfig.for_kind(
        "normal", network={"widths": [8, 16, 32], "normal_widths": [4, 8, 16],
                           "grad_head": True},
        batch_size=2, max_steps=2, log_every=1, checkpoint_every=1, progress=False,
        tensorboard=False)
    res = train("normal", cfg, data, val_data=data, out=tmp_path / "run")
    assert res.step == 2 and np.all(np.isfinite(res.losses))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert all(float(r["grad"]) > 0 for r in rows)


def test_init_weights_into_a_network_with_a_new_head(tmp_path):
    """init_weights from a run without the head: every stored weight is taken, the head
    keeps its initial values; a network that differs otherwise is refused."""
    from faceps.learn.checkpoint import CheckpointError, load_network

    data = build_dataset(tmp_path / "d.h5", 2, size=32, seed=0).path
    small = {"widths": [8, 16, 32], "normal_widths": [4, 8, 16]}
    base = dict(batch_size=2, max_steps=1, log_every=1, checkpoint_every=1, progress=False,
                tensorboard=False)
    train("normal", TrainConfig.for_kind("normal", network=small, **base), data,
          out=tmp_path / "plain")
    cfg = TrainConfig.for_kind("normal", network={**small, "grad_head": True},
                               init_weights=str(tmp_path / "plain"), lr=1e-12, **base)
    train("normal", cfg, data, out=tmp_path / "head")
    a = load_network(tmp_path / "plain", kind="normal").network.state_dict()
    b = load_network(tmp_path / "head", kind="normal").network.state_dict()
    assert set(b) - set(a) and all(k.startswith("grad_head.") for k in set(b) - set(a))
    for k in a:   # lr 1e-12: the copied weights are unchanged after one step
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-9)
    wider = TrainConfig.for_kind("normal", network={"widths": [8, 16, 48],
                                                    "normal_widths": [4, 8, 16]},
                                 init_weights=str(tmp_path / "plain"), **base)
    with pytest.raises(CheckpointError, match="architecture differs"):
        train("normal", wider, data, out=tmp_path / "wider")
