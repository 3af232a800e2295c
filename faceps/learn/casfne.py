"""Cas-FNE: cascaded face normal estimation from one image
(``papers/cas-fne-cascaded-face-normal.txt``), the ``casfne`` architecture.

Structure (section III-B, Fig. 2):

1. Initial block (section III-B-2, eq. 4), stage t = 0. The structure encoder E_f is a
   ResNet-18 (:class:`~faceps.learn.resnet.ResNet`, GroupNorm, no pretrained weights: we
   download nothing) whose input is the sample's first valid image divided by its mean
   intensity (:func:`~faceps.learn.normalnet.normalize_images`). Its five multi-scale
   maps E_f^1 .. E_f^5 are the stem output (H/2) and the four residual stages (H/4 ..
   H/32). The normal decoder D_n has five 4x4 stride-2 transposed convolutions (each
   followed by GroupNorm and ReLU); the input of D_n^1 is E_f^5 and the input of D_n^{i+1}
   is ``CAT[D_n^i(.), E_f^{5-i}]`` (skip connections by concatenation), so D_n^5 is back
   at full resolution. A final 1x1 convolution ``Con`` maps its features to three
   channels, which are normalised to the initial estimate N_0.
2. Cascaded block (section III-B-1, eq. 3), shared by all stages t = 1 .. T. A normal
   encoder E_cn (five 4x4 stride-2 convolutions; LeakyReLU 0.2 and GroupNorm between
   them, none on the output, as the reference code) encodes the previous estimate
   N_{t-1} into normal features z at H/32. The fusion is concatenation with
   the structure features (the paper's "CAT", its Table IV choice over AdaIN and feature
   modulation): the cascaded decoder D_cn (five 4x4 stride-2 transposed convolutions)
   takes ``CAT(z, E_f^5)``, and D_cn^{j+1} takes ``CAT[D_cn^j(.), E_f^{5-j}]``
   (j = 1 .. 4); its last layer gives three channels, normalised to N_t. The structure
   features are computed once per image and reused by every stage (section V-2: "we
   directly propagate the features extracted in the previous stage to the subsequent
   stages"). Since the parameters are shared, any number of stages runs on the same
   weights (``forward(..., cascade=T)``); the paper uses T = 2.

All estimates are unit normals facing the camera (DESIGN.md, n_z < 0): the raw output
(r_x, r_y, r_z) becomes ``normalize(r_x, r_y, -(softplus(r_z) + 1e-3))`` (the reference
code, ``net/model.py`` of the paper's repository, has ``normalize(tanh(r))``, which does
not fix the side). Sizes that are not multiples of 32 (the encoders' stride) are
zero-padded; the stages run on the padded maps and are cropped back. No batch
normalisation (the reference code has it): a sample's output does not depend on its
batch. Details the paper leaves open (the widths, the layers of E_cn, the stride-2 3x3
discriminator, here narrower) follow the reference code.

Losses (section III-C, eq. 5-8; ``loss_names``):

- ``stage0`` .. ``stageT``, eq. 5: the cosine loss ``1 - N_t . N_gt`` averaged over the
  supervised region (:func:`~faceps.learn.losses.normal_loss`) at every stage, weight 1
  each (lambda_rec = 1).
- ``tv``, eq. 6: ``L_tv = 1/M sum_t sum_{x,y} |grad(N_t / 2 + 0.5)|_1`` over the M pixels
  of the image (the whole image, as the paper; M = B H W for a batch), summed over the
  stages t = 0 .. T (:func:`total_variation`), weight ``tv_weight`` (lambda_tv = 0.002).
- ``adv`` (only with ``adversarial``), eq. 7: ``L_adv = sum_t D_adv(N_t)`` with a small
  patch discriminator D_adv (:class:`PatchDiscriminator`; ground truth real, every stage
  fake), weight ``adv_weight`` (lambda_adv = 1e-4).

The adversarial game in one backward pass. The trainer has one optimiser over
``net.parameters()`` and calls ``loss(...).backward()`` once per step, so the
discriminator lives inside this module and is trained through a gradient-reversal layer
(:func:`reverse_gradient`): ``adv`` is the discriminator's real/fake classification loss

    L_D = sum_{t=0..T} [BCE(D(N_gt), real) + BCE(D(R(N_t)), fake)]

(binary cross-entropy averaged over the patch logits; the maps are zeroed outside the
supervised region so the background tells nothing), where R is the identity forward and
multiplies the gradient by ``-adv_weight`` backward. ``L_D`` enters the total with weight
1, so the discriminator's parameters descend ``L_D`` (it learns to tell the estimates from
the ground truth), while the generator (everything before R) receives
``-adv_weight * dL_D/dN_t``, i.e. it descends ``adv_weight * (-L_D)``: the minimax GAN
``min_G max_D``, both players updated by the same step. Consequently the ``loss`` column
of a run with ``adversarial`` includes ``L_D`` (about ``2 log 2`` per stage near the
equilibrium). The discriminator is used by :meth:`CasFNE.loss` only: :meth:`CasFNE.forward`
(inference) never runs it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faceps.core.errors import ConfigError, ShapeError, check_shape
from faceps.learn.archs import LossInputs, single_input_image
from faceps.learn.losses import normal_loss
from faceps.learn.normalnet import NormalNetOutput, check_passes
from faceps.learn.resnet import ResNet, ResNetConfig, make_norm

__all__ = ["CasFNEConfig", "CasFNE", "InitialDecoder", "CascadedBlock",
           "PatchDiscriminator", "total_variation", "reverse_gradient",
           "discriminator_loss", "STRIDE"]

#: the encoders' total stride (ResNet-18 and E_cn: five stride-2 levels)
STRIDE = 32
#: norms of the layers (no BatchNorm: outputs must not depend on the batch)
NORMS = ("group", "none")
#: n_z = -(softplus(r_z) + FACING_MARGIN) before normalisation: always facing the camera
FACING_MARGIN = 1e-3
#: bias of the raw z outputs so that softplus(bias) = 1: an untrained network leans to
#: (0, 0, -1)
Z_BIAS = math.log(math.e - 1.0)
#: slope of the LeakyReLU of E_cn and of the discriminator (the reference code's 0.2)
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class CasFNEConfig:
    """Options of :class:`CasFNE` (defaults: the paper's architecture and weights).

    Attributes:
        arch: the architecture's registry name (:mod:`faceps.learn.archs`).
        encoder_widths: channels of the four residual stages of the ResNet-18 structure
            encoder E_f (the stem has encoder_widths[0]).
        encoder_blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18).
        decoder_widths: output channels of the five transposed convolutions of the
            initial normal decoder D_n (H/16 .. H).
        normal_widths: channels of the five stride-2 convolutions of the cascaded normal
            encoder E_cn (H/2 .. H/32); the last is the width of z.
        cascade_widths: output channels of the first four transposed convolutions of the
            cascaded decoder D_cn (H/16 .. H/2; the fifth gives the 3 output channels).
        norm: ``group`` (GroupNorm) or ``none``, for every layer.
        cascade: refinement stages T (>= 0; the paper uses 2).
        tv_weight: weight of the total-variation term (lambda_tv).
        adversarial: add the adversarial term (builds the discriminator).
        adv_weight: weight of the adversarial term for the generator (lambda_adv); the
            discriminator's own loss has weight 1 (module docstring).
        disc_widths: channels of the discriminator's stride-2 3x3 convolutions.
        eps: added to the mean intensity before dividing by it.
    """

    arch: str = "casfne"
    encoder_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    encoder_blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    decoder_widths: tuple[int, int, int, int, int] = (32, 32, 32, 32, 32)
    normal_widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 256)
    cascade_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    norm: str = "group"
    cascade: int = 2
    tv_weight: float = 0.002
    adversarial: bool = False
    adv_weight: float = 1e-4
    disc_widths: tuple[int, ...] = (32, 64, 128, 256)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.arch != "casfne":
            raise ConfigError(f"CasFNEConfig is the 'casfne' architecture; got arch "
                              f"{self.arch!r}")
        s(self, "encoder_widths", _ints(self.encoder_widths, "encoder_widths", 4, 1))
        s(self, "encoder_blocks", _ints(self.encoder_blocks, "encoder_blocks", 4, 1))
        s(self, "decoder_widths", _ints(self.decoder_widths, "decoder_widths", 5, 1))
        s(self, "normal_widths", _ints(self.normal_widths, "normal_widths", 5, 1))
        s(self, "cascade_widths", _ints(self.cascade_widths, "cascade_widths", 4, 1))
        disc = _ints(self.disc_widths, "disc_widths", None, 1)
        if not disc:
            raise ConfigError("disc_widths needs at least one channel count")
        s(self, "disc_widths", disc)
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}; got {self.norm!r}")
        s(self, "cascade", _ints((self.cascade,), "cascade", 1, 0)[0])
        if not isinstance(self.adversarial, bool):
            raise ConfigError(f"adversarial must be a bool; got {self.adversarial!r}")
        for name in ("tv_weight", "adv_weight", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
                    not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")
            s(self, name, float(v))
        if self.eps <= 0:
            raise ConfigError(f"eps must be > 0; got {self.eps!r}")

    @property
    def encoder_channels(self) -> tuple[int, int, int, int, int]:
        """Widths of the five structure maps E_f^1 .. E_f^5 (H/2 .. H/32)."""
        w = self.encoder_widths
        return (w[0], w[0], w[1], w[2], w[3])

    def to_dict(self) -> dict:
        return asdict(self)


def _ints(values: object, name: str, n: int | None, low: int) -> tuple[int, ...]:
    """``values`` as a tuple of ``n`` (None: any number of) integers >= ``low``."""
    what = f"{'' if n is None else n} integers >= {low}".lstrip()
    try:
        v = tuple(values)
    except TypeError:
        raise ConfigError(f"{name} must be {what}; got {values!r}") from None
    if (n is not None and len(v) != n) or any(
            isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x)
            or x != int(x) or x < low for x in v):
        raise ConfigError(f"{name} must be {what}; got {values!r}")
    return tuple(int(x) for x in v)


# ------------------------------------------------------------------ building blocks
def _up(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    """4x4 stride-2 transposed convolution (doubles H, W), norm, ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=norm == "none"),
                         make_norm(norm, out_ch), nn.ReLU(inplace=True))


