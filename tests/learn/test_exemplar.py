"""HFFNE exemplar architecture (faceps.learn.exemplar): configuration checks, the modulated
convolution against a per-sample loop, shapes and camera-facing unit normals at odd sizes,
single-image and exemplar semantics, gradients, the loss terms, over-fitting a tiny batch,
determinism, the registry and state_dict round trips, and two steps of the real trainer."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceps.core.errors import ConfigError, ShapeError
from faceps.datasets.build import build_dataset
from faceps.datasets.torch_data import FaceDataset, collate_samples
from faceps.learn.archs import LossInputs, build_normal_network, normal_config
from faceps.learn.exemplar import (
    LOSS_NAMES,
    ExemplarConfig,
    ExemplarNet,
    FixedFeatureExtractor,
    ModulatedConv2d,
    exemplar_loss,
    exemplar_normals,
    modulated_conv2d,
    perceptual_loss,
)
from faceps.learn.resnet import count_parameters
from tests.tolerances import assert_close

NAME = "exemplar"
#: tiny widths keep the CPU tests fast
TINY = dict(encoder_widths=(4, 8, 8, 16), exemplar_widths=(4, 4, 8), code_dim=8,
            decoder_widths=(8, 8, 4, 4, 4), perceptual_width=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("exemplar") / "d.h5", 4, size=64,
                         seed=0).path


@pytest.fixture(scope="module")
def batch(data):
    ds = FaceDataset(data)
    return collate_samples([ds[i] for i in range(len(ds))])


def tiny(**changes) -> ExemplarNet:
    return ExemplarNet(ExemplarConfig(**{**TINY, **changes}))


def visible(net: ExemplarNet) -> ExemplarNet:
    """The net in eval mode with a larger output layer, so input changes show clearly (an
    untrained one starts near (0, 0, -1) everywhere)."""
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return net.eval()


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def random_normals(B, H, W):
    n = unit(torch.randn(B, 3, H, W))
    return torch.cat([n[:, :2], -n[:, 2:].abs() - 0.2], 1) / 1.0


def inputs_of(images, proxy, proxy_mask, image_mask=None):
    if image_mask is None:
        image_mask = torch.ones(images.shape[:2], dtype=torch.bool)
    return LossInputs(images=images, image_mask=image_mask, proxy_normals=proxy,
                      proxy_mask=proxy_mask)


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("bad", [
    dict(arch="facepsnet"),
    dict(encoder_widths=(4, 8, 8)),
    dict(exemplar_widths=(4, 0, 8)),
    dict(decoder_widths=(8, 8, 4, 4, 2.5)),
    dict(code_dim=0),
    dict(code_dim=True),
    dict(perceptual_width=1.5),
    dict(perceptual_scales=0),
    dict(perceptual_seed="x"),
    dict(perceptual_seed=0.5),
    dict(encoder_widths="4888"),
    dict(code_dim=float("nan")),
    dict(eps="small"),
    dict(encoder_norm="batch"),
    dict(perceptual_target="vgg"),
    dict(negative_slope=1.0),
    dict(demod_eps=0.0),
    dict(eps=float("nan")),
    dict(exemplar_weight=-1.0),
    dict(smooth_l1_beta=float("inf")),
    dict(exemplar_weight=0.0, perceptual_weight=0.0, cosine_weight=0.0),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        ExemplarConfig(**bad)


def test_config_defaults_are_the_papers_and_validate_lists():
    c = ExemplarConfig()
    assert c.arch == NAME and c.encoder_widths == (64, 128, 256, 512)
    assert c.exemplar_weight == 1.0 and c.perceptual_weight == 1.0  # eq. 10, lambda_ref = 1
    assert c.demod_eps == 1e-8 and c.encoder_norm == "group"
    c = ExemplarConfig(encoder_widths=[4, 8, 8, 16.0])
    assert c.encoder_widths == (4, 8, 8, 16) and isinstance(c.encoder_widths[3], int)
    c = ExemplarConfig(perceptual_seed=np.int64(3), code_dim=np.float32(16.0))
    assert type(c.perceptual_seed) is int and type(c.code_dim) is int and c.code_dim == 16
    with pytest.raises(ConfigError, match="unknown exemplar option"):
        normal_config({"arch": NAME, "widths": (8, 16, 32)})


def test_default_network_size():
    net = ExemplarNet()
    n = count_parameters(net)
    # ResNet-18 trunk without its head (11.18 M with GroupNorm) + exemplar encoder + decoder
    assert 12_000_000 < n < 14_000_000, n
    assert count_parameters(net.image_encoder) == 11_176_512
    assert count_parameters(net.perceptual) == 0


# ------------------------------------------------------------------ modulated convolution
def slow_modulated_conv(x, weight, styles, eps):
    outs = []
    for b in range(x.shape[0]):
        w = weight * styles[b][None, :, None, None]
        w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + eps)
        outs.append(F.conv2d(x[b:b + 1], w, padding=weight.shape[-1] // 2))
    return torch.cat(outs)


def test_modulated_conv_matches_a_per_sample_loop_with_gradients():
    x = torch.randn(3, 5, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    styles = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    fast = modulated_conv2d(x, weight, styles, eps=1e-8)
    slow = slow_modulated_conv(x, weight, styles, 1e-8)
    assert fast.shape == (3, 4, 9, 7)
    assert_close(fast, slow, name="modulated conv")
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), (x, weight, styles))
    grads_slow = torch.autograd.grad((slow * g).sum(), (x, weight, styles))
    for a, b, name in zip(grads_fast, grads_slow, ("x", "weight", "styles")):
        assert_close(a, b, name=f"d/d{name}")
    with pytest.raises(ShapeError):
        modulated_conv2d(x, weight, styles[:2])


def test_demodulation_normalises_filters_and_its_epsilon_guards_zero_styles():
    x = torch.randn(2, 6, 8, 8)
    layer = ModulatedConv2d(6, 5, code_dim=3)
    code = torch.randn(2, 3)
    styles = layer.affine(code)
    # scaling a sample's styles does not change its output: the filters are demodulated
    with torch.no_grad():
        a = modulated_conv2d(x, layer.weight, styles)
        b = modulated_conv2d(x, layer.weight, styles * torch.tensor([[3.0], [0.2]]))
        assert_close(a, b, rtol=1e-4, atol=1e-5, name="style scale invariance")
        # a 1x1 conv of a one-hot input returns the demodulated filter: unit norm per output
        w1 = torch.randn(5, 6, 1, 1)
        eye = torch.eye(6).reshape(6, 6, 1, 1)
        rows = modulated_conv2d(eye, w1, torch.ones(6, 6) * 2.0)[:, :, 0, 0]
        assert_close(rows.norm(dim=0), torch.ones(5), rtol=1e-5, atol=1e-5)
        # zero styles: zero weights, finite output thanks to eps
        z = modulated_conv2d(x, layer.weight, torch.zeros_like(styles), eps=1e-8)
        assert torch.isfinite(z).all() and z.abs().max() == 0
        # without demodulation the scale does matter
        c = modulated_conv2d(x, layer.weight, styles * 3.0, demodulate=False)
        assert_close(c, 3.0 * modulated_conv2d(x, layer.weight, styles, demodulate=False),
                     rtol=1e-4, atol=1e-4)
    # the code modulates the output per sample
    out = layer(x[:1].expand(2, -1, -1, -1), code)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("size", [(72, 56), (37, 45), (64, 64)])
def test_output_shapes_unit_and_facing_the_camera(size):
    H, W = size
    net = tiny()
    images = torch.rand(2, 2, 3, H, W) * 5.0
    proxy = random_normals(2, H, W)
    out = net(images, proxy, torch.tensor([[True, True], [False, True]]),
              torch.ones(2, H, W))
    assert out.normals.shape == (2, 3, H, W) and out.normals.dtype == torch.float32
    assert len(out.stages) == 1 and out.stages[0] is out.normals
    assert torch.isfinite(out.normals).all()
    assert_close(out.normals.norm(dim=1), torch.ones(2, H, W), rtol=1e-5, atol=1e-5)
    assert (out.normals[:, 2] < 0).all()
    # a (B, 3, H, W) image and no masks are accepted
    out1 = net(images[:, 1], proxy)
    assert out1.normals.shape == (2, 3, H, W)
    with pytest.raises(ConfigError):
        net(images, proxy, passes=2)
    with pytest.raises(ShapeError):
        net(images, proxy[:, :, :-1])
    with pytest.raises(ShapeError):
        net(images, proxy, torch.tensor([[False, False], [True, True]]))


def test_untrained_output_faces_the_camera():
    out = tiny()(torch.rand(1, 1, 3, 32, 32), random_normals(1, 32, 32))
    assert (out.normals[:, 2] < -0.999).all()  # the output layer starts near zero


def test_single_image_semantics_and_exposure_invariance():
    net = visible(tiny())
    H, W = 40, 48
    images = torch.rand(2, 3, 3, H, W)
    mask = torch.tensor([[False, True, True], [True, False, True]])
    proxy = random_normals(2, H, W)
    with torch.no_grad():
        ref = net(images, proxy, mask).normals
        changed = images.clone()
        changed[0, 0] = torch.rand(3, H, W)  # padded
        changed[0, 2] = torch.rand(3, H, W)  # not the first valid one
        changed[1, 1:] = torch.rand(2, 3, H, W)
        assert_close(net(changed, proxy, mask).normals, ref, name="ignored images")
        # the first valid image is the one read, at any exposure
        only = torch.stack([images[0, 1], images[1, 0]])
        assert_close(net(only * 7.0, proxy).normals, ref, rtol=1e-4, atol=1e-5,
                     name="first valid image, exposure x7")
        changed[0, 1] = torch.rand(3, H, W)
        assert (net(changed, proxy, mask).normals[0] - ref[0]).abs().max() > 1e-3


def test_exemplar_is_the_proxy_where_known_else_facing_the_camera():
    proxy = random_normals(1, 8, 8) * 2.0
    pmask = torch.zeros(1, 8, 8)
    pmask[:, :4] = 1
    r = exemplar_normals(proxy, pmask)
    assert_close(r[:, :, :4], unit(proxy)[:, :, :4])
    assert_close(r[:, :, 4:], torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(
        1, 3, 4, 8))
    # without a mask: known where the proxy is longer than 0.5
    proxy[:, :, 4:] = 0
    assert_close(exemplar_normals(proxy, None), r)


def test_the_proxy_matters_only_where_known():
    net = visible(tiny())
    H, W = 32, 40
    images = torch.rand(2, 1, 3, H, W)
    proxy = random_normals(2, H, W)
    pmask = torch.zeros(2, H, W)
    pmask[:, 8:24, 8:30] = 1
    with torch.no_grad():
        ref = net(images, proxy, None, pmask).normals
        other = proxy.clone()
        other[:, :, pmask[0] == 0] = random_normals(2, H, W)[:, :, pmask[0] == 0]
        assert_close(net(images, other, None, pmask).normals, ref, name="unknown proxy")
        flipped = proxy.clone()
        flipped[:, 0] = -flipped[:, 0]
        assert (net(images, flipped, None, pmask).normals - ref).abs().max() > 1e-3


# ------------------------------------------------------------------ losses
def test_loss_terms_and_their_zeros():
    net = tiny()
    H, W = 32, 32
    images = torch.rand(2, 1, 3, H, W)
    proxy = random_normals(2, H, W)
    pmask = torch.ones(2, H, W)
    gt = random_normals(2, H, W)
    region = torch.zeros(2, H, W)
    region[:, 4:28, 6:26] = 1
    with torch.no_grad():
        out = net(images, proxy, None, pmask)
    total, terms = net.loss(out, gt, region, inputs_of(images, proxy, pmask))
    assert tuple(terms) == net.loss_names == LOSS_NAMES == ("exemplar", "perceptual", "cosine")
    assert all(t.ndim == 0 and torch.isfinite(t) and t > 0 for t in terms.values())
    assert_close(total, sum(terms.values()), rtol=1e-6, name="total with unit weights")
    # with no known proxy the exemplar term is off (0) but still reported
    _, off = net.loss(out, gt, region, inputs_of(images, proxy, torch.zeros(2, H, W)))
    assert float(off["exemplar"]) == 0.0 and float(off["cosine"]) > 0
    # a zero weight skips the term and reports 0; the others are weighted
    net2 = tiny(perceptual_weight=0.0, cosine_weight=2.5)
    total2, terms2 = net2.loss(out, gt, region, inputs_of(images, proxy, pmask))
    assert tuple(terms2) == LOSS_NAMES and float(terms2["perceptual"]) == 0.0
    assert_close(total2, terms2["exemplar"] + 2.5 * terms2["cosine"], rtol=1e-6)
    # the paper's eq. 9 target (the image) gives another perceptual value
    net3 = tiny(perceptual_target="image")
    _, terms3 = net3.loss(out, gt, region, inputs_of(images, proxy, pmask))
    assert float(terms3["perceptual"]) > 0
    assert not math.isclose(float(terms3["perceptual"]), float(terms["perceptual"]))


def test_loss_functions_vanish_at_their_targets():
    n = random_normals(2, 16, 16)
    other = random_normals(2, 16, 16)
    mask = torch.ones(2, 16, 16)
    assert float(exemplar_loss(n, n, mask)) == 0.0
    assert float(exemplar_loss(n, other, mask)) > 0
    assert float(exemplar_loss(n, other, torch.zeros(2, 16, 16))) == 0.0
    d = (n - other)[:, :, 3, 5]
    # smooth-L1 with beta 1 at one pixel: mean over components of 0.5 d^2 (|d| < 1) or |d| - .5
    one = torch.zeros(2, 16, 16)
    one[0, 3, 5] = 1
    expect = torch.where(d[0].abs() < 1, 0.5 * d[0] ** 2, d[0].abs() - 0.5).mean()
    assert_close(exemplar_loss(n, other, one), expect, rtol=1e-5)
    ext = FixedFeatureExtractor(3, 8, scales=3, seed=1)
    assert len(ext(n)) == 3 and ext(n)[2].shape == (2, 8, 4, 4)
    assert float(perceptual_loss(ext, n, n, mask)) == 0.0
    assert float(perceptual_loss(ext, n, other, mask)) > 0
    # only the region counts: changes outside it do not
    region = torch.zeros(2, 16, 16)
    region[:, :8] = 1
    changed = n.clone()
    changed[:, :, 8:] = other[:, :, 8:]
    assert float(perceptual_loss(ext, changed, n, region)) == 0.0


def test_fixed_features_are_buffers_seeded_and_untouched_by_training():
    net = tiny()
    names = {n for n, _ in net.named_parameters()}
    assert not any(n.startswith("perceptual.") for n in names)
    buffers = {n: b.clone() for n, b in net.named_buffers() if n.startswith("perceptual.")}
    assert set(buffers) == {"perceptual.w1", "perceptual.b1", "perceptual.w2", "perceptual.b2"}
    # the seed alone fixes them (not the global RNG)
    torch.manual_seed(123)
    again = tiny()
    for n, b in buffers.items():
        assert torch.equal(again.state_dict()[n], b)
    assert not torch.equal(tiny(perceptual_seed=1).perceptual.w1, buffers["perceptual.w1"])
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    images, proxy = torch.rand(1, 1, 3, 32, 32), random_normals(1, 32, 32)
    gt, ones = random_normals(1, 32, 32), torch.ones(1, 32, 32)
    for _ in range(2):
        total, _ = net.loss(net(images, proxy), gt, ones, inputs_of(images, proxy, ones))
        opt.zero_grad()
        total.backward()
        opt.step()
    for n, b in buffers.items():
        assert torch.equal(net.state_dict()[n], b), n


def test_gradients_reach_every_parameter():
    net = tiny()
    H, W = 40, 36
    images = torch.rand(2, 1, 3, H, W)
    proxy, gt = random_normals(2, H, W), random_normals(2, H, W)
    ones = torch.ones(2, H, W)
    total, _ = net.loss(net(images, proxy, None, ones), gt, ones,
                        inputs_of(images, proxy, ones))
    total.backward()
    missing = [n for n, p in net.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing
    # the exemplar code reaches the decoder through every modulation
    assert net.exemplar_encoder.to_code.weight.grad.abs().sum() > 0
    for block in net.decoder:
        assert block.modulated.affine.weight.grad.abs().sum() > 0


def test_loss_drops_when_overfitting_a_tiny_batch(batch):
    net = tiny()
    images = batch["images"][:2, :, :, :32, :32]
    imask = batch["image_mask"][:2]
    gt = batch["normals"][:2, :, :32, :32]
    region = batch["face_mask"][:2, :32, :32].float()
    proxy = batch["proxy_normals"][:2, :, :32, :32]
    pmask = batch["proxy_mask"][:2, :32, :32].float()
    assert region.sum() > 100
    inputs = inputs_of(images, proxy, pmask, imask)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(30):
        total, _ = net.loss(net(images, proxy, imask, pmask), gt, region, inputs)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ determinism, round trips
def test_same_seed_same_weights():
    torch.manual_seed(5)
    a = tiny().state_dict()
    torch.manual_seed(5)
    b = tiny().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(6)
    c = tiny().state_dict()
    assert not torch.equal(a["decoder.0.modulated.weight"], c["decoder.0.modulated.weight"])


def test_registry_and_state_dict_round_trip():
    cfg = normal_config({"arch": NAME, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in TINY.items()}})
    assert isinstance(cfg, ExemplarConfig) and cfg.decoder_widths == TINY["decoder_widths"]
    assert normal_config(cfg.to_dict()) == cfg
    net = build_normal_network(cfg)
    assert isinstance(net, ExemplarNet) and net.config is cfg
    assert net.single_image and net.uses_proxy
    net.eval()
    torch.manual_seed(9)
    other = build_normal_network(cfg)
    other.eval()
    images, proxy = torch.rand(1, 1, 3, 40, 40), random_normals(1, 40, 40)
    with torch.no_grad():
        ref = net(images, proxy).normals
        assert not torch.allclose(other(images, proxy).normals, ref, atol=1e-6)
        other.load_state_dict(net.state_dict())
        assert_close(other(images, proxy).normals, ref, name="after load_state_dict")


# ------------------------------------------------------------------ the real trainer
def test_two_training_steps_through_the_trainer(tmp_path, data):
    from faceps.learn.checkpoint import load_network
    from faceps.learn.train import TrainConfig, train

    cfg = TrainConfig.for_kind("normal", network={"arch": NAME, **TINY}, image_counts=(1,),
                               proxy_source="perturbed", batch_size=2, max_steps=2,
                               log_every=1, checkpoint_every=1, progress=False,
                               tensorboard=False)
    run = tmp_path / "run"
    res = train("normal", cfg, data, val_data=data, out=run)
    assert res.step == 2 and all(np.isfinite(res.losses))
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2
    for r in train_rows:
        for name in LOSS_NAMES:
            assert np.isfinite(float(r[name])) and float(r[name]) > 0, (name, r)
    loaded = load_network(run, kind="normal")
    assert isinstance(loaded.network, ExemplarNet)
    assert loaded.network.config == ExemplarConfig(**TINY)
