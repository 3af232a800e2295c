"""Cross-modal face normals with deactivable skip connections
(``papers/cross-modal-face-normal.txt``), the ``crossmodal`` architecture.

Structure (section 3.1, Fig. 2; section 4.1 for the encoders):

1. Two encoders, one per modality, with the same layout: an image encoder E_I (input: the
   first valid image of the sample divided by its mean intensity, as
   :func:`~faceps.learn.normalnet.normalize_images`) and a normal encoder E_N (input: a
   normal map, zero outside the face region). Each is a ResNet-18
   (:class:`~faceps.learn.resnet.ResNet`, GroupNorm) whose five multi-scale maps are
   kept: the stem output (H/2) and the outputs of the four residual stages (H/4 .. H/32),
   "one at the output of the initial layer and the rest at the output of each of the four
   residual blocks" (section 4.1). A 1x1 convolution (``to_latent``) maps the last map to
   the latent code z (B, ``latent_channels``, H/32, W/32); both encoders write into this
   one shared latent space.
2. Two decoders with the same layout: D_N (normals) and D_I (images). From z, five levels
   (H/32, H/16, H/8, H/4, H/2) each compute processed features f(F_D) with
   ``c_i + m_i`` channels, where m_i is the width of the encoder map of that scale and
   c_i the decoder's own width (``decoder_widths``); the first level is a 3x3
   convolution, the others 4x4 stride-2 transposed convolutions, each followed by
   GroupNorm and ReLU. A last transposed convolution back to H and a 3x3 convolution give
   the output: for D_N a unit normal facing the camera (n_z = -(softplus(r_z) + 1e-3)
   before normalisation, so n_z < 0, DESIGN.md), for D_I the normalised image (linear).
3. Deactivable skip connections (section 3.2, Fig. 3b), E_I -> D_N only: at each level of
   D_N, when the skips are on, the last m_i channels of f(F_D) are replaced by their
   element-wise maximum with the E_I map of that scale (:func:`max_fuse`), the first c_i
   channels are kept; when off, F_D = f(F_D) unchanged. So switching them off changes no
   layer shape and D_N stays one network for both uses. D_I has no skip connections
   (none are set within a modality: an auto-encoder with them would learn to copy).

Passes: image -> normal (E_I, z, D_N, skips on) is the inference path, :meth:`forward`;
image -> image (E_I, z, D_I, no skips); normal -> normal (E_N, z, D_N, skips off).

Losses (section 3.3): eq. 1, the cosine distance ``1 - n . n_gt`` averaged over the face
region (:func:`~faceps.learn.losses.normal_loss`), for the image-to-normal and the
normal-to-normal passes; eq. 2, the squared L2 error of the reconstructed image, here the
mean over the face region's pixels and the three channels of the normalised image, for
the image-to-image pass. All three are named in ``loss_names``: ``image_to_normal``,
``image_to_image``, ``normal_to_normal``.

Batch types and their schedule (section 3.3 last paragraph, section 4.1 and 4.2). The
paper trains on three kinds of mini-batches, each of one type only:

- paired (image + ground-truth normals): "a normal-to-normal iteration first, followed by
  an image-to-normal plus image-to-image iteration, where both losses in the latter
  iteration are summed with equal weights";
- image only: an image-to-image iteration;
- normal only: a normal-to-normal iteration.

Our data is always paired and the trainer makes one optimiser step per :meth:`loss` call,
so :meth:`loss` plays the paper's stream of batches from the step count ``inputs.step``.
Each step has one of three step types, and a step uses only what its batch type would
have:

=========  =================================================  ====================
step type  total loss                                          parameters it trains
=========  =================================================  ====================
paired     image_to_normal + image_weight * image_to_image     E_I, D_N, D_I
image      image_weight * image_to_image                       E_I, D_I
normal     normal_to_normal (D_N with the skips off)           E_N, D_N
=========  =================================================  ====================

The terms a step does not compute are reported as 0. The schedule (:func:`batch_schedule`)
is a cycle of batches: ``mix = (p, i, n)`` paired, image-only and normal-only batches,
spread evenly over the cycle (batch kind t takes the positions (k + 1/2) / count_t,
k = 0 .. count_t - 1, ties in the order paired, image, normal); with ``paired_normal_first``
(the paper) each paired batch becomes two steps, ``normal`` then ``paired``. Step s has the
type of position ``s mod len(cycle)``. The default ``mix = (17, 10, 6)`` is the paper's
training set (section 4.2: 8625 ICT-3DRFE pairs, 5000 CelebA-HQ images, 3000 BJUT-3D
normal maps, i.e. one epoch's batches in the ratio 8625 : 5000 : 3000 ~ 17 : 10 : 6), so
the cycle has 50 steps: 17 paired, 10 image and 23 normal steps, beginning
``normal, paired, image, normal, normal, paired, ...``.

Outside training mode (validation) :meth:`loss` computes the paired terms whatever the
step, so validation losses are comparable across steps.

Choices the paper leaves open: the decoder widths (default c_i = m_i / 2; set
``decoder_widths = (64, 64, 128, 256, 512)`` for the symmetric U-Net widths, about 1.5
times the decoder cost), the layer types of the decoders, the 1x1 projection to the
latent code, the constraint n_z < 0 and the normalisation of the image by its mean
intensity (our conventions), and GroupNorm (the paper does not say which normalisation its
ResNet-18 uses). The mixing ratio is not stated as such: the default follows from the
paper's training-set sizes, one batch per sample group. The trainer always runs
:meth:`CrossModalNet.forward` before :meth:`CrossModalNet.loss`: in ``normal`` steps that
image-to-normal pass is computed but not used (it carries no gradient).

Sizes that are not multiples of 32 (the encoders' stride) are zero-padded and cropped
back. No batch normalisation: a sample's output does not depend on its batch.
"""

