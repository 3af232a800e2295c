"""NormalNet: the normal estimation network of the paper (section 4.2), PS-FCN-like, with
optional Cas-FNE cascaded refinement.

Structure (widths ``(w0, w1, w2)`` at full, 1/2 and 1/4 resolution):

1. A shared-weight image encoder is applied to every input image separately: its input is
   the image (divided by the sample's mean intensity over its valid images, so the
   exposure does not matter) and, with ``proxy_in_extractor``, the proxy normals and their
   validity, playing the role of PS-FCN's per-image lighting input. It gives feature maps
   at three scales.
2. Aggregation: at each scale, an element-wise max over the sample's images (PS-FCN's
   order-agnostic max-pooling); padded images (``image_mask`` False) are excluded. So the
   result does not depend on the number (1..N) or order of the images.
3. A proxy branch encodes the proxy normal map (3 channels plus validity) at the same
   three scales.
4. A U-shaped regressor decodes the fused image features and the proxy features into a
   residual r; the estimate is ``n0 = normalize(p + r)`` with p the proxy normal (the
   camera-facing (0, 0, -1) where the proxy is unknown).
5. ``cascade = T > 0`` (Cas-FNE): one refinement block with shared parameters is applied T
   times: a normal encoder re-encodes the previous estimate, the block's decoder fuses it
   with the same image features, and ``n_{t+1} = normalize(n_t + r_t)``. All stage outputs
   are returned (Cas-FNE supervises every stage).

6. ``passes = P > 1``: the whole network is run again with its own estimate as the proxy
   input (same proxy validity), P times in all. A network trained to refine its own
   estimates (``TrainConfig.self_feed``) gains from a second pass; :func:`default_passes`
   reads the count a network was trained for from its training configuration.

Sizes that are not multiples of 4 are zero-padded internally and cropped back. Layers
have no batch normalisation (as PS-FCN), so outputs do not depend on the batch
composition and padded images cannot leak into statistics.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from faceps.core.errors import ConfigError, ShapeError, check_shape

__all__ = ["NormalNetConfig", "NormalNetOutput", "NormalNet", "normalize_images",
           "masked_max", "default_passes", "check_passes"]

#: std of the initial weights of the residual output layers (small: start near the input)
OUT_INIT_STD = 1e-3
#: normal assumed where the proxy is unknown: facing the camera (DESIGN.md: n_z < 0)
FACING_CAMERA = (0.0, 0.0, -1.0)


@dataclass(frozen=True)
class NormalNetConfig:
    """Options of :class:`NormalNet`.

    Attributes:
        arch: the architecture's registry name (:mod:`faceps.learn.archs`).
        widths: channels (w0, w1, w2) of the image features and the regressor at full,
            1/2 and 1/4 resolution.
        normal_widths: channels of the proxy and refinement normal encoders at the three
            scales.
        proxy_in_extractor: also feed the proxy normals (and validity) to the per-image
            encoder with each image.
        cascade: refinement stages T (0: none; Cas-FNE uses 2).
        grad_head: also predict the depth-gradient magnitude W of the WLS paper
            (``out.aux["grad_magnitude"]`` (B, 1, H, W), >= 0; trained against
            :func:`faceps.learn.losses.depth_gradient_magnitude` of the ground-truth depth
            with weight ``grad_weight``), for weighted least-squares integration
            (``faceps infer --integrate wls``).
        negative_slope: of the LeakyReLU activations.
        eps: added to the mean intensity before dividing by it.
    """

    arch: str = "facepsnet"
    widths: tuple[int, int, int] = (32, 64, 128)
    normal_widths: tuple[int, int, int] = (16, 32, 64)
    proxy_in_extractor: bool = True
    cascade: int = 0
    negative_slope: float = 0.1
    eps: float = 1e-6
    grad_head: bool = False
    grad_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.arch != "facepsnet":
            raise ConfigError(f"NormalNetConfig is the 'facepsnet' architecture; got arch "
                              f"{self.arch!r}")
        for name in ("widths", "normal_widths"):
            v = tuple(int(w) for w in getattr(self, name))
            if len(v) != 3 or min(v) < 1:
                raise ConfigError(f"{name} must be three channel counts >= 1; got {v}")
            object.__setattr__(self, name, v)
        if int(self.cascade) < 0:
            raise ConfigError(f"cascade must be >= 0; got {self.cascade}")
        object.__setattr__(self, "cascade", int(self.cascade))
        if not 0 <= self.negative_slope < 1:
            raise ConfigError(f"negative_slope must be in [0, 1); got {self.negative_slope}")
        if not (self.grad_weight >= 0):
            raise ConfigError(f"grad_weight must be >= 0; got {self.grad_weight}")
        object.__setattr__(self, "grad_head", bool(self.grad_head))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NormalNetOutput:
    """Prediction of :class:`NormalNet`.

    Attributes:
        normals: (B, 3, H, W) unit normals of the last stage (camera frame).
        stages: T + 1 tensors (B, 3, H, W): the initial estimate, then each refinement.
        aux: further maps of architectures that predict them, by name (e.g.
            ``grad_magnitude`` (B, 1, H, W)).
    """

    normals: torch.Tensor
    stages: list[torch.Tensor] = field(default_factory=list)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def _conv(in_ch: int, out_ch: int, stride: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1), nn.LeakyReLU(slope, True))


def _up(in_ch: int, out_ch: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1), nn.LeakyReLU(slope, True))


class Encoder(nn.Module):
    """Three-scale convolutional encoder: (B, C, H, W) -> [(B, c0, H, W),
    (B, c1, H/2, W/2), (B, c2, H/4, W/4)] (H, W multiples of 4)."""

    def __init__(self, in_ch: int, widths: tuple[int, int, int], slope: float):
        super().__init__()
        c0, c1, c2 = widths
        self.s0 = nn.Sequential(_conv(in_ch, c0, 1, slope), _conv(c0, c0, 1, slope))
        self.s1 = nn.Sequential(_conv(c0, c1, 2, slope), _conv(c1, c1, 1, slope))
        self.s2 = nn.Sequential(_conv(c1, c2, 2, slope), _conv(c2, c2, 1, slope),
                                _conv(c2, c2, 1, slope))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.s0(x)
        f1 = self.s1(f0)
        return [f0, f1, self.s2(f1)]


class Decoder(nn.Module):
    """U-shaped regressor: image features (widths w) and normal features (widths e) at
    three scales -> (B, 3, H, W) residual (no activation; the last layer starts near zero,
    so an untrained block returns almost its input normals)."""

    def __init__(self, widths: tuple[int, int, int], normal_widths: tuple[int, int, int],
                 slope: float):
        super().__init__()
        w0, w1, w2 = widths
        e0, e1, e2 = normal_widths
        self.d2 = nn.Sequential(_conv(w2 + e2, w2, 1, slope), _conv(w2, w2, 1, slope))
        self.up1 = _up(w2, w1, slope)
        self.d1 = nn.Sequential(_conv(2 * w1 + e1, w1, 1, slope), _conv(w1, w1, 1, slope))
        self.up0 = _up(w1, w0, slope)
        self.d0 = _conv(2 * w0 + e0, w0, 1, slope)
        self.out = nn.Conv2d(w0, 3, 3, 1, 1)
        nn.init.normal_(self.out.weight, std=OUT_INIT_STD)
        nn.init.zeros_(self.out.bias)

    def forward(self, image_feats: list[torch.Tensor], normal_feats: list[torch.Tensor],
                features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The residual; with ``features`` also the last full-resolution features."""
        (f0, f1, f2), (g0, g1, g2) = image_feats, normal_feats
        x = self.d2(torch.cat([f2, g2], 1))
        x = self.d1(torch.cat([self.up1(x), f1, g1], 1))
        x = self.d0(torch.cat([self.up0(x), f0, g0], 1))
        return (self.out(x), x) if features else self.out(x)


