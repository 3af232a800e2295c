"""The cross-modal architecture (``crossmodal``): configuration, the batch-type schedule, the
deactivable skip connections, the three passes and which parameters each step trains, and
a short run through the real trainer."""

import csv

import pytest
import torch
import torch.nn.functional as F

from faceps.core.errors import ConfigError, ShapeError
from faceps.datasets.build import build_dataset
from faceps.learn import crossmodal as cm
from faceps.learn.archs import LossInputs, build_normal_network, normal_config
from faceps.learn.crossmodal import (
    LOSS_NAMES,
    CrossModalConfig,
    CrossModalNet,
    batch_schedule,
    masked_image_loss,
    max_fuse,
)

#: a tiny network: tests run in seconds on one thread
TINY = dict(widths=(4, 8, 8, 8), blocks=(1, 1, 1, 1), decoder_widths=(4, 4, 4, 4, 4),
            latent_channels=8, head_width=4)
MODULES = ("image_encoder", "normal_encoder", "normal_decoder", "image_decoder")
#: the modules each step type trains (module docstring's table)
TRAINS = {"paired": {"image_encoder", "normal_decoder", "image_decoder"},
          "image": {"image_encoder", "image_decoder"},
          "normal": {"normal_encoder", "normal_decoder"}}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return CrossModalNet(CrossModalConfig(**{**TINY, **kw}))


