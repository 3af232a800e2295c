"""ResNet-18, ProxyNet, NormalNet and the losses: reference parameter count and shapes,
order-agnostic 1..3-image input, unit normals, losses zero at the ground truth and positive
otherwise, gradients reaching every part, and a few training steps on real batches."""

import math

import numpy as np
import pytest
import torch

from faceps.core.errors import ConfigError, ShapeError
from faceps.datasets.build import build_dataset
from faceps.datasets.torch_data import FaceDataset, collate_samples
from faceps.learn import (
    NormalNet,
    NormalNetConfig,
    ProxyLossConfig,
    ProxyNet,
    ProxyNetConfig,
    ResNetConfig,
    angular_error_deg,
    angular_stats,
    camera_vertices,
    cascade_normal_loss,
    coefficient_regularization,
    count_parameters,
    geometry_loss,
    landmark_loss,
    landmark_points,
    normal_loss,
    normal_metrics,
    per_sample_mean_error,
    proxy_loss,
    resnet18,
    translation_from_raw,
    translation_to_raw,
    vertices_from_params,
)
from faceps.learn.normalnet import default_passes
from faceps.learn.resnet import ResNet
from faceps.model import load_model
from tests.tolerances import assert_close

SIZE = 32
#: small widths keep the CPU tests fast; the default config is checked for its size
SMALL = dict(widths=(8, 16, 32), normal_widths=(4, 8, 16))


@pytest.fixture(scope="module")
def model():
    return load_model("builtin")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("networks") / "data.h5"
    build_dataset(out, 4, size=SIZE, seed=1, shard_size=4)
    ds = FaceDataset(out)
    return collate_samples([ds[i] for i in range(len(ds))])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def unit(x, dim=1):
    return x / x.norm(dim=dim, keepdim=True)