def _down(in_ch: int, out_ch: int, norm: str | None, kernel: int = 4) -> nn.Sequential:
    """Stride-2 convolution (padding 1: halves H, W, rounded up), norm (None: none),
    LeakyReLU 0.2."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, 2, 1,
                                         bias=norm in (None, "none"))]
    if norm is not None:
        layers.append(make_norm(norm, out_ch))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return nn.Sequential(*layers)


def _decode(layers: nn.ModuleList, x: torch.Tensor, skips: list[torch.Tensor]
            ) -> torch.Tensor:
    """Run five up-sampling layers; after each of the first four, concatenate the
    structure map of the same scale (E_f^4, E_f^3, E_f^2, E_f^1)."""
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < 4:
            x = torch.cat([x, skips[3 - i]], 1)
    return x


def _to_normals(raw: torch.Tensor) -> torch.Tensor:
    """Unit normals facing the camera from a raw 3-channel output (module docstring)."""
    nz = -(F.softplus(raw[:, 2:3]) + FACING_MARGIN)
    n = torch.cat([raw[:, :2], nz], 1)
    return n / n.norm(dim=1, keepdim=True).clamp_min(1e-8)


class InitialDecoder(nn.Module):
    """D_n and ``Con`` of the initial block (eq. 4).

    ``forward(maps)``: the five structure maps [E_f^1 .. E_f^5] (H/2 .. H/32, H and W
    multiples of 32) -> (B, 3, H, W) raw output (before :func:`_to_normals`).
    """

    def __init__(self, config: CasFNEConfig):
        super().__init__()
        c = config
        m, d = c.encoder_channels, c.decoder_widths
        ins = [m[4], d[0] + m[3], d[1] + m[2], d[2] + m[1], d[3] + m[0]]
        self.up = nn.ModuleList([_up(i, o, c.norm) for i, o in zip(ins, d)])
        self.con = nn.Conv2d(d[4], 3, 1)
        with torch.no_grad():
            self.con.bias.copy_(torch.tensor([0.0, 0.0, Z_BIAS]))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.con(_decode(self.up, maps[4], maps))


class CascadedBlock(nn.Module):
    """The shared-parameter cascaded block: E_cn and D_cn (eq. 3).

    ``forward(normals, maps)``: the previous estimate (B, 3, H, W) and the five structure
    maps (H, W multiples of 32) -> (B, 3, H, W) raw output (before :func:`_to_normals`).
    """

    def __init__(self, config: CasFNEConfig):
        super().__init__()
        c = config
        e, m, w = c.normal_widths, c.encoder_channels, c.cascade_widths
        ins = [3, *e[:4]]
        layers: list[nn.Module] = [_down(i, o, None if j == 0 else c.norm)
                                   for j, (i, o) in enumerate(zip(ins[:4], e[:4]))]
        layers.append(nn.Conv2d(ins[4], e[4], 4, 2, 1))   # z: no norm, no activation
        self.encoder = nn.Sequential(*layers)
        dins = [m[4] + e[4], w[0] + m[3], w[1] + m[2], w[2] + m[1], w[3] + m[0]]
        ups = [_up(i, o, c.norm) for i, o in zip(dins[:4], w)]
        last = nn.ConvTranspose2d(dins[4], 3, 4, 2, 1)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, 0.0, Z_BIAS]))
        self.up = nn.ModuleList([*ups, last])

    def encode(self, normals: torch.Tensor) -> torch.Tensor:
        """E_cn: the normal features z (B, normal_widths[4], H/32, W/32)."""
        return self.encoder(normals)

    def forward(self, normals: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        z = self.encode(normals)
        return _decode(self.up, torch.cat([z, maps[4]], 1), maps)


class PatchDiscriminator(nn.Module):
    """D_adv: a small patch discriminator on normal maps.

    Stride-2 3x3 convolutions of ``widths`` (LeakyReLU 0.2, norm after all but the
    first), then a 3x3 convolution to one logit per patch.

    ``forward(normals)``: (B, 3, H, W) -> (B, 1, H / 2^L, W / 2^L) logits (rounded up),
    positive for "ground truth".
    """

    def __init__(self, widths: tuple[int, ...], norm: str):
        super().__init__()
        ins = [3, *widths[:-1]]
        self.body = nn.Sequential(*[_down(i, o, None if j == 0 else norm, kernel=3)
                                    for j, (i, o) in enumerate(zip(ins, widths))])
        self.head = nn.Conv2d(widths[-1], 1, 3, 1, 1)

    def forward(self, normals: torch.Tensor) -> torch.Tensor:
        check_shape(normals, "normals", (None, 3, None, None))
        return self.head(self.body(normals))


# ------------------------------------------------------------------ loss pieces
def total_variation(normals: torch.Tensor) -> torch.Tensor:
    """Eq. 6 for one stage: ``1/M sum_{x,y} |grad(N / 2 + 0.5)|_1``.

    Forward differences along x and y of the map converted to [0, 1], their absolute
    values summed over both directions and the three channels, divided by the number of
    pixels M = B H W.

    Args:
        normals: (B, 3, H, W).

    Returns:
        scalar tensor >= 0 (0 for a constant map).
    """
    check_shape(normals, "normals", (None, 3, None, None))
    n = normals / 2 + 0.5
    B, _, H, W = n.shape
    dx = (n[..., :, 1:] - n[..., :, :-1]).abs().sum()
    dy = (n[..., 1:, :] - n[..., :-1, :]).abs().sum()
    return (dx + dy) / (B * H * W)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer: ``x`` unchanged forward; backward, the gradient
    multiplied by ``-scale``."""
    return _ReverseGradient.apply(x, float(scale))