def unit_normals(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = F.interpolate(torch.randn(B, 3, 6, 6, generator=g), size=(H, W), mode="bilinear",
                      align_corners=False) * 0.6     # a smooth random surface
    n[:, 2] -= 1.0
    return F.normalize(n, dim=1)


def batch(B=2, k=1, H=64, W=64, seed=0):
    """(images (B, k, 3, H, W), image_mask, gt normals, face region)."""
    g = torch.Generator().manual_seed(seed + 100)
    gt = unit_normals(B, H, W, seed)
    light = F.normalize(torch.tensor([0.3, -0.2, -1.0]), dim=0)
    shade = (gt * light[None, :, None, None]).sum(1, keepdim=True).clamp_min(0)
    albedo = 0.4 + 0.4 * torch.rand(B, 3, 1, 1, generator=g)
    images = (albedo * shade)[:, None].repeat(1, k, 1, 1, 1)
    images = images * (1 + 0.2 * torch.rand(B, k, 1, 1, 1, generator=g))
    region = torch.zeros(B, H, W)
    region[:, H // 8: -H // 8, W // 8: -W // 8] = 1
    gt = gt * region[:, None]
    return images, torch.ones(B, k, dtype=torch.bool), gt, region


def inputs(images, mask, step=0):
    B, _, _, H, W = images.shape
    return LossInputs(images=images, image_mask=mask, proxy_normals=torch.zeros(B, 3, H, W),
                      proxy_mask=torch.zeros(B, H, W), step=step)


def step_loss(net, kind, seed=0, H=64, W=64):
    images, mask, gt, region = batch(H=H, W=W, seed=seed)
    out = net(images, None, mask)
    return net.loss(out, gt, region, inputs(images, mask), batch_type=kind)


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("bad", [
    {"arch": "facepsnet"}, {"widths": (8, 8, 8)}, {"widths": (8, 8, 0, 8)},
    {"blocks": (2, 2, 2)}, {"decoder_widths": (4, 4, 4, 4)}, {"latent_channels": 0},
    {"head_width": 0}, {"norm": "batch"}, {"mix": (0, 1, 1)}, {"mix": (1, -1, 1)},
    {"mix": (1, 1)}, {"mix": (1.5, 1, 1)}, {"image_weight": -1.0},
    {"image_weight": float("nan")}, {"eps": float("inf")}, {"paired_normal_first": 1},
])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        CrossModalConfig(**bad)


def test_config_defaults_are_the_papers():
    c = CrossModalConfig()
    assert c.arch == "crossmodal" and c.widths == (64, 128, 256, 512)
    assert c.blocks == (2, 2, 2, 2) and c.encoder_channels == (64, 64, 128, 256, 512)
    assert c.mix == (17, 10, 6) and c.paired_normal_first and c.image_weight == 1.0
    assert c.norm == "group"


def test_normal_config_and_state_dict_round_trip():
    cfg = normal_config({"arch": "crossmodal", **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in TINY.items()}, "mix": [2, 1, 0]})
    assert isinstance(cfg, CrossModalConfig) and cfg.widths == (4, 8, 8, 8)
    assert cfg.mix == (2, 1, 0)
    assert normal_config(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        normal_config({"arch": "crossmodal", "cascade": 2})
    torch.manual_seed(0)
    net = build_normal_network(cfg)
    assert type(net) is CrossModalNet and net.config is cfg
    assert net.single_image and not net.uses_proxy
    other = tiny(seed=5, mix=(2, 1, 0))
    images, mask, _, _ = batch(H=40, W=50)
    net.eval()
    other.eval()
    assert not torch.allclose(net(images).normals, other(images).normals)
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other(images, None, mask).normals, net(images, None, mask).normals,
                               rtol=0, atol=0)


def test_same_seed_same_weights():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ------------------------------------------------------------------ schedule
def test_default_schedule_follows_the_papers_data_mix():
    s = batch_schedule((17, 10, 6))
    assert len(s) == 50
    assert (s.count("paired"), s.count("image"), s.count("normal")) == (17, 10, 23)
    # the module docstring's beginning
    assert s[:6] == ("normal", "paired", "image", "normal", "normal", "paired")
    # every paired step directly follows its batch's normal-to-normal step
    assert all(s[i - 1] == "normal" for i, t in enumerate(s) if t == "paired")
    # without the normal-first expansion: the batches themselves, spread over the cycle
    b = batch_schedule((17, 10, 6), paired_normal_first=False)
    assert len(b) == 33 and (b.count("paired"), b.count("image")) == (17, 10)
    assert max(len(run) for run in "".join(t[0] for t in b).replace("i", " ")
               .replace("n", " ").split()) <= 3
    assert batch_schedule((1, 0, 0)) == ("normal", "paired")
    assert batch_schedule((1, 0, 0), False) == ("paired",)
    with pytest.raises(ConfigError):
        batch_schedule((0, 1, 1))


def test_loss_follows_the_schedule_of_the_step():
    net = tiny(mix=(1, 1, 1))
    assert net.schedule == ("normal", "paired", "image", "normal")
    images, mask, gt, region = batch()
    out = net(images, None, mask)
    for step in range(9):
        kind = net.batch_type(step)
        assert kind == net.schedule[step % 4]
        _, terms = net.loss(out, gt, region, inputs(images, mask, step))
        on = {n for n, v in terms.items() if float(v.detach()) != 0.0}
        assert on == {"paired": {"image_to_normal", "image_to_image"},
                      "image": {"image_to_image"}, "normal": {"normal_to_normal"}}[kind]
    net.eval()                                     # validation: the paired terms
    with torch.no_grad():
        _, terms = net.loss(net(images, None, mask), gt, region, inputs(images, mask, 0))
    assert float(terms["image_to_normal"]) > 0 and float(terms["normal_to_normal"]) == 0
    with pytest.raises(ConfigError):
        net.loss(out, gt, region, inputs(images, mask), batch_type="pairs")


@pytest.mark.parametrize("kind", ["paired", "image", "normal"])
def test_loss_terms_and_totals(kind):
    net = tiny(image_weight=0.5)
    total, terms = step_loss(net, kind)
    assert tuple(terms) == net.loss_names == LOSS_NAMES
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    want = {"paired": terms["image_to_normal"] + 0.5 * terms["image_to_image"],
            "image": 0.5 * terms["image_to_image"],
            "normal": terms["normal_to_normal"]}[kind]
    torch.testing.assert_close(total, want)
    assert float(total.detach()) > 0


# ------------------------------------------------------------------ building blocks
def test_max_fuse_replaces_only_the_last_channels():
    x = torch.randn(2, 5, 3, 4)
    e = torch.randn(2, 3, 3, 4)
    y = max_fuse(x, e)
    assert torch.equal(y[:, :2], x[:, :2])
    assert torch.equal(y[:, 2:], torch.maximum(x[:, 2:], e))
    assert max_fuse(x, None) is x
    with pytest.raises(ShapeError):
        max_fuse(x, torch.randn(2, 6, 3, 4))
    with pytest.raises(ShapeError):
        max_fuse(x, torch.randn(2, 3, 3, 5))


def test_masked_image_loss_counts_the_region_only():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.zeros(1, 3, 4, 4)
    b[:, :, 0, 0] = 2.0            # inside: error 4 on one of the 4 region pixels
    b[:, :, 3, 3] = 100.0          # outside the region: ignored
    region = torch.zeros(1, 4, 4)
    region[:, :2, :2] = 1
    assert float(masked_image_loss(a, b, region)) == pytest.approx(1.0)
    assert float(masked_image_loss(a, b, torch.zeros(1, 4, 4))) == 0.0


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("H,W", [(72, 56), (37, 45), (64, 64)])
def test_output_shapes_unit_and_facing_the_camera(H, W):
    net = tiny()
    images, mask, _, _ = batch(B=2, k=2, H=H, W=W)
    out = net(images, torch.zeros(2, 3, H, W), mask)
    assert out.normals.shape == (2, 3, H, W) and out.normals.dtype == torch.float32
    assert len(out.stages) == 1 and out.stages[0] is out.normals
    torch.testing.assert_close(out.normals.norm(dim=1), torch.ones(2, H, W))
    assert bool((out.normals[:, 2] < 0).all())
    assert out.image.shape == (2, 3, H, W)
    # (B, 3, H, W) input is one image per sample
    torch.testing.assert_close(net(images[:, 0]).normals, out.normals)
    # still facing the camera when the raw z output is pushed towards the viewer
    with torch.no_grad():
        net.normal_decoder.head[-1].bias[2] = 200.0
    assert bool((net(images).normals[:, 2] < 0).all())
    with pytest.raises(ConfigError):
        net(images, passes=2)


def test_single_image_semantics_and_exposure():
    net = tiny()
    net.eval()
    images, _, _, _ = batch(B=2, k=3, H=40, W=48)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    ref = net(images, None, mask).normals
    changed = images.clone()
    changed[0, 0] = torch.rand_like(changed[0, 0])   # ignored: invalid
    changed[0, 2] = torch.rand_like(changed[0, 2])   # ignored: not the first valid one
    changed[1, 1:] = 5.0
    torch.testing.assert_close(net(changed, None, mask).normals, ref, rtol=0, atol=0)
    used = images.clone()
    used[0, 1] = torch.rand_like(used[0, 1])          # sample 0's first valid image
    new = net(used, None, mask).normals
    assert (new[0] - ref[0]).abs().max() > 1e-4
    torch.testing.assert_close(new[1], ref[1])
    # the exposure does not matter (division by the mean intensity)
    torch.testing.assert_close(net(images * 7.0, None, mask).normals, ref, rtol=1e-4,
                               atol=1e-4)
    # the proxy is not read
    torch.testing.assert_close(
        net(images, unit_normals(2, 40, 48), mask, torch.ones(2, 40, 48)).normals, ref,
        rtol=0, atol=0)


# ------------------------------------------------------------------ skip connections
def _with_latent(encoder, z):
    """A forward hook that replaces the encoder's latent code by ``z``."""
    return encoder.to_latent.register_forward_hook(lambda mod, args, out: z)


def test_normal_to_normal_runs_without_skips():
    """With its latent code replaced by that of map a, the normal-to-normal pass of map b
    gives exactly the pass of a: nothing else of b's encoder (the maps skips would carry)
    reaches the decoder. The image-to-normal pass, whose skips are on, does depend on them;
    the image-to-image pass has none."""
    net = tiny()
    net.eval()
    a, b = unit_normals(2, 64, 64, seed=1), unit_normals(2, 64, 64, seed=2)
    with torch.no_grad():
        za, _ = net.normal_encoder(a)
        ref = net.normal_to_normal(a)
        assert (net.normal_to_normal(b) - ref).abs().max() > 1e-3
        handle = _with_latent(net.normal_encoder, za)
        try:
            swapped = net.normal_to_normal(b)
        finally:
            handle.remove()
        torch.testing.assert_close(swapped, ref, rtol=0, atol=0)

        ia, _, _, _ = batch(seed=1)
        ib, _, _, _ = batch(seed=2)
        xa, xb = net.input_image(ia), net.input_image(ib)
        zi, _ = net.image_encoder(xa)
        ref_n, ref_i = net.image_to_normal(xa)[0], net.image_to_image(xa)
        handle = _with_latent(net.image_encoder, zi)
        try:
            skip_n, skip_i = net.image_to_normal(xb)[0], net.image_to_image(xb)
        finally:
            handle.remove()
        assert (skip_n - ref_n).abs().max() > 1e-3      # skips on: b's features arrive
        torch.testing.assert_close(skip_i, ref_i, rtol=0, atol=0)   # D_I: no skips


def test_skips_are_off_in_the_normal_step(monkeypatch):
    """The fusion receives encoder maps in the image-to-normal pass only."""
    calls = []

    def spy(x, e):
        calls.append(e is not None)
        return max_fuse(x, e)

    monkeypatch.setattr(cm, "max_fuse", spy)
    net = tiny()
    images, mask, gt, region = batch()
    out = net(images, None, mask)
    assert calls == [True] * 5                         # forward: five skips on
    calls.clear()
    net.loss(out, gt, region, inputs(images, mask), batch_type="normal")
    assert calls == [False] * 5
    calls.clear()
    net.loss(out, gt, region, inputs(images, mask), batch_type="image")
    assert calls == [False] * 5                        # D_I, no skips either


@pytest.mark.parametrize("kind", ["paired", "image", "normal"])
def test_each_step_type_trains_only_its_modules(kind):
    net = tiny()
    total, _ = step_loss(net, kind)
    total.backward()
    for name in MODULES:
        params = list(getattr(net, name).named_parameters())
        if name in TRAINS[kind]:
            missing = [p for p, t in params if t.grad is None]
            assert not missing, f"{kind}: no gradient for {name}.{missing[:3]}"
            assert all(bool(torch.isfinite(t.grad).all()) for _, t in params)
            assert sum(float(t.grad.abs().sum()) for _, t in params) > 0, name
        else:
            touched = [p for p, t in params if t.grad is not None and bool(t.grad.any())]
            assert not touched, f"{kind} step reached {name}.{touched[:3]}"


def test_image_to_image_from_the_cached_latent_equals_a_fresh_pass():
    net = tiny()
    net.eval()
    images, mask, _, _ = batch(H=72, W=56)
    out = net(images, None, mask)
    torch.testing.assert_close(net.image_to_image(latent=out.latent, size=(72, 56)),
                               net.image_to_image(out.image))
    with pytest.raises(ShapeError):
        net.image_to_image(latent=out.latent)


# ------------------------------------------------------------------ training
def test_training_with_the_schedule_fits_a_fixed_batch():
    """Over-fitting sanity: 40 Adam steps of the (1, 1, 1) schedule lower all three
    passes' losses clearly on a fixed batch."""
    net = tiny(mix=(1, 1, 1), widths=(8, 8, 16, 16), decoder_widths=(8, 8, 8, 8, 8),
               latent_channels=16, head_width=8)
    images, mask, gt, region = batch(B=2, H=64, W=64, seed=3)

    def all_terms():
        net.eval()
        with torch.no_grad():
            x = net.input_image(images, mask)
            n, _ = net.image_to_normal(x)
            face = region[:, None]
            res = (float(cm.normal_loss(n, gt, region)),
                   float(masked_image_loss(net.image_to_image(x), x, region)),
                   float(cm.normal_loss(net.normal_to_normal(gt * face), gt, region)))
        net.train()
        return res

    before = all_terms()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(40):
        out = net(images, None, mask)
        total, _ = net.loss(out, gt, region, inputs(images, mask, step))
        opt.zero_grad()
        total.backward()
        opt.step()
    after = all_terms()
    for name, b, a in zip(LOSS_NAMES, before, after):
        assert a < 0.6 * b, f"{name}: {b:.4f} -> {a:.4f}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("crossmodal") / "d.h5", 4, size=64,
                         seed=0).path


