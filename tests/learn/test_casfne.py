"""Cas-FNE (``casfne`` architecture): configuration errors, shapes and unit camera-facing
stages at odd sizes, single-image semantics, the loss terms (eq. 5-7) and the one-pass
minimax game through the gradient-reversal layer, gradients, over-fitting a tiny batch,
seeding, configuration and state_dict round trips, and two steps of the real trainer."""

import csv
import math

import pytest
import torch

from faceps.core.errors import ConfigError, ShapeError
from faceps.datasets.build import build_dataset
from faceps.learn.archs import (
    LossInputs,
    build_normal_network,
    is_single_image,
    normal_config,
)
from faceps.learn.casfne import (
    CasFNE,
    CasFNEConfig,
    discriminator_loss,
    reverse_gradient,
    total_variation,
)
from faceps.learn.losses import normal_loss
from faceps.learn.resnet import count_parameters
from tests.tolerances import assert_close

#: a tiny network: the tests are about behaviour, not capacity
TINY = {"encoder_widths": (4, 4, 8, 8), "encoder_blocks": (1, 1, 1, 1),
        "decoder_widths": (4, 4, 4, 4, 4), "normal_widths": (4, 4, 8, 8, 8),
        "cascade_widths": (8, 8, 4, 4), "disc_widths": (4, 8)}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return CasFNE(CasFNEConfig(**{**TINY, **kw}))


def sphere_normals(B, H, W):
    """(B, 3, H, W) unit normals of a sphere bulging towards the camera (n_z < 0) and
    its disc (B, H, W)."""
    v, u = torch.meshgrid(torch.linspace(-1.2, 1.2, H), torch.linspace(-1.2, 1.2, W),
                          indexing="ij")
    r2 = u * u + v * v
    inside = r2 < 1
    nz = -torch.sqrt((1 - r2).clamp_min(0))
    n = torch.stack([u, v, nz])
    n = torch.where(inside, n, torch.tensor([0.0, 0.0, -1.0])[:, None, None])
    n = n / n.norm(dim=0, keepdim=True)
    return n.expand(B, 3, H, W).clone(), inside.expand(B, H, W).float()


def inputs_for(images):
    B = images.shape[0]
    H, W = images.shape[-2:]
    return LossInputs(images=images, image_mask=torch.ones(B, images.shape[1],
                                                           dtype=torch.bool),
                      proxy_normals=torch.zeros(B, 3, H, W), proxy_mask=torch.zeros(B, H, W))


# ------------------------------------------------------------------ configuration
def test_defaults_are_the_paper():
    c = CasFNEConfig()
    assert c.arch == "casfne" and c.cascade == 2 and c.encoder_widths == (64, 128, 256, 512)
    assert c.encoder_blocks == (2, 2, 2, 2) and c.norm == "group"
    assert c.tv_weight == 0.002 and c.adv_weight == 1e-4 and c.adversarial is False
    assert CasFNE.single_image and not CasFNE.uses_proxy


@pytest.mark.parametrize("bad", [
    {"arch": "facepsnet"}, {"encoder_widths": (64, 128, 256)},
    {"decoder_widths": (4, 4, 4, 4, 0)}, {"normal_widths": (4, 4, 8, 8)},
    {"cascade_widths": (8, 8, 4, 4.5)}, {"disc_widths": ()}, {"norm": "batch"},
    {"cascade": -1}, {"cascade": 1.5}, {"cascade": float("nan")}, {"cascade": "2"},
    {"tv_weight": -0.1}, {"adv_weight": float("nan")},
    {"adversarial": "yes"}, {"eps": 0.0}, {"encoder_blocks": (2, 2, True, 2)},
])
def test_invalid_options_raise_config_error(bad):
    with pytest.raises(ConfigError):
        CasFNEConfig(**{**TINY, **bad})


def test_normal_config_round_trip_and_unknown_fields():
    values = {"arch": "casfne", **{k: list(v) for k, v in TINY.items()}, "cascade": 1,
              "adversarial": True}
    cfg = normal_config(values)
    assert isinstance(cfg, CasFNEConfig) and cfg.encoder_widths == (4, 4, 8, 8)
    assert cfg.cascade == 1 and cfg.adversarial
    assert normal_config(cfg.to_dict()) == cfg
    net = build_normal_network(cfg)
    assert isinstance(net, CasFNE) and net.config == cfg and is_single_image(net)
    assert net.discriminator is not None
    with pytest.raises(ConfigError, match="unknown casfne"):
        normal_config({"arch": "casfne", "widths": [8, 16, 32]})


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("H,W", [(72, 56), (33, 47), (64, 64)])
def test_stages_are_unit_camera_facing_at_odd_sizes(H, W):
    net = tiny().eval()
    torch.manual_seed(1)
    images = torch.rand(2, 1, 3, H, W) * 5.0
    with torch.no_grad():
        out = net(images, None)
    assert len(out.stages) == 3 and out.normals is out.stages[-1]
    for s in out.stages:
        assert s.shape == (2, 3, H, W) and s.dtype == torch.float32
        assert_close(s.norm(dim=1), torch.ones(2, H, W), atol=1e-5, name="|n|")
        assert bool((s[:, 2] < 0).all()), "normals must face the camera (n_z < 0)"