def discriminator_loss(discriminator: nn.Module, stages: list[torch.Tensor],
                       gt: torch.Tensor, region: torch.Tensor, adv_weight: float
                       ) -> torch.Tensor:
    """The discriminator's loss ``L_D`` of the one-pass minimax game (module docstring).

    Args:
        discriminator: D_adv, (B, 3, H, W) -> patch logits.
        stages: T + 1 estimates (B, 3, H, W) (the fakes), with their graphs.
        gt: (B, 3, H, W) ground-truth normals (the reals; any value outside ``region``).
        region: (B, H, W), nonzero where the normals are compared; both maps are zeroed
            outside it.
        adv_weight: the generator's weight lambda_adv: the estimates receive
            ``-adv_weight`` times the gradient of ``L_D`` (gradient reversal).

    Returns:
        scalar ``sum_t [BCE(D(gt), 1) + BCE(D(N_t), 0)]`` (patch-averaged BCE).
    """
    if not stages:
        raise ShapeError("discriminator_loss needs at least one stage")
    check_shape(gt, "gt", tuple(stages[0].shape))
    check_shape(region, "region", (gt.shape[0], gt.shape[2], gt.shape[3]))
    inside = (region > 0)[:, None]
    real = torch.where(inside, gt, torch.zeros_like(gt)).detach()
    fakes = [torch.where(inside, reverse_gradient(s, adv_weight), torch.zeros_like(s))
             for s in stages]
    B = gt.shape[0]
    logits = discriminator(torch.cat([real, *fakes], 0))
    real_term = F.binary_cross_entropy_with_logits(logits[:B], torch.ones_like(logits[:B]))
    fake_logits = logits[B:].reshape(len(stages), B, *logits.shape[1:])
    fake_terms = [F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
                  for f in fake_logits]
    return len(stages) * real_term + sum(fake_terms)