# ------------------------------------------------------------------ ResNet-18
def test_resnet18_matches_the_reference_size_and_shapes():
    net = resnet18()
    assert count_parameters(net) == 11_689_512  # torchvision's resnet18: 11.69 M
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    logits, feats = net(x, return_features=True)
    assert logits.shape == (2, 1000)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 64, 16, 16),
                                                (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert net.feature_channels == (64, 64, 128, 256, 512)
    headless = ResNet(ResNetConfig(in_channels=7, num_classes=None, norm="group"))
    assert headless(torch.randn(1, 7, 40, 56)).shape == (1, 512)
    # GroupNorm has as many parameters as BatchNorm; 4 more input channels add 4*64*49
    assert count_parameters(headless) == 11_689_512 - 513_000 + 4 * 64 * 49
    with pytest.raises(ShapeError):
        net(torch.randn(1, 4, 32, 32))
    with pytest.raises(ConfigError):
        ResNetConfig(norm="layer")


# ------------------------------------------------------------------ ProxyNet
def test_translation_parametrisation_round_trip():
    K = torch.tensor([[[180.0, 0.5, 30.0], [0.0, 182.0, 33.0], [0, 0, 1]]]).expand(3, 3, 3)
    t = torch.tensor([[10.0, -40.0, 650.0], [-25.0, 5.0, 540.0], [0.0, 0.0, 720.0]])
    raw = translation_to_raw(t, K, (64, 64))
    assert_close(translation_from_raw(raw, K, (64, 64)), t, rtol=1e-5, atol=1e-3,
                 name="t")
    # zero output: centred at the nominal depth (225 mm wide crop)
    t0 = translation_from_raw(torch.zeros(1, 3), K[:1], (64, 64))
    assert float(t0[0, 2]) == pytest.approx(225.0 * 180.0 / 64)
    uv = t0[0, :2] / t0[0, 2] * torch.tensor([180.0, 182.0]) + torch.tensor([30.0, 33.0])
    uv[0] += 0.5 * t0[0, 1] / t0[0, 2]
    assert_close(uv, torch.tensor([31.5, 31.5]), atol=1e-4, name="centre")


def test_proxynet_forward_order_agnostic_and_gradients(model, batch):
    cfg = ProxyNetConfig.for_model(model, widths=(16, 32, 64, 128))
    net = ProxyNet(cfg)
    net.eval()
    images, K = batch["images"], batch["K"]
    out = net(images, K)
    B = images.shape[0]
    assert out.alpha_id.shape == (B, model.n_id) and out.alpha_exp.shape == (B, model.n_exp)
    assert out.angles.shape == (B, 3) and out.translation.shape == (B, 3)
    assert out.pose.shape == (B, 6)
    # about the nominal depth at initialisation
    assert torch.all((out.translation[:, 2] > 300) & (out.translation[:, 2] < 1500))
    perm = net(images[:, [2, 0, 1]], K)
    assert_close(perm.pose, out.pose, rtol=1e-4, atol=1e-4, name="permuted pose")
    # a padded image is ignored
    padded = torch.cat([images[:, :1], torch.rand_like(images[:, :1])], 1)
    mask = torch.tensor([[True, False]] * B)
    assert_close(net(padded, K, mask).pose, net(images[:, :1], K).pose, atol=1e-5,
                 name="padded")
    verts = out.vertices(model)
    assert verts.shape == (B, model.n_vertices, 3)

    net.train()
    o = net(images[:, :2], K)
    gt = vertices_from_params(model, batch["params"])
    loss = proxy_loss(model, o.vertices(model), gt, K, batch["landmarks"],
                      batch["landmark_mask"], (o.alpha_id, o.alpha_exp)).total
    loss.backward()
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0


def test_proxy_losses_zero_at_ground_truth(model, batch):
    p = batch["params"]
    gt = vertices_from_params(model, p)
    K, lm, lm_mask = batch["K"], batch["landmarks"], batch["landmark_mask"]
    cfg = ProxyLossConfig(w_reg=0.0)
    at_gt = proxy_loss(model, gt, gt, K, lm, lm_mask, config=cfg)
    assert float(at_gt.geometry) == 0.0
    assert float(at_gt.landmarks) < 1e-6  # the data's landmarks are projections (px^2)
    assert float(at_gt.total) < 1e-6

    angles = p["pose"][:, :3].clone().requires_grad_(True)
    t = (p["pose"][:, 3:] + torch.tensor([3.0, -2.0, 10.0])).requires_grad_(True)
    pred = camera_vertices(model, p["id"], p["exp"], angles, t)
    off = proxy_loss(model, pred, gt, K, lm, lm_mask, (p["id"], p["exp"]),
                     ProxyLossConfig(w_reg=0.01))
    terms = off.items()
    assert terms["geometry"] == pytest.approx(9 + 4 + 100, rel=1e-3)
    assert terms["landmarks"] > 0.01 and terms["regularization"] > 0
    off.total.backward()
    assert t.grad.abs().min() > 0 and angles.grad.abs().sum() > 0
    assert set(terms) == {"total", "geometry", "landmarks", "regularization"}

    # the pieces alone
    assert float(geometry_loss(gt, gt + 2.0)) == pytest.approx(12.0)
    w = torch.zeros(model.n_vertices)
    w[:10] = 1
    assert float(geometry_loss(gt, gt + 2.0, w)) == pytest.approx(12.0)
    pts, _ = landmark_points(model, gt)
    assert float(landmark_loss(pts, K, lm, lm_mask)) < 1e-6
    assert float(landmark_loss(pts, K, lm + torch.tensor([3.0, 4.0]), lm_mask)) == \
        pytest.approx(25.0, rel=1e-3)
    assert float(coefficient_regularization(torch.ones(2, 4), 2 * torch.ones(2, 4))) == 2.5


# ------------------------------------------------------------------ NormalNet
def test_default_normalnet_size():
    base = count_parameters(NormalNet())
    cascaded = count_parameters(NormalNet(NormalNetConfig(cascade=2)))
    assert 1e6 < base < 1.5e6 and 1.8e6 < cascaded < 2.3e6
    assert cascaded == count_parameters(NormalNet(NormalNetConfig(cascade=5)))  # shared


@pytest.mark.parametrize("k", [1, 2, 3])
def test_normalnet_order_agnostic_unit_and_gradients(batch, k):
    net = NormalNet(NormalNetConfig(cascade=2, **SMALL))
    images = batch["images"][:2, :k]
    proxy = batch["proxy_normals"][:2]
    out = net(images, proxy)
    assert out.normals.shape == (2, 3, SIZE, SIZE) and len(out.stages) == 3
    for s in out.stages:
        assert_close(s.norm(dim=1), torch.ones(2, SIZE, SIZE), atol=1e-5, name="|n|")
    assert out.normals is out.stages[-1]
    if k > 1:
        flipped = net(images.flip(1), proxy)
        for a, b in zip(flipped.stages, out.stages):
            assert_close(a, b, atol=1e-5, name="permuted")
    # exposure invariance (images are divided by their mean)
    assert_close(net(images * 7.0, proxy).normals, out.normals, atol=1e-5, name="scaled")
    gt, mask = batch["normals"][:2], batch["mask"][:2]
    loss = cascade_normal_loss(out.stages, gt, mask)
    loss.backward()
    for name, part in (("image", net.image_encoder), ("proxy", net.proxy_encoder),
                       ("regressor", net.regressor), ("refine", net.refine_encoder),
                       ("refine decoder", net.refine_decoder)):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, f"no gradient in {name}"


def test_normalnet_ignores_padded_images_and_handles_odd_sizes(batch):
    net = NormalNet(NormalNetConfig(**SMALL))
    images, proxy = batch["images"][:2], batch["proxy_normals"][:2]
    short = net(images[:, :2], proxy).normals
    padded = torch.cat([images[:, :2], 5 * torch.rand_like(images[:, :1])], 1)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert_close(net(padded, proxy, mask).normals, short, atol=1e-5, name="padded")
    # starts near the proxy (small output layer)
    known = batch["proxy_mask"][:2] > 0
    start = angular_error_deg(short, proxy)[known]
    assert float(start.detach().mean()) < 5.0
    odd = net(images[:, :1, :, :30, :27], proxy[:, :, :30, :27])
    assert odd.normals.shape == (2, 3, 30, 27)
    with pytest.raises(ShapeError):
        net(images, proxy[:, :, :16])
    with pytest.raises(ShapeError):
        net(images, proxy, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError):
        net(images, proxy, cascade=1)


def test_normalnet_passes_feed_the_estimate_back_as_the_proxy(batch):
    torch.manual_seed(3)
    net = NormalNet(NormalNetConfig(**SMALL))
    with torch.no_grad():  # a visible residual, so a second pass differs from the first
        for p in net.regressor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, proxy = batch["images"][:2], batch["proxy_normals"][:2]
    pmask = batch["proxy_mask"][:2]
    first = net(images, proxy, None, pmask).normals
    second = net(images, first, None, pmask).normals
    assert_close(net(images, proxy, None, pmask, passes=2).normals, second, atol=1e-6,
                 name="two passes")
    assert float((second - first).abs().max()) > 1e-3
    # without a proxy mask the first pass's validity is kept for the second
    hole = proxy.clone()
    hole[:, :, :8] = 0.0
    kept = (hole.norm(dim=1) > 0.5).float()
    assert_close(net(images, hole, passes=2).normals,
                 net(images, net(images, hole).normals, None, kept).normals, atol=1e-6,
                 name="implicit mask")
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="passes"):
            net(images, proxy, passes=bad)
    assert default_passes({}) == 1 and default_passes(None) == 1
    assert default_passes({"self_feed": 0.5}) == 2 and default_passes({"self_feed": 0}) == 1