def test_cascade_override_shares_the_block():
    net = tiny().eval()
    images = torch.rand(1, 1, 3, 40, 40)
    with torch.no_grad():
        o2 = net(images, None)
        o0 = net(images, None, cascade=0)
        o4 = net(images, None, cascade=4)
    assert len(o0.stages) == 1 and len(o4.stages) == 5
    assert_close(o0.normals, o2.stages[0], name="stage 0")
    for t in range(3):
        assert_close(o4.stages[t], o2.stages[t], name=f"stage {t}")
    assert float((o4.stages[4] - o4.stages[3]).abs().max()) > 0  # a real extra stage
    with pytest.raises(ConfigError):
        net(images, None, cascade=-1)
    with pytest.raises(ConfigError):
        net(images, None, passes=2)
    flat = tiny(cascade=0)
    assert flat.cascaded_block is None and flat.loss_names == ("stage0", "tv")
    with pytest.raises(ConfigError, match="without a cascaded block"):
        flat(images, None, cascade=1)


def test_single_image_semantics_and_exposure():
    net = tiny().eval()
    torch.manual_seed(2)
    images = torch.rand(2, 3, 3, 40, 48)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    with torch.no_grad():
        base = net(images, None, mask).normals
        changed = images.clone()
        changed[0, 0] = torch.rand(3, 40, 48)     # padded
        changed[0, 2] = torch.rand(3, 40, 48)     # valid but not the first valid
        changed[1, 1:] = 7.0
        assert_close(net(changed, None, mask).normals, base, name="ignored images")
        # the used image matters, its exposure does not
        used = images.clone()
        used[0, 1] = torch.rand(3, 40, 48)
        assert float((net(used, None, mask).normals[0] - base[0]).abs().max()) > 1e-4
        brighter = images.clone()
        brighter[0, 1] *= 8.0
        assert_close(net(brighter, None, mask).normals, base, atol=1e-4, name="exposure")
        # (B, 3, H, W) input: the image itself
        first = torch.stack([images[0, 1], images[1, 0]])
        assert_close(net(first, None).normals, base, name="4-d input")
        # a sample does not depend on its batch (no batch norm)
        assert_close(net(images[1:], None, mask[1:]).normals, base[1:], atol=1e-5,
                     name="batch independence")


# ------------------------------------------------------------------ losses
def test_total_variation_analytic():
    const = torch.tensor([0.3, -0.2, -0.9])[None, :, None, None].expand(2, 3, 5, 7)
    assert float(total_variation(const)) == 0.0
    # a ramp of step d along x in channel 0: |grad(n / 2 + 0.5)|_1 = d / 2 on W - 1 of
    # the W columns
    d, B, H, W = 0.1, 2, 5, 7
    ramp = const.clone()
    ramp[:, 0] = d * torch.arange(W, dtype=torch.float32)
    expected = B * H * (W - 1) * d / 2 / (B * H * W)
    assert float(total_variation(ramp)) == pytest.approx(expected, rel=1e-5)
    assert float(total_variation(ramp.transpose(2, 3))) == pytest.approx(
        B * H * (W - 1) * d / 2 / (B * H * W), rel=1e-5)


@pytest.mark.parametrize("adversarial", [False, True])
def test_loss_terms_are_the_loss_names_and_sum_to_the_total(adversarial):
    net = tiny(adversarial=adversarial)
    gt, region = sphere_normals(2, 32, 40)
    images = torch.rand(2, 1, 3, 32, 40)
    out = net(images, None)
    total, terms = net.loss(out, gt, region, inputs_for(images))
    names = ("stage0", "stage1", "stage2", "tv") + (("adv",) if adversarial else ())
    assert net.loss_names == names and tuple(terms) == names
    for t, s in enumerate(out.stages):
        assert_close(terms[f"stage{t}"], normal_loss(s, gt, region), name=f"stage{t}")
    assert_close(terms["tv"], sum(total_variation(s) for s in out.stages), name="tv")
    expected = sum(terms[f"stage{t}"] for t in range(3)) + 0.002 * terms["tv"]
    if adversarial:
        assert float(terms["adv"].detach()) > 0
        expected = expected + terms["adv"]
    assert_close(total, expected, name="total")
    with pytest.raises(ShapeError, match="stages"):
        net.loss(net(images, None, cascade=1), gt, region, inputs_for(images))


def test_reverse_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    c = torch.randn(4, 3)
    y = reverse_gradient(x, 0.25)
    assert_close(y, x, name="forward is the identity")
    (y * c).sum().backward()
    assert_close(x.grad, -0.25 * c, name="reversed gradient")