from __future__ import annotations

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

__all__ = ["CrossModalConfig", "CrossModalOutput", "CrossModalNet", "ModalityEncoder",
           "ModalityDecoder", "max_fuse", "batch_schedule", "masked_image_loss",
           "STEP_TYPES", "LOSS_NAMES"]

#: the step types of the schedule (module docstring)
STEP_TYPES = ("paired", "image", "normal")
#: the loss terms, one per pass
LOSS_NAMES = ("image_to_normal", "image_to_image", "normal_to_normal")
#: the encoders' total stride (ResNet-18: stem 2, max pool 2, three stride-2 stages)
STRIDE = 32
#: NORMS of the layers (no BatchNorm: outputs must not depend on the batch)
NORMS = ("group", "none")
#: n_z = -(softplus(r_z) + FACING_MARGIN) before normalisation: always facing the camera
FACING_MARGIN = 1e-3
#: bias of the raw z output so that softplus(bias) = 1: an untrained network leans to
#: (0, 0, -1)
Z_BIAS = 0.5413248546129181


@dataclass(frozen=True)
class CrossModalConfig:
    """Options of :class:`CrossModalNet`.

    Attributes:
        arch: the architecture's registry name (:mod:`faceps.learn.archs`).
        widths: channels of the four residual stages of both ResNet encoders (ResNet-18:
            64, 128, 256, 512; the stem has widths[0]).
        blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18).
        decoder_widths: the decoders' own channels c_i at H/2, H/4, H/8, H/16, H/32 (each
            level has c_i plus the encoder width m_i of its scale, the channels the skip
            fuses into); None: half the encoder widths, (w0, w0, w1, w2, w3) // 2.
        latent_channels: channels of the shared latent code (H/32); None: widths[3].
        head_width: channels of the last, full-resolution decoder features.
        norm: ``group`` (GroupNorm) or ``none``, for encoders and decoders.
        mix: paired, image-only and normal-only batches per schedule cycle (module
            docstring); the paper's training set gives (17, 10, 6). Paired must be >= 1.
        paired_normal_first: a paired batch is a normal-to-normal step followed by a
            paired step (the paper); False: the paired step only.
        image_weight: weight of the image-to-image term (the paper: 1, equal weights).
        eps: added to the mean intensity before dividing by it.
    """

    arch: str = "crossmodal"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    decoder_widths: tuple[int, int, int, int, int] | None = None
    latent_channels: int | None = None
    head_width: int = 32
    norm: str = "group"
    mix: tuple[int, int, int] = (17, 10, 6)
    paired_normal_first: bool = True
    image_weight: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.arch != "crossmodal":
            raise ConfigError(f"CrossModalConfig is the 'crossmodal' architecture; got arch "
                              f"{self.arch!r}")
        s(self, "widths", _ints(self.widths, "widths", 4, 1))
        s(self, "blocks", _ints(self.blocks, "blocks", 4, 1))
        if self.decoder_widths is not None:
            s(self, "decoder_widths", _ints(self.decoder_widths, "decoder_widths", 5, 1))
        if self.latent_channels is not None:
            s(self, "latent_channels", _ints((self.latent_channels,), "latent_channels",
                                             1, 1)[0])
        s(self, "head_width", _ints((self.head_width,), "head_width", 1, 1)[0])
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}; got {self.norm!r}")
        mix = _ints(self.mix, "mix", 3, 0)
        if mix[0] < 1:
            raise ConfigError(f"mix needs at least one paired batch per cycle (the only "
                              f"supervised image-to-normal step); got {mix}")
        s(self, "mix", mix)
        if not isinstance(self.paired_normal_first, bool):
            raise ConfigError(f"paired_normal_first must be a bool; got "
                              f"{self.paired_normal_first!r}")
        for name in ("image_weight", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0 \
                    or v == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")
            s(self, name, float(v))

    @property
    def encoder_channels(self) -> tuple[int, int, int, int, int]:
        """Widths m_i of the five encoder maps (H/2 .. H/32)."""
        w = self.widths
        return (w[0], w[0], w[1], w[2], w[3])

    @property
    def resolved_decoder_widths(self) -> tuple[int, int, int, int, int]:
        """``decoder_widths`` with None resolved (H/2 .. H/32)."""
        if self.decoder_widths is not None:
            return self.decoder_widths
        return tuple(max(1, m // 2) for m in self.encoder_channels)

    @property
    def resolved_latent_channels(self) -> int:
        return self.widths[3] if self.latent_channels is None else self.latent_channels

    def to_dict(self) -> dict:
        return asdict(self)


def _ints(values: object, name: str, n: int, low: int) -> tuple[int, ...]:
    try:
        v = tuple(values)
    except TypeError:
        raise ConfigError(f"{name} must be {n} integers >= {low}; got {values!r}") from None
    if len(v) != n or any(isinstance(x, bool) or not isinstance(x, numbers.Integral)
                          or x < low for x in v):
        raise ConfigError(f"{name} must be {n} integers >= {low}; got {values!r}")
    return tuple(int(x) for x in v)


def batch_schedule(mix: tuple[int, int, int], paired_normal_first: bool = True
                   ) -> tuple[str, ...]:
    """One cycle of step types (module docstring, "Batch types and their schedule").

    Args:
        mix: paired, image-only and normal-only batches per cycle (>= 0, paired >= 1).
        paired_normal_first: expand each paired batch into the steps ``normal``,
            ``paired`` (the paper's normal-to-normal iteration before the
            image-to-normal plus image-to-image one).

    Returns:
        the step types (``paired``, ``image`` or ``normal``) of one cycle, in order.
    """
    counts = _ints(mix, "mix", 3, 0)
    if counts[0] < 1:
        raise ConfigError(f"mix needs at least one paired batch; got {counts}")
    slots = sorted(((k + 0.5) / c, t) for t, c in enumerate(counts) for k in range(c))
    steps: list[str] = []
    for _, t in slots:
        if t == 0 and paired_normal_first:
            steps.append("normal")
        steps.append(STEP_TYPES[t])
    return tuple(steps)


def max_fuse(decoder_features: torch.Tensor, encoder_features: torch.Tensor | None
             ) -> torch.Tensor:
    """A deactivable skip connection (section 3.2, Fig. 3b).

    Args:
        decoder_features: (B, c + m, H, W) the processed decoder features f(F_D).
        encoder_features: (B, m, H, W) the encoder map of the same scale, or None when the
            skip is off.

    Returns:
        (B, c + m, H, W): the first c channels unchanged and the last m the element-wise
        maximum with the encoder map; ``decoder_features`` itself when the skip is off.
    """
    if encoder_features is None:
        return decoder_features
    B, C, H, W = decoder_features.shape
    m = encoder_features.shape[1]
    check_shape(encoder_features, "encoder_features", (B, None, H, W))
    if m > C:
        raise ShapeError(f"a skip of {m} channels cannot fuse into {C} decoder channels")
    keep, fuse = decoder_features[:, :C - m], decoder_features[:, C - m:]
    return torch.cat([keep, torch.maximum(fuse, encoder_features)], 1)


def masked_image_loss(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor
                      ) -> torch.Tensor:
    """Eq. 2 over the face region: mean squared error per pixel and channel.

    Args:
        pred, target: (B, 3, H, W) images.
        region: (B, H, W), nonzero on the pixels to count.

    Returns:
        scalar (0 when the region is empty).
    """
    check_shape(pred, "pred", (None, 3, "H", "W"))
    check_shape(target, "target", tuple(pred.shape))
    check_shape(region, "region", (pred.shape[0], pred.shape[2], pred.shape[3]))
    w = (region > 0).to(pred.dtype)
    err = ((pred - target) ** 2).mean(1)
    return (err * w).sum() / w.sum().clamp_min(1.0)


@dataclass
class CrossModalOutput(NormalNetOutput):
    """Prediction of :class:`CrossModalNet` (a :class:`NormalNetOutput`).

    Attributes:
        latent: (B, latent_channels, Hp/32, Wp/32) the image encoder's latent code (Hp,
            Wp: the size padded to a multiple of 32), reused by :meth:`CrossModalNet.loss`
            for the image-to-image pass of the same batch; None when not kept.
        image: (B, 3, H, W) the sample's normalised input image (the image-to-image
            target), or None.
    """

    latent: torch.Tensor | None = None
    image: torch.Tensor | None = None


class ModalityEncoder(nn.Module):
    """ResNet-18 encoder of one modality with its projection to the shared latent space.

    ``forward(x)``: x (B, 3, H, W) with H, W multiples of 32 -> (z, maps): z (B, L, H/32,
    W/32) the latent code and maps the five ResNet maps (H/2 .. H/32) the skips carry.
    """

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        c = config
        self.resnet = ResNet(ResNetConfig(in_channels=3, num_classes=None, widths=c.widths,
                                          blocks=c.blocks, norm=c.norm))
        self.to_latent = nn.Conv2d(c.widths[3], c.resolved_latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = self.resnet.features(x)
        return self.to_latent(maps[-1]), maps


def _block(layer: nn.Module, channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(layer, make_norm(norm, channels), nn.ReLU(inplace=True))


class ModalityDecoder(nn.Module):
    """Decoder from the shared latent code, with deactivable skip connections.

    ``forward(z, skips=None)``: z (B, L, h, w) -> (B, 3, 32 h, 32 w) raw output (the
    caller maps it to normals or an image). ``skips``: the five encoder maps (H/2 ..
    H/32) to fuse (:func:`max_fuse`) into the last m_i channels of each level, or None
    (off).
    """

    def __init__(self, config: CrossModalConfig):
        super().__init__()
        c = config
        m = c.encoder_channels
        total = [ci + mi for ci, mi in zip(c.resolved_decoder_widths, m)]
        self.skip_channels = m
        self.level_channels = tuple(total)
        norm = c.norm
        bias = norm == "none"
        # levels from the deepest (H/32) to H/2; index i of the lists = scale H/2^(i+1)
        levels = [_block(nn.Conv2d(c.resolved_latent_channels, total[4], 3, 1, 1,
                                   bias=bias), total[4], norm)]
        for i in (3, 2, 1, 0):
            levels.append(_block(nn.ConvTranspose2d(total[i + 1], total[i], 4, 2, 1,
                                                    bias=bias), total[i], norm))
        self.levels = nn.ModuleList(levels)
        self.head = nn.Sequential(
            _block(nn.ConvTranspose2d(total[0], c.head_width, 4, 2, 1, bias=bias),
                   c.head_width, norm),
            nn.Conv2d(c.head_width, 3, 3, 1, 1))

    def forward(self, z: torch.Tensor, skips: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        if skips is not None and len(skips) != 5:
            raise ShapeError(f"expected five skip maps; got {len(skips)}")
        x = z
        for j, level in enumerate(self.levels):       # j = 0 is H/32, j = 4 is H/2
            x = max_fuse(level(x), None if skips is None else skips[4 - j])
        return self.head(x)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _pad(x: torch.Tensor) -> torch.Tensor:
    ph, pw = (-x.shape[-2]) % STRIDE, (-x.shape[-1]) % STRIDE
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class CrossModalNet(nn.Module):
    """Cross-modal encoder-decoder pairs with deactivable skips (module docstring).

    ``forward(images, proxy_normals, image_mask=None, proxy_mask=None, *, passes=1)``: the
    image-to-normal path (E_I, D_N, skips on).

    Args:
        images: (B, k, 3, H, W) linear intensities (or (B, 3, H, W)); only each sample's
            first valid image (``image_mask``) is read.
        proxy_normals, proxy_mask: ignored (the architecture reads no proxy).
        image_mask: (B, k) bool, True for real images; None: all.
        passes: must be 1 (one pass is all this architecture has).

    Returns:
        :class:`CrossModalOutput` with unit normals (B, 3, H, W), n_z < 0, one stage, the
        latent code and the normalised input image.
    """

    #: one image per sample (:mod:`faceps.learn.archs`)
    single_image = True
    #: the proxy normals are not read
    uses_proxy = False

    def __init__(self, config: CrossModalConfig | None = None):
        super().__init__()
        self.config = c = config or CrossModalConfig()
        self.image_encoder = ModalityEncoder(c)
        self.normal_encoder = ModalityEncoder(c)
        self.normal_decoder = ModalityDecoder(c)
        self.image_decoder = ModalityDecoder(c)
        with torch.no_grad():                       # lean to (0, 0, -1) when untrained
            self.normal_decoder.head[-1].bias.copy_(torch.tensor([0.0, 0.0, Z_BIAS]))
        self._schedule = batch_schedule(c.mix, c.paired_normal_first)

    @property
    def loss_names(self) -> tuple[str, ...]:
        return LOSS_NAMES

    @property
    def schedule(self) -> tuple[str, ...]:
        """One cycle of step types (:func:`batch_schedule`)."""
        return self._schedule

    def batch_type(self, step: int) -> str:
        """The step type (``paired``, ``image`` or ``normal``) of optimiser step ``step``
        (steps done before it)."""
        return self._schedule[int(step) % len(self._schedule)]

    # ------------------------------------------------------------ the passes
    def input_image(self, images: torch.Tensor, image_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, 3, H, W): each sample's first valid image divided by its mean intensity."""
        return single_input_image(images, image_mask, self.config.eps)

    def decode_normals(self, z: torch.Tensor, skips: list[torch.Tensor] | None
                       ) -> torch.Tensor:
        """D_N: unit normals facing the camera (B, 3, 32 h, 32 w) from a latent code;
        ``skips`` the E_I maps (on) or None (off)."""
        r = self.normal_decoder(z, skips)
        nz = -(F.softplus(r[:, 2:3]) + FACING_MARGIN)
        return _unit(torch.cat([r[:, :2], nz], 1))

    def image_to_normal(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E_I -> z -> D_N with the skips on.

        Args:
            image: (B, 3, H, W) normalised image.

        Returns:
            (normals (B, 3, H, W), latent z).
        """
        H, W = image.shape[-2:]
        z, maps = self.image_encoder(_pad(image))
        return self.decode_normals(z, maps)[:, :, :H, :W], z

    def image_to_image(self, image: torch.Tensor | None = None, *,
                       latent: torch.Tensor | None = None,
                       size: tuple[int, int] | None = None) -> torch.Tensor:
        """E_I -> z -> D_I (no skips): the reconstructed normalised image (B, 3, H, W).

        Args:
            image: (B, 3, H, W) normalised image; or
            latent: its latent code (as :attr:`CrossModalOutput.latent`) with the output
                ``size`` (H, W).
        """
        if latent is None:
            if image is None:
                raise ShapeError("image_to_image needs an image or a latent code")
            size = tuple(image.shape[-2:])
            latent, _ = self.image_encoder(_pad(image))
        elif size is None:
            raise ShapeError("image_to_image from a latent code needs the output size")
        H, W = size
        return self.image_decoder(latent)[:, :, :H, :W]

    def normal_to_normal(self, normals: torch.Tensor) -> torch.Tensor:
        """E_N -> z -> D_N with the skips off.

        Args:
            normals: (B, 3, H, W) normal map (zero where there is no surface).

        Returns:
            (B, 3, H, W) unit normals facing the camera.
        """
        check_shape(normals, "normals", (None, 3, None, None))
        H, W = normals.shape[-2:]
        z, _ = self.normal_encoder(_pad(normals))    # its maps are never used: no skips
        return self.decode_normals(z, None)[:, :, :H, :W]

    def forward(self, images: torch.Tensor, proxy_normals: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, *, passes: int = 1
                ) -> CrossModalOutput:
        """See the class docstring."""
        if check_passes(passes) != 1:
            raise ConfigError(f"the crossmodal architecture has one pass; got passes "
                              f"{passes}")
        x = self.input_image(images, image_mask)
        n, z = self.image_to_normal(x)
        return CrossModalOutput(normals=n, stages=[n], latent=z, image=x)

    # ------------------------------------------------------------ training loss
    def loss(self, out: CrossModalOutput, gt: torch.Tensor, region: torch.Tensor,
             inputs: LossInputs, *, batch_type: str | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one step (module docstring, "Batch types").

        Args:
            out: :meth:`forward` of the batch (its image-to-normal pass).
            gt: (B, 3, H, W) ground-truth unit normals (zero where unknown).
            region: (B, H, W) float, 1 on the supervised face region.
            inputs: the network inputs and ``step`` (the optimiser steps done).
            batch_type: force a step type (``paired``, ``image``, ``normal``); None: the
                schedule's type of ``inputs.step`` in training mode, ``paired`` otherwise.

        Returns:
            (total, terms): terms by ``loss_names``, 0 for the passes not run.
        """
        kind = batch_type if batch_type is not None else (
            self.batch_type(inputs.step) if self.training else "paired")
        if kind not in STEP_TYPES:
            raise ConfigError(f"batch_type must be one of {STEP_TYPES}; got {kind!r}")
        n = out.normals
        check_shape(gt, "gt", tuple(n.shape))
        check_shape(region, "region", (n.shape[0], n.shape[2], n.shape[3]))
        zero = n.new_zeros(())
        terms = dict.fromkeys(LOSS_NAMES, zero)
        c = self.config
        if kind in ("paired", "image"):
            image = out.image if out.image is not None else self.input_image(
                inputs.images, inputs.image_mask)
            recon = (self.image_to_image(image) if out.latent is None else
                     self.image_to_image(latent=out.latent, size=tuple(n.shape[-2:])))
            terms["image_to_image"] = masked_image_loss(recon, image, region)
            total = c.image_weight * terms["image_to_image"]
            if kind == "paired":
                terms["image_to_normal"] = normal_loss(n, gt, region)
                total = total + terms["image_to_normal"]
        else:
            face = (region > 0).to(gt.dtype)[:, None]
            terms["normal_to_normal"] = normal_loss(self.normal_to_normal(gt * face), gt,
                                                    region)
            total = terms["normal_to_normal"]
        return total, terms