def test_a_few_training_steps_reduce_the_normal_loss(batch):
    """Without a proxy (every pixel starts facing the camera) the network must learn the
    normals from the images: 21 Adam steps on one batch, 1-3 images per step."""
    net = NormalNet(NormalNetConfig(**SMALL))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    images, proxy, gt, mask = (batch[k] for k in ("images", "proxy_normals", "normals",
                                                  "mask"))
    no_proxy = torch.zeros_like(batch["proxy_mask"])
    losses = []
    for step in range(21):
        out = net(images[:, :1 + step % 3], proxy, proxy_mask=no_proxy)
        loss = normal_loss(out.normals, gt, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-6:]) < 0.85 * np.mean(losses[:3]), losses


# ------------------------------------------------------------------ losses and metrics
def test_normal_loss_zero_at_ground_truth_and_positive_otherwise(batch):
    gt, mask = batch["normals"], batch["mask"]
    assert float(normal_loss(gt, gt, mask)) < 1e-6
    other = unit(gt + 0.3 * torch.randn_like(gt))
    assert float(normal_loss(other, gt, mask)) > 0.01
    # only the mask counts: outside it anything goes
    flipped = torch.where(mask[:, None] > 0, gt, -gt)
    assert float(normal_loss(flipped, gt, mask)) < 1e-6
    assert float(normal_loss(flipped, gt)) > 0.1
    # opposite normals give 2; an empty mask gives 0
    assert float(normal_loss(-gt, gt, mask)) == pytest.approx(2.0, abs=1e-5)
    assert float(normal_loss(other, gt, torch.zeros_like(mask))) == 0.0
    assert float(cascade_normal_loss([other, gt], gt, mask, [0.5, 1.0])) == pytest.approx(
        0.5 * float(normal_loss(other, gt, mask)), rel=1e-5)
    pred = other.clone().requires_grad_(True)
    normal_loss(pred, gt, mask).backward()
    assert pred.grad.abs().sum() > 0


def test_angular_error_and_metrics():
    x = torch.tensor([1.0, 0.0, 0.0])
    cases = {0.0: x, 90.0: torch.tensor([0.0, 2.0, 0.0]), 180.0: -x,
             45.0: torch.tensor([1.0, 1.0, 0.0]), 1e-3: torch.tensor(
                 [math.cos(math.radians(1e-3)), math.sin(math.radians(1e-3)), 0.0],
                 dtype=torch.float64)}
    for angle, v in cases.items():
        got = angular_error_deg(x.to(v.dtype)[None], v[None], dim=-1)
        assert float(got) == pytest.approx(angle, rel=1e-6, abs=1e-9), angle
    errors = torch.tensor([5.0, 10.0, 15.0, 22.0, 40.0, float("nan")])
    s = angular_stats(errors)
    assert s.n == 5 and s.mean == pytest.approx(18.4) and s.median == 15.0
    assert s.below == {11.25: 40.0, 20.0: 60.0, 25.0: 80.0, 30.0: 80.0}
    assert s.rmse == pytest.approx(math.sqrt((25 + 100 + 225 + 484 + 1600) / 5))
    assert s.to_dict()["below_pct"]["11.25"] == 40.0
    assert angular_stats(torch.tensor([])).n == 0

    gt = unit(torch.randn(2, 3, 8, 8))
    mask = torch.zeros(2, 8, 8)
    mask[0, :4] = 1
    m = normal_metrics(gt, gt, mask)
    assert m.n == 32 and m.mean < 1e-3 and m.below[11.25] == 100.0
    per = per_sample_mean_error(gt, gt, mask)
    assert per[0] < 1e-3 and torch.isnan(per[1])