def test_one_pass_minimax_game():
    """The discriminator descends L_D; the estimates get -adv_weight dL_D/dN."""
    net = tiny(adversarial=True, adv_weight=1e-2)
    disc = net.discriminator
    gt, region = sphere_normals(2, 24, 24)
    torch.manual_seed(3)
    stages = [torch.nn.functional.normalize(torch.randn(2, 3, 24, 24), dim=1)
              for _ in range(2)]

    def grads(scale):
        disc.zero_grad()
        leaves = [s.clone().requires_grad_() for s in stages]
        loss = discriminator_loss(disc, leaves, gt, region, scale)
        loss.backward()
        return loss, [s.grad for s in leaves], [p.grad.clone() for p in disc.parameters()]

    loss_a, gen_a, disc_a = grads(1e-2)
    loss_p, gen_p, disc_p = grads(-1.0)          # reversal by -(-1): the plain gradient
    assert_close(loss_a, loss_p, name="L_D")
    for a, p in zip(disc_a, disc_p):
        assert_close(a, p, name="discriminator gradient (weight 1, not reversed)")
    assert float(gen_p[0][region[:, None].expand(-1, 3, -1, -1) > 0].abs().max()) > 0
    for a, p in zip(gen_a, gen_p):
        assert_close(a, -1e-2 * p, atol=1e-9, name="generator gradient")
    # outside the region the discriminator sees nothing of the estimates
    out_region = (region == 0)[:, None].expand(-1, 3, -1, -1)
    assert float(gen_a[0][out_region].abs().max()) == 0.0
    # a small gradient step of the discriminator lowers L_D
    with torch.no_grad():
        for p, g in zip(disc.parameters(), disc_p):
            p -= 1e-2 * g
        after = discriminator_loss(disc, stages, gt, region, 1e-2)
        assert float(after) < float(loss_p)


def test_discriminator_only_in_the_loss():
    net = tiny(adversarial=True)
    calls = []
    net.discriminator.register_forward_hook(lambda *a: calls.append(1))
    gt, region = sphere_normals(1, 64, 64)
    images = torch.rand(1, 1, 3, 64, 64)
    out = net(images, None)
    assert calls == [], "forward (inference) must not run the discriminator"
    net.loss(out, gt, region, inputs_for(images))
    assert calls == [1]


def test_gradients_reach_every_part():
    net = tiny(adversarial=True)
    gt, region = sphere_normals(2, 64, 64)
    images = torch.rand(2, 1, 3, 64, 64)
    total, _ = net.loss(net(images, None), gt, region, inputs_for(images))
    total.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert bool(torch.isfinite(p.grad).all()), name
    # every layer learns: the normal encoder E_cn of the cascaded block included
    for name, module in net.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            assert sum(float(p.grad.norm()) for p in own) > 0, f"no gradient reaches {name}"


def test_overfits_a_tiny_batch():
    net = tiny(seed=4)
    gt, region = sphere_normals(2, 64, 64)
    torch.manual_seed(5)
    images = torch.rand(2, 1, 3, 64, 64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        total, terms = net.loss(net(images, None), gt, region, inputs_for(images))
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append((float(total.detach()), float(terms["stage2"].detach())))
    (total0, final0), (total1, final1) = history[0], history[-1]
    assert total1 < 0.6 * total0 and final1 < 0.5 * final0, history


# ------------------------------------------------------------------ weights
def test_seed_and_state_dict_round_trip():
    a, b, c = tiny(seed=7), tiny(seed=7), tiny(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    c.load_state_dict(sa)
    images = torch.rand(1, 1, 3, 40, 36)
    with torch.no_grad():
        assert_close(c.eval()(images, None).normals, a.eval()(images, None).normals,
                     name="after load_state_dict")
    assert count_parameters(tiny(adversarial=True)) > count_parameters(a)


# ------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("casfne") / "d.h5", 4, size=64,
                         seed=0).path


def test_two_step_training_run(tmp_path, data):
    from faceps.learn.checkpoint import load_network
    from faceps.learn.train import TrainConfig, train

    network = {"arch": "casfne", **{k: list(v) for k, v in TINY.items()},
               "adversarial": True}
    cfg = TrainConfig.for_kind("normal", network=network, image_counts=(1,),
                               proxy_source="none", batch_size=2, max_steps=2, log_every=1,
                               checkpoint_every=1, progress=False, tensorboard=False)
    run = tmp_path / "run"
    res = train("normal", cfg, data, val_data=data, out=run)
    assert res.step == 2 and len(res.losses) == 2
    assert all(math.isfinite(x) for x in res.losses)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = ["stage0", "stage1", "stage2", "tv", "adv"]
    assert set(names) <= set(rows[0])
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2
    for r in train_rows:
        assert all(math.isfinite(float(r[n])) and float(r[n]) > 0 for n in names), r
    loaded = load_network(run, kind="normal")
    assert isinstance(loaded.network, CasFNE)
    assert loaded.network.config == normal_config(network)
