"""HFFNE: exemplar-based face-normal estimation with StyleGAN2 weight modulation.

Paper: Wang et al., "Towards High-Fidelity Face Normal Estimation", ACM MM 2022
(``papers/hffne-exemplar-face-normal.txt``), architecture A3 ("Iter100k/A3/StyleGAN2" of
Table 3). The fine normal map is ``N = phi(I, R)`` (section 3.1) of one face image ``I``
and a coarse exemplar normal map ``R``; here the exemplar is the proxy normal map (the
camera-facing (0, 0, -1) where the proxy is unknown, :func:`exemplar_normals`).

Structure (:class:`ExemplarNet`):

1. Face encoder ``E_I`` (eq. 2): our ResNet-18 (:class:`~faceps.learn.resnet.ResNet`,
   GroupNorm, no head) on the image divided by its mean intensity
   (:func:`~faceps.learn.normalnet.normalize_images`); its five maps (stem H/2, then H/4,
   H/8, H/16, H/32) are the multi-scale structure features ``f_i``. The paper's face
   encoder is five strided convolutions; the ResNet-18 (five downsamplings as well) is the
   encoder our issue asks for.
2. Exemplar encoder ``E_R`` (eq. 1): "three convolution blocks and three pooling layers"
   (section 3.1): 3x3 convolution + LeakyReLU blocks, each followed by a 2x2 average pool,
   the third by a global average pool, and a linear layer to the low-dimensional normal
   code ``z`` (``code_dim``; section 3.5 "feature injection with relatively low
   dimensions"). The code is global: it carries the exemplar's normal distribution, not
   its pixels, so the network cannot simply copy the exemplar (section 3.5). As StyleGAN2
   does with its latent, the code is normalised to unit root-mean-square.
3. Decoder ``D_N`` (eq. 3): ``d_3 = F_3(D_3(f_4, f_3))``, ``d_i = F_i(D_i(d_{i+1}, f_i))``
   down to the stem (H/2), and one more block at full resolution whose skip input is the
   normalised image (the ResNet has no full-resolution map). ``D_i`` upsamples by 2
   (bilinear), concatenates the skip features and fuses them with a 1x1 convolution +
   LeakyReLU; ``F_i`` is a modulated 3x3 convolution (:class:`ModulatedConv2d`) + bias +
   LeakyReLU: the feature modulation module is "inserted at every layer of the decoder"
   (section 3.3, A3).
4. Feature modulation (section 3.2): per sample, ``w_bar = w * s * F_Linear(z)`` (eq. 4;
   ``s = 1 / sqrt(fan_in)`` the StyleGAN2 equalised-learning-rate scale, ``F_Linear`` a
   learnt affine map of the code to one factor per input channel, initialised as
   StyleGAN2's: bias 1, weights N(0, 1 / code_dim)), demodulated ``w_hat = w_bar /
   sqrt(sum w_bar^2 + eps)`` over the input channels and the kernel of each output
   channel (eq. 5-6, ``demod_eps``), and ``m = conv(w_hat, f)`` (eq. 7) as one grouped
   convolution over the batch (:func:`modulated_conv2d`).
5. Output: a 3x3 convolution to (x, y, z) (started near zero), turned into unit normals
   facing the camera: ``normalize(x, y, -softplus(z) - 1e-3)``, so ``n_z < 0`` always
   and the untrained network outputs (0, 0, -1).

Losses (:meth:`ExemplarNet.loss`; terms named ``exemplar``, ``perceptual``, ``cosine``,
reported unweighted, the total is their weighted sum):

- ``exemplar``: eq. 8, smooth-L1 (Huber, ``smooth_l1_beta``) between the prediction and
  the exemplar, averaged over the components and the pixels where the proxy is known
  (0 when none is); weight ``exemplar_weight`` = lambda_ref = 1 (eq. 10).
- ``perceptual``: eq. 9, the L1 distance of features of a fixed, untrained extractor
  (:class:`FixedFeatureExtractor`: a VGG ``relu1_2``-like conv-ReLU-conv-ReLU stack with
  weights drawn from a generator seeded by ``perceptual_seed``, held as buffers so the
  optimiser never changes them) between the predicted and the ground-truth normal maps
  over the supervised region (``perceptual_target = "gt"``, our issue), or, as eq. 9
  literally, between the input image and the predicted normal map mapped to [0, 1]
  (``"image"``); weight ``perceptual_weight`` = 1 (eq. 10).
- ``cosine``: the supervised cosine loss :func:`~faceps.learn.losses.normal_loss` over
  the region (not in the paper, which trains without ground truth normals; our data have
  them); weight ``cosine_weight`` = 1 (our choice: as heavy as the paper's two terms).

Deviations from the paper: single-stage training (the paper's coarse network is our proxy,
so its first training step is not needed); the image encoder is a ResNet-18 with
GroupNorm; the perceptual features are a fixed random stack instead of a pretrained VGG19
(no downloads) and compare against the ground truth by default; the exemplar encoder
starts from the exemplar itself instead of VGG19 ``relu5_2`` features (section 4.1);
outputs are constrained to face the camera; the decoder widths (the encoder's widths at
each scale) are ours, sized for CPU training. The paper gives no code size; ``code_dim =
512`` is the size of the authors' released implementation.

Images whose sides are not multiples of 32 (the ResNet's stride), or are below 64, are
zero-padded and the output cropped back; the exemplar code is computed from the unpadded
exemplar.
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
from faceps.learn.normalnet import (
    FACING_CAMERA,
    NormalNetOutput,
    check_passes,
)
from faceps.learn.resnet import ResNet, ResNetConfig

__all__ = ["ExemplarConfig", "ExemplarNet", "ModulatedConv2d", "modulated_conv2d",
           "FixedFeatureExtractor", "exemplar_normals", "exemplar_loss", "perceptual_loss",
           "LOSS_NAMES"]

#: names of the loss terms (metrics.csv columns)
LOSS_NAMES = ("exemplar", "perceptual", "cosine")
#: the image encoder's total stride (five stride-2 stages of the ResNet)
STRIDE = 32
#: smallest padded image side: the H/32 maps keep >= 2x2 pixels (GroupNorm needs more
#: than one value per group when a group has one channel)
MIN_PADDED = 2 * STRIDE
#: std of the initial weights of the output layer (small: start at (0, 0, -1))
OUT_INIT_STD = 1e-3
#: lower bound of -n_z before normalisation (keeps the normals facing the camera)
MIN_FACING = 1e-3
#: added to the code's mean square before normalising it to unit RMS
CODE_EPS = 1e-8
NORMS = ("group", "none")
PERCEPTUAL_TARGETS = ("gt", "image")


@dataclass(frozen=True)
class ExemplarConfig:
    """Options of :class:`ExemplarNet` (module docstring for the structure).

    Attributes:
        arch: the architecture's registry name (``exemplar``).
        encoder_widths: channels of the four ResNet-18 stages of the face encoder
            (64, 128, 256, 512 is ResNet-18).
        encoder_norm: normalisation of the face encoder, ``group`` or ``none`` (no
            BatchNorm: a sample's output must not depend on its batch).
        exemplar_widths: channels of the three convolution blocks of the exemplar encoder.
        code_dim: size of the exemplar code z (the authors' implementation: 512).
        decoder_widths: output channels of the five decoder blocks at H/16, H/8, H/4, H/2
            and H (default: the widths of the encoder maps at those scales, 32 at H).
        negative_slope: of the LeakyReLU activations (0.2 as StyleGAN2).
        demod_eps: epsilon of the demodulation (eq. 5; StyleGAN2's 1e-8).
        exemplar_weight: lambda_ref of eq. 10 (paper: 1).
        perceptual_weight: weight of eq. 9 (paper: 1).
        cosine_weight: weight of the supervised cosine loss (not in the paper).
        smooth_l1_beta: where the smooth-L1 of eq. 8 turns from quadratic to linear (1 as
            PyTorch's default, used by the authors).
        perceptual_width: channels of the fixed feature extractor (VGG relu1_2 has 64;
            32 halves the loss's cost at 128 px and batch 8 on a CPU).
        perceptual_scales: image scales the extractor is applied at (1: full resolution
            only, as relu1_2; k: also 1/2, ..., 1/2^(k-1), average-pooled).
        perceptual_seed: seed of the extractor's fixed random weights.
        perceptual_target: ``gt`` (predicted vs ground-truth normals, the default) or
            ``image`` (eq. 9 literally: the input image vs the predicted normals mapped to
            [0, 1]).
        eps: added to the mean intensity before dividing by it.
    """

    arch: str = "exemplar"
    encoder_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    encoder_norm: str = "group"
    exemplar_widths: tuple[int, int, int] = (16, 32, 64)
    code_dim: int = 512
    decoder_widths: tuple[int, int, int, int, int] = (256, 128, 64, 64, 32)
    negative_slope: float = 0.2
    demod_eps: float = 1e-8
    exemplar_weight: float = 1.0
    perceptual_weight: float = 1.0
    cosine_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    perceptual_width: int = 32
    perceptual_scales: int = 1
    perceptual_seed: int = 0
    perceptual_target: str = "gt"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.arch != "exemplar":
            raise ConfigError(f"ExemplarConfig is the 'exemplar' architecture; got arch "
                              f"{self.arch!r}")
        for name, n in (("encoder_widths", 4), ("exemplar_widths", 3),
                        ("decoder_widths", 5)):
            v = _int_tuple(getattr(self, name), name)
            if len(v) != n or min(v) < 1:
                raise ConfigError(f"{name} must be {n} channel counts >= 1; got {v}")
            object.__setattr__(self, name, v)
        for name in ("code_dim", "perceptual_width", "perceptual_scales"):
            v = _integer(getattr(self, name), name)
            if v < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {v!r}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "perceptual_seed",
                           _integer(self.perceptual_seed, "perceptual_seed"))
        if self.encoder_norm not in NORMS:
            raise ConfigError(f"encoder_norm must be one of {NORMS}; got "
                              f"{self.encoder_norm!r}")
        if self.perceptual_target not in PERCEPTUAL_TARGETS:
            raise ConfigError(f"perceptual_target must be one of {PERCEPTUAL_TARGETS}; got "
                              f"{self.perceptual_target!r}")
        if not 0 <= _real(self.negative_slope, "negative_slope") < 1:
            raise ConfigError(f"negative_slope must be in [0, 1); got {self.negative_slope}")
        for name in ("demod_eps", "eps"):
            if not _real(getattr(self, name), name) > 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)!r}")
        for name in ("exemplar_weight", "perceptual_weight", "cosine_weight",
                     "smooth_l1_beta"):
            if not _real(getattr(self, name), name) >= 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if self.exemplar_weight + self.perceptual_weight + self.cosine_weight <= 0:
            raise ConfigError("at least one of exemplar_weight, perceptual_weight and "
                              "cosine_weight must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _real(value: object, name: str) -> float:
    """``value`` as a finite float; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _integer(value: object, name: str) -> int:
    """``value`` as an int (integral floats accepted); ConfigError otherwise."""
    v = _real(value, name)
    if v != int(v):
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    return int(v)


def _int_tuple(value: object, name: str) -> tuple[int, ...]:
    if isinstance(value, str | bytes):
        raise ConfigError(f"{name} must be a sequence of channel counts; got {value!r}")
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of channel counts; got {value!r}") \
            from None
    return tuple(_integer(v, name) for v in items)


# ------------------------------------------------------------------ modulation
def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, eps: float = 1e-8,
                     padding: int | None = None) -> torch.Tensor:
    """StyleGAN2 modulated convolution with per-sample weights (HFFNE eq. 4-7).

    ``w_bar[b, o, i] = weight[o, i] * styles[b, i]`` (the caller folds the eq. 4 scale
    ``s`` into ``weight`` or ``styles``); with ``demodulate``, ``w_hat[b, o] = w_bar[b, o]
    / sqrt(sum_{i, kh, kw} w_bar[b, o]^2 + eps)`` (eq. 5-6); then each sample is convolved
    with its own weights (eq. 7), computed as one grouped convolution with the batch folded
    into the channels.

    Args:
        x: (B, C_in, H, W) features.
        weight: (C_out, C_in, K, K) base weights.
        styles: (B, C_in) per-sample modulation of the input channels.
        demodulate: normalise each output filter to unit norm (eq. 5).
        eps: the demodulation epsilon.
        padding: zero padding (default K // 2: same size for odd K).

    Returns:
        (B, C_out, H', W') (H' = H, W' = W with the default padding and odd K).
    """
    check_shape(weight, "weight", ("O", "C", "K", "K"))
    C = weight.shape[1]
    check_shape(x, "x", (None, C, None, None))
    B = x.shape[0]
    check_shape(styles, "styles", (B, C))
    O, _, K, _ = weight.shape
    w = weight.unsqueeze(0) * styles[:, None, :, None, None]  # (B, O, C, K, K)
    if demodulate:
        w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + eps)
    pad = K // 2 if padding is None else int(padding)
    H, W = x.shape[-2:]
    out = F.conv2d(x.reshape(1, B * C, H, W), w.reshape(B * O, C, K, K), padding=pad,
                   groups=B)
    return out.reshape(B, O, *out.shape[-2:])


class ModulatedConv2d(nn.Module):
    """A convolution whose weights are modulated by a code (HFFNE section 3.2).

    ``forward(x, code)``: (B, in_ch, H, W), (B, code_dim) -> (B, out_ch, H, W) (odd
    ``kernel_size``): eq. 4 with ``s = 1 / sqrt(in_ch K^2)`` and ``F_Linear`` a linear map
    of the code to one style per input channel (initialised as StyleGAN2's: styles
    1 + N(0, 1) for a unit-RMS code), eq. 5-7 by :func:`modulated_conv2d`, plus a learnt
    bias per output channel.
    """

    def __init__(self, in_ch: int, out_ch: int, code_dim: int, kernel_size: int = 3,
                 demod_eps: float = 1e-8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size ** 2)
        self.affine = nn.Linear(code_dim, in_ch)
        # StyleGAN2's affine layers: styles 1 + N(0, 1) for a code of unit RMS
        nn.init.normal_(self.affine.weight, std=1.0 / math.sqrt(code_dim))
        nn.init.ones_(self.affine.bias)
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.demod_eps = float(demod_eps)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        styles = self.affine(code)
        out = modulated_conv2d(x, self.weight * self.scale, styles, eps=self.demod_eps)
        return out + self.bias[None, :, None, None]


class ExemplarEncoder(nn.Module):
    """``E_R`` (eq. 1): (B, 3, H, W) exemplar normals -> (B, code_dim) code z, normalised
    to unit root-mean-square (as StyleGAN2 normalises its latent), so the modulation is
    effective from the start (:class:`ModulatedConv2d`)."""

    def __init__(self, widths: tuple[int, int, int], code_dim: int, slope: float):
        super().__init__()
        e0, e1, e2 = widths
        self.blocks = nn.Sequential(
            nn.Conv2d(3, e0, 3, 1, 1), nn.LeakyReLU(slope, True),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(e0, e1, 3, 1, 1), nn.LeakyReLU(slope, True),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(e1, e2, 3, 1, 1), nn.LeakyReLU(slope, True),
            nn.AdaptiveAvgPool2d(1))
        self.to_code = nn.Linear(e2, code_dim)
        for m in self.blocks:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=slope, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def forward(self, exemplar: torch.Tensor) -> torch.Tensor:
        code = self.to_code(torch.flatten(self.blocks(exemplar), 1))
        return code * torch.rsqrt(code.pow(2).mean(dim=1, keepdim=True) + CODE_EPS)


class DecoderBlock(nn.Module):
    """One step of eq. 3: ``F_i(D_i(d, f))``: upsample d by 2, concatenate the skip
    features f, fuse (1x1 conv + LeakyReLU), modulated 3x3 conv + LeakyReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, code_dim: int, slope: float,
                 demod_eps: float):
        super().__init__()
        self.fuse = nn.Sequential(nn.Conv2d(in_ch + skip_ch, out_ch, 1),
                                  nn.LeakyReLU(slope, True))
        self.modulated = ModulatedConv2d(out_ch, out_ch, code_dim, 3, demod_eps)
        self.act = nn.LeakyReLU(slope, True)

    def forward(self, d: torch.Tensor, skip: torch.Tensor, code: torch.Tensor
                ) -> torch.Tensor:
        d = F.interpolate(d, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.act(self.modulated(self.fuse(torch.cat([d, skip], 1)), code))


# ------------------------------------------------------------------ perceptual features
class FixedFeatureExtractor(nn.Module):
    """A fixed stand-in for VGG19 ``relu1_2`` (HFFNE eq. 9): conv3x3-ReLU-conv3x3-ReLU
    with weights drawn once (He-normal, uniform biases as PyTorch's default) from a
    generator seeded by ``seed``, so the features are reproducible and need no download.
    The weights are buffers: saved with the network, never seen by the optimiser.

    ``forward(x)``: (B, in_ch, H, W) -> a list of ``scales`` maps (B, width, H/2^s, W/2^s),
    the stack applied to the input average-pooled by 2^s (s = 0, ..., scales - 1).
    """

    def __init__(self, in_ch: int = 3, width: int = 16, scales: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.scales = int(scales)
        for j, (cin, cout) in enumerate(((in_ch, width), (width, width)), start=1):
            fan_in = cin * 9
            self.register_buffer(f"w{j}", torch.randn(cout, cin, 3, 3, generator=g)
                                 * math.sqrt(2.0 / fan_in))
            self.register_buffer(f"b{j}", (torch.rand(cout, generator=g) * 2 - 1)
                                 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for s in range(self.scales):
            xs = F.avg_pool2d(x, 2 ** s, ceil_mode=True) if s else x
            h = F.relu(F.conv2d(xs, self.w1, self.b1, padding=1))
            feats.append(F.relu(F.conv2d(h, self.w2, self.b2, padding=1)))
        return feats


# ------------------------------------------------------------------ loss terms
def exemplar_normals(proxy_normals: torch.Tensor, proxy_mask: torch.Tensor | None
                     ) -> torch.Tensor:
    """The exemplar R: the proxy normals (unit) where known, (0, 0, -1) elsewhere.

    Args:
        proxy_normals: (B, 3, H, W).
        proxy_mask: (B, H, W), nonzero where the proxy is known; None: where the proxy
            normals are longer than 0.5.

    Returns:
        (B, 3, H, W) unit normals.
    """
    check_shape(proxy_normals, "proxy_normals", (None, 3, "H", "W"))
    known = _known(proxy_normals, proxy_mask).unsqueeze(1).to(proxy_normals.dtype)
    facing = torch.tensor(FACING_CAMERA, dtype=proxy_normals.dtype,
                          device=proxy_normals.device)[None, :, None, None]
    r = proxy_normals * known + facing * (1 - known)
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _known(proxy_normals: torch.Tensor, proxy_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) bool: where the proxy is known."""
    if proxy_mask is None:
        return proxy_normals.norm(dim=1) > 0.5
    B, _, H, W = proxy_normals.shape
    check_shape(proxy_mask, "proxy_mask", (B, H, W))
    return proxy_mask > 0


def exemplar_loss(pred: torch.Tensor, exemplar: torch.Tensor, mask: torch.Tensor,
                  beta: float = 1.0) -> torch.Tensor:
    """Eq. 8: smooth-L1 between predicted and exemplar normals.

    Args:
        pred, exemplar: (B, 3, H, W); mask: (B, H, W), nonzero where the exemplar is known.
        beta: the smooth-L1 threshold (0: plain L1).

    Returns:
        scalar: the mean over components and mask pixels (0 when the mask is empty).
    """
    check_shape(pred, "pred", (None, 3, "H", "W"))
    check_shape(exemplar, "exemplar", tuple(pred.shape))
    B, _, H, W = pred.shape
    check_shape(mask, "mask", (B, H, W))
    per_pixel = F.smooth_l1_loss(pred, exemplar, reduction="none", beta=beta).mean(1)
    w = (mask > 0).to(per_pixel.dtype)
    return (per_pixel * w).sum() / w.sum().clamp_min(1.0)


def perceptual_loss(extractor: FixedFeatureExtractor, pred: torch.Tensor,
                    target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 9 over a region: mean L1 distance of the extractor's features of the masked
    maps, over the pixels each scale's features see of the region, averaged over scales.

    Args:
        extractor: the fixed feature stack.
        pred, target: (B, C, H, W) maps (outside the mask they are zeroed first, so only
            the region contributes).
        mask: (B, H, W), nonzero inside the region.

    Returns:
        scalar (0 when the mask is empty).
    """
    check_shape(pred, "pred", (None, None, "H", "W"))
    check_shape(target, "target", tuple(pred.shape))
    B, _, H, W = pred.shape
    check_shape(mask, "mask", (B, H, W))
    m = (mask > 0).to(pred.dtype).unsqueeze(1)
    total = pred.new_zeros(())
    fp = extractor(pred * m)
    with torch.no_grad():  # the target is data (nothing to learn through it)
        ft = extractor(target * m)
    for s, (a, b) in enumerate(zip(fp, ft)):
        w = F.avg_pool2d(m, 2 ** s, ceil_mode=True) if s else m
        w = (w > 0).to(a.dtype)
        total = total + ((a - b).abs().mean(1, keepdim=True) * w).sum() \
            / w.sum().clamp_min(1.0)
    return total / len(fp)


# ------------------------------------------------------------------ the network
class ExemplarNet(nn.Module):
    """HFFNE: normals from one image and the proxy normal map as coarse exemplar.

    ``forward(images, proxy_normals, image_mask=None, proxy_mask=None, *, passes=1)``:

    Args:
        images: (B, k, 3, H, W) linear intensities (or (B, 3, H, W)); only each sample's
            first valid image (``image_mask``) is read.
        proxy_normals: (B, 3, H, W) unit proxy normals, camera frame (any value where
            unknown).
        image_mask: (B, k) bool, True for real images; None: all.
        proxy_mask: (B, H, W), nonzero where the proxy normals are known; None: where their
            length exceeds 0.5.
        passes: must be 1 (a ConfigError otherwise).

    Returns:
        :class:`~faceps.learn.normalnet.NormalNetOutput` with unit normals (B, 3, H, W)
        facing the camera (``stages`` = [normals]).
    """

    #: reads one image per sample (:mod:`faceps.learn.archs`)
    single_image = True
    #: reads the proxy normals (the exemplar)
    uses_proxy = True

    def __init__(self, config: ExemplarConfig | None = None):
        super().__init__()
        self.config = c = config or ExemplarConfig()
        slope = c.negative_slope
        self.image_encoder = ResNet(ResNetConfig(in_channels=3, num_classes=None,
                                                 widths=c.encoder_widths,
                                                 norm=c.encoder_norm))
        self.exemplar_encoder = ExemplarEncoder(c.exemplar_widths, c.code_dim, slope)
        w0, w1, w2, w3 = c.encoder_widths
        # skip features of the blocks at H/16, H/8, H/4, H/2 (stem) and H (the image)
        skips = (w2, w1, w0, w0, 3)
        blocks = []
        in_ch = w3
        for skip, out in zip(skips, c.decoder_widths):
            blocks.append(DecoderBlock(in_ch, skip, out, c.code_dim, slope, c.demod_eps))
            in_ch = out
        self.decoder = nn.ModuleList(blocks)
        self.out = nn.Conv2d(in_ch, 3, 3, 1, 1)
        nn.init.normal_(self.out.weight, std=OUT_INIT_STD)
        nn.init.zeros_(self.out.bias)
        self.perceptual = FixedFeatureExtractor(3, c.perceptual_width,
                                                c.perceptual_scales, c.perceptual_seed)

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the terms :meth:`loss` reports (metrics.csv columns)."""
        return LOSS_NAMES

    def forward(self, images: torch.Tensor, proxy_normals: torch.Tensor,
                image_mask: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, *, passes: int = 1
                ) -> NormalNetOutput:
        """See the class docstring."""
        if check_passes(passes) != 1:
            raise ConfigError("the exemplar architecture runs one pass (passes = 1)")
        c = self.config
        if images.ndim == 4:
            images = images.unsqueeze(1)
        check_shape(images, "images", (None, None, 3, "H", "W"))
        B, k, _, H, W = images.shape
        check_shape(proxy_normals, "proxy_normals", (B, 3, H, W))
        if image_mask is not None:
            check_shape(image_mask, "image_mask", (B, k))
            if not bool(image_mask.to(torch.bool).any(dim=1).all()):
                raise ShapeError("every sample needs at least one valid image (image_mask)")
        x = single_input_image(images, image_mask, c.eps)
        code = self.exemplar_encoder(exemplar_normals(proxy_normals, proxy_mask))

        ph, pw = max((-H) % STRIDE, MIN_PADDED - H), max((-W) % STRIDE, MIN_PADDED - W)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        stem, f1, f2, f3, f4 = self.image_encoder.features(x)
        d = f4
        for block, skip in zip(self.decoder, (f3, f2, f1, stem, x)):
            d = block(d, skip, code)
        raw = self.out(d)[:, :, :H, :W]
        n = torch.cat([raw[:, :2], -F.softplus(raw[:, 2:]) - MIN_FACING], 1)
        n = n / n.norm(dim=1, keepdim=True)
        return NormalNetOutput(normals=n, stages=[n])

    def loss(self, out: NormalNetOutput, gt: torch.Tensor, region: torch.Tensor,
             inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss ``w_e L_exemplar + w_p L_perceptual + w_c L_cosine`` (module
        docstring) of a batch.

        Args:
            out: the forward output; gt: (B, 3, H, W) ground-truth normals; region: (B, H,
                W) float, 1 where supervised; inputs: the network inputs (the exemplar is
                rebuilt from ``proxy_normals`` and ``proxy_mask``; ``images`` and
                ``image_mask`` for ``perceptual_target = "image"``).

        Returns:
            (total, terms): the scalar loss and the unweighted terms named
            :attr:`loss_names` (a term whose weight is 0 is not computed and reported as 0).
        """
        c = self.config
        n = out.normals
        check_shape(n, "out.normals", (None, 3, "H", "W"))
        check_shape(gt, "gt", tuple(n.shape))
        check_shape(region, "region", (n.shape[0],) + tuple(n.shape[2:]))
        zero = n.new_zeros(())
        terms = {name: zero for name in LOSS_NAMES}
        if c.exemplar_weight > 0:
            known = _known(inputs.proxy_normals, inputs.proxy_mask)
            terms["exemplar"] = exemplar_loss(
                n, exemplar_normals(inputs.proxy_normals, inputs.proxy_mask), known,
                c.smooth_l1_beta)
        if c.perceptual_weight > 0:
            if c.perceptual_target == "gt":
                terms["perceptual"] = perceptual_loss(self.perceptual, n, gt, region)
            else:
                image = single_input_image(inputs.images, inputs.image_mask, c.eps)
                terms["perceptual"] = perceptual_loss(self.perceptual, n / 2 + 0.5, image,
                                                      region)
        if c.cosine_weight > 0:
            terms["cosine"] = normal_loss(n, gt, region)
        total = (c.exemplar_weight * terms["exemplar"] + c.perceptual_weight
                 * terms["perceptual"] + c.cosine_weight * terms["cosine"])
        return total, terms