# ------------------------------------------------------------------ the network
class CasFNE(nn.Module):
    """Cas-FNE: initial block plus a shared cascaded block (module docstring).

    ``forward(images, proxy_normals=None, image_mask=None, proxy_mask=None, *,
    cascade=None, passes=1)``:

    Args:
        images: (B, k, 3, H, W) linear intensities (or (B, 3, H, W)), any H, W; only each
            sample's first valid image (``image_mask``) is read.
        proxy_normals, proxy_mask: ignored (the architecture reads no proxy).
        image_mask: (B, k) bool, True for real images; None: all.
        cascade: refinement stages T to run (None: ``config.cascade``); the block is
            shared, so any T >= 0 works if the network has a cascaded block.
        passes: must be 1 (one pass is all this architecture has).

    Returns:
        :class:`~faceps.learn.normalnet.NormalNetOutput`: ``stages`` the T + 1 estimates
        N_0 .. N_T and ``normals`` the last, all (B, 3, H, W) unit normals with n_z < 0.
    """

    #: one image per sample (:mod:`faceps.learn.archs`)
    single_image = True
    #: the proxy normals are not read
    uses_proxy = False

    def __init__(self, config: CasFNEConfig | None = None):
        super().__init__()
        self.config = c = config or CasFNEConfig()
        self.structure_encoder = ResNet(ResNetConfig(
            in_channels=3, num_classes=None, widths=c.encoder_widths,
            blocks=c.encoder_blocks, norm=c.norm))
        self.initial_decoder = InitialDecoder(c)
        self.cascaded_block = CascadedBlock(c) if c.cascade > 0 else None
        self.discriminator = (PatchDiscriminator(c.disc_widths, c.norm) if c.adversarial
                              else None)

    @property
    def loss_names(self) -> tuple[str, ...]:
        stages = tuple(f"stage{t}" for t in range(self.config.cascade + 1))
        return stages + ("tv",) + (("adv",) if self.config.adversarial else ())

    def input_image(self, images: torch.Tensor, image_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, 3, H, W): each sample's first valid image divided by its mean intensity."""
        return single_input_image(images, image_mask, self.config.eps)

    def forward(self, images: torch.Tensor, proxy_normals: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, *, cascade: int | None = None,
                passes: int = 1) -> NormalNetOutput:
        """See the class docstring."""
        if check_passes(passes) != 1:
            raise ConfigError(f"the casfne architecture has one pass; got passes {passes}")
        T = self.config.cascade if cascade is None else _ints((cascade,), "cascade", 1, 0)[0]
        if T > 0 and self.cascaded_block is None:
            raise ConfigError("this CasFNE was built without a cascaded block "
                              "(config.cascade = 0)")
        x = self.input_image(images, image_mask)
        H, W = x.shape[-2:]
        ph, pw = (-H) % STRIDE, (-W) % STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        maps = self.structure_encoder.features(x)
        n = _to_normals(self.initial_decoder(maps))
        stages = [n]
        for _ in range(T):
            n = _to_normals(self.cascaded_block(n, maps))
            stages.append(n)
        stages = [s[:, :, :H, :W] for s in stages]
        return NormalNetOutput(normals=stages[-1], stages=stages)

    def loss(self, out: NormalNetOutput, gt: torch.Tensor, region: torch.Tensor,
             inputs: LossInputs | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 8: ``sum_t CosLoss(N_t) + tv_weight * L_tv`` (+ ``L_D`` through the
        gradient reversal with ``adversarial``; module docstring).

        Args:
            out: :meth:`forward` of the batch with ``config.cascade`` stages.
            gt: (B, 3, H, W) ground-truth unit normals (any value outside ``region``).
            region: (B, H, W) float, 1 on the supervised face region.
            inputs: unused (the interface's network inputs and step).

        Returns:
            (total, terms): terms by ``loss_names``; ``tv`` is eq. 6 unweighted and ``adv``
            the discriminator's loss ``L_D``.
        """
        c = self.config
        if len(out.stages) != c.cascade + 1:
            raise ShapeError(f"the loss needs the {c.cascade + 1} stages of config.cascade "
                             f"= {c.cascade}; got {len(out.stages)}")
        n = out.stages[0]
        check_shape(gt, "gt", tuple(n.shape))
        check_shape(region, "region", (n.shape[0], n.shape[2], n.shape[3]))
        terms = {f"stage{t}": normal_loss(s, gt, region) for t, s in enumerate(out.stages)}
        total = sum(terms.values())
        terms["tv"] = sum(total_variation(s) for s in out.stages)
        total = total + c.tv_weight * terms["tv"]
        if self.discriminator is not None:
            terms["adv"] = discriminator_loss(self.discriminator, out.stages, gt, region,
                                              c.adv_weight)
            total = total + terms["adv"]
        return total, terms