def test_two_training_steps_through_the_trainer(tmp_path, data):
    from faceps.learn.checkpoint import load_network
    from faceps.learn.train import TrainConfig, train

    network = {"arch": "crossmodal", **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in TINY.items()}}
    cfg = TrainConfig.for_kind("normal", network=network, image_counts=(1,),
                               proxy_source="none", batch_size=2, max_steps=2, log_every=1,
                               checkpoint_every=1, progress=False, tensorboard=False)
    run = tmp_path / "run"
    res = train("normal", cfg, data, val_data=data, out=run)
    assert res.step == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2 and set(LOSS_NAMES) <= set(train_rows[0])
    # the default schedule: step 0 is a normal-to-normal step, step 1 a paired one
    first, second = ({k: float(r[k]) for k in LOSS_NAMES} for r in train_rows)
    assert first["normal_to_normal"] > 0 and first["image_to_normal"] == 0
    assert first["image_to_image"] == 0
    assert second["image_to_normal"] > 0 and second["image_to_image"] > 0
    assert second["normal_to_normal"] == 0
    val = [r for r in rows if r["split"] == "val"]
    assert val and float(val[-1]["mean_deg"]) < 90
    loaded = load_network(run, kind="normal")
    assert type(loaded.network) is CrossModalNet
    assert loaded.network.config == CrossModalConfig(**TINY)