def masked_max(features: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the image axis, ignoring padded images.

    Args:
        features: (B, k, C, H, W).
        image_mask: (B, k) bool, at least one True per sample.

    Returns:
        (B, C, H, W).
    """
    low = torch.finfo(features.dtype).min
    keep = image_mask[:, :, None, None, None]
    return torch.where(keep, features, torch.full_like(features, low)).amax(dim=1)


def normalize_images(images: torch.Tensor, image_mask: torch.Tensor, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Divide each sample's images by their mean intensity over its valid images.

    Args:
        images: (B, k, 3, H, W); image_mask: (B, k) bool.

    Returns:
        (B, k, 3, H, W), padded images zero.
    """
    w = image_mask.to(images.dtype)[:, :, None, None, None]
    level = (images * w).sum(dim=(1, 2, 3, 4)) / (w.sum(dim=(1, 2, 3, 4))
                                                  * images[0, 0].numel())
    return images * w / (level.abs() + eps)[:, None, None, None, None]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)


class NormalNet(nn.Module):
    """Normal estimation from 1..N near-light images and the proxy normal map.

    ``forward(images, proxy_normals, image_mask=None, proxy_mask=None, *, cascade=None,
    passes=1)``:

    Args:
        images: (B, k, 3, H, W) linear intensities (or (B, 3, H, W) for one image).
        proxy_normals: (B, 3, H, W) unit proxy normals, camera frame (any value where
            unknown).
        image_mask: (B, k) bool, True for real images; None: all.
        proxy_mask: (B, H, W), nonzero where the proxy normals are known; None: where
            their length exceeds 0.5 (the data loader writes zeros where unknown).
        passes: run the network this many times, each pass after the first with the
            previous pass's normals as the proxy input (module docstring, item 6).

    Returns:
        :class:`NormalNetOutput` with unit normals (B, 3, H, W) (the stages of the last
        pass).
    """

    #: reads every valid image of a sample (:mod:`faceps.learn.archs`)
    single_image = False
    #: reads the proxy normals
    uses_proxy = True

    def __init__(self, config: NormalNetConfig | None = None):
        super().__init__()
        self.config = c = config or NormalNetConfig()
        slope = c.negative_slope
        in_ch = 3 + (4 if c.proxy_in_extractor else 0)
        self.image_encoder = Encoder(in_ch, c.widths, slope)
        self.proxy_encoder = Encoder(4, c.normal_widths, slope)
        self.regressor = Decoder(c.widths, c.normal_widths, slope)
        if c.cascade > 0:
            self.refine_encoder = Encoder(3, c.normal_widths, slope)
            self.refine_decoder = Decoder(c.widths, c.normal_widths, slope)
        else:
            self.refine_encoder = None
            self.refine_decoder = None
        # the WLS paper's W map from the regressor's last features (softplus: W >= 0)
        self.grad_head = (nn.Sequential(_conv(c.widths[0], c.widths[0], 1, slope),
                                        nn.Conv2d(c.widths[0], 1, 3, 1, 1), nn.Softplus())
                          if c.grad_head else None)

    @property
    def extra_fields(self) -> tuple[str, ...]:
        """Dataset fields the training loss needs besides images and normals."""
        return ("depth", "K") if self.config.grad_head else ()

    def forward(self, images: torch.Tensor, proxy_normals: torch.Tensor,
                image_mask: torch.Tensor | None = None,
                proxy_mask: torch.Tensor | None = None, *,
                cascade: int | None = None, passes: int = 1) -> NormalNetOutput:
        """See the class docstring; ``cascade`` runs fewer (or more) refinement stages
        than configured (the block is shared, so any T >= 0 works if it was built)."""
        passes = check_passes(passes)
        if passes > 1 and proxy_mask is None:  # the first pass's validity, kept after it
            check_shape(proxy_normals, "proxy_normals", (None, 3, None, None))
            proxy_mask = (proxy_normals.norm(dim=1) > 0.5).to(proxy_normals.dtype)
        out = self._pass(images, proxy_normals, image_mask, proxy_mask, cascade)
        for _ in range(passes - 1):
            out = self._pass(images, out.normals, image_mask, proxy_mask, cascade)
        return out

    def _pass(self, images: torch.Tensor, proxy_normals: torch.Tensor,
              image_mask: torch.Tensor | None, proxy_mask: torch.Tensor | None,
              cascade: int | None) -> NormalNetOutput:
        c = self.config
        if images.ndim == 4:
            images = images.unsqueeze(1)
        check_shape(images, "images", (None, None, 3, "H", "W"))
        B, k, _, H, W = images.shape
        check_shape(proxy_normals, "proxy_normals", (B, 3, H, W))
        if image_mask is None:
            image_mask = torch.ones((B, k), dtype=torch.bool, device=images.device)
        check_shape(image_mask, "image_mask", (B, k))
        image_mask = image_mask.to(torch.bool)
        if not bool(image_mask.any(dim=1).all()):
            raise ShapeError("every sample needs at least one valid image (image_mask)")
        if proxy_mask is None:
            known = (proxy_normals.norm(dim=1, keepdim=True) > 0.5)
        else:
            check_shape(proxy_mask, "proxy_mask", (B, H, W))
            known = (proxy_mask > 0).unsqueeze(1)
        known = known.to(images.dtype)
        T = c.cascade if cascade is None else int(cascade)
        if T > 0 and self.refine_decoder is None:
            raise ConfigError("this NormalNet was built without a refinement block "
                              "(config.cascade = 0)")

        facing = torch.tensor(FACING_CAMERA, dtype=images.dtype, device=images.device)
        proxy = _unit(proxy_normals * known + facing[None, :, None, None] * (1 - known))
        x = normalize_images(images, image_mask, c.eps)
        # pad to multiples of 4 (two stride-2 levels), crop back at the end
        ph, pw = (-H) % 4, (-W) % 4
        if ph or pw:
            x = F.pad(x.reshape(B * k, 3, H, W), (0, pw, 0, ph)).reshape(
                B, k, 3, H + ph, W + pw)
            proxy_p = F.pad(proxy, (0, pw, 0, ph))
            known_p = F.pad(known, (0, pw, 0, ph))
        else:
            proxy_p, known_p = proxy, known
        Hp, Wp = H + ph, W + pw
        proxy_in = torch.cat([proxy_p * known_p, known_p], 1)
        per_image = x.reshape(B * k, 3, Hp, Wp)
        if c.proxy_in_extractor:
            per_image = torch.cat([per_image, proxy_in.repeat_interleave(k, dim=0)], 1)
        feats = [masked_max(f.reshape(B, k, *f.shape[1:]), image_mask)
                 for f in self.image_encoder(per_image)]

        residual, last = self.regressor(feats, self.proxy_encoder(proxy_in), features=True)
        n = _unit(proxy_p + residual)
        aux = {}
        if self.grad_head is not None:
            aux["grad_magnitude"] = self.grad_head(last)[:, :, :H, :W]
        stages = [n]
        for _ in range(T):
            n = _unit(n + self.refine_decoder(feats, self.refine_encoder(n)))
            stages.append(n)
        stages = [s[:, :, :H, :W] for s in stages]
        return NormalNetOutput(normals=stages[-1], stages=stages, aux=aux)


def check_passes(passes: object) -> int:
    """``passes`` (of :meth:`NormalNet.forward`) as an int; ConfigError unless it is an
    integer >= 1."""
    if isinstance(passes, bool) or not isinstance(passes, numbers.Real) or \
            passes != int(passes) or passes < 1:
        raise ConfigError(f"passes must be an integer >= 1; got {passes!r}")
    return int(passes)


def default_passes(train_config: dict | None) -> int:
    """Passes (``NormalNet.forward``'s ``passes``) a NormalNet was trained for: 2 when its
    training fed it its own estimates (``self_feed`` > 0 in the training configuration
    stored with its weights), else 1."""
    try:
        return 2 if float((train_config or {}).get("self_feed", 0.0) or 0.0) > 0 else 1
    except (TypeError, ValueError):
        return 1
