"""ResNet-18 (He et al. 2016), written here so the package needs no torchvision.

The layout is the standard one: a 7x7 stride-2 stem with a 3x3 max pool, four stages of
:class:`BasicBlock` (two blocks each for ResNet-18) with widths 64, 128, 256, 512 and
strides 1, 2, 2, 2, global average pooling and an optional fully connected head. With three
input channels and a 1000-class head it has the reference 11,689,512 parameters.

:meth:`ResNet.features` returns the five multi-scale feature maps (stem and the four
stages) for encoder-decoder uses (as Cas-FNE's initial block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from faceps.core.errors import ConfigError, check_shape

__all__ = ["ResNetConfig", "BasicBlock", "ResNet", "resnet18", "count_parameters",
           "make_norm"]

NORMS = ("batch", "group", "none")


@dataclass(frozen=True)
class ResNetConfig:
    """Options of :class:`ResNet`.

    Attributes:
        in_channels: input channels (3 for RGB).
        num_classes: outputs of the final linear layer; None for no head (``forward``
            returns the pooled features).
        widths: channels of the four stages.
        blocks: basic blocks per stage ((2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34).
        norm: ``batch`` (BatchNorm, the reference), ``group`` (GroupNorm, for small
            batches) or ``none``.
        zero_init_residual: start every block's last norm at zero (each block starts as
            the identity).
    """

    in_channels: int = 3
    num_classes: int | None = 1000
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    norm: str = "batch"
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if int(self.in_channels) < 1:
            raise ConfigError(f"in_channels must be >= 1; got {self.in_channels}")
        if self.num_classes is not None and int(self.num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1 or None; got {self.num_classes}")
        if len(self.widths) != 4 or len(self.blocks) != 4:
            raise ConfigError("widths and blocks need one entry per stage (4)")
        if min(self.widths) < 1 or min(self.blocks) < 1:
            raise ConfigError(f"widths and blocks must be >= 1; got {self.widths}, "
                              f"{self.blocks}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}; got {self.norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_norm(kind: str, channels: int) -> nn.Module:
    """A normalisation layer: BatchNorm2d, GroupNorm (up to 32 groups dividing the
    channels) or identity."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be one of {NORMS}; got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape
    changes).

    Input (B, in_ch, H, W); output (B, out_ch, ceil(H / stride), ceil(W / stride)).
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=bias)
        self.bn1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=bias)
        self.bn2 = make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=bias),
                                            make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks (ResNet-18 by default).

    Input: (B, in_channels, H, W) float32. ``forward`` returns (B, num_classes), or
    (B, widths[-1]) pooled features without a head; with ``return_features`` also the
    list of :meth:`features`.
    """

    def __init__(self, config: ResNetConfig | None = None):
        super().__init__()
        self.config = c = config or ResNetConfig()
        w = c.widths
        bias = c.norm == "none"
        self.conv1 = nn.Conv2d(c.in_channels, w[0], 7, 2, 3, bias=bias)
        self.bn1 = make_norm(c.norm, w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        in_ch = w[0]
        for j, (width, n) in enumerate(zip(w, c.blocks)):
            stride = 1 if j == 0 else 2
            blocks = [BasicBlock(in_ch, width, stride, c.norm)]
            blocks += [BasicBlock(width, width, 1, c.norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], int(c.num_classes)) if c.num_classes is not None else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and isinstance(m.bn2, nn.BatchNorm2d
                                                            | nn.GroupNorm):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def out_channels(self) -> int:
        """Channels of the pooled features (widths[-1])."""
        return self.config.widths[-1]

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the five maps of :meth:`features`."""
        w = self.config.widths
        return (w[0], w[0], w[1], w[2], w[3])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps.

        Args:
            x: (B, in_channels, H, W).

        Returns:
            five maps: the stem (B, w0, H/2, W/2) before the max pool, then the stages
            (B, w0, H/4, W/4), (B, w1, H/8, W/8), (B, w2, H/16, W/16), (B, w3, H/32, W/32)
            (sizes rounded up).
        """
        check_shape(x, "x", (None, self.config.in_channels, None, None))
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, f1, f2, f3, f4]

    def forward(self, x: torch.Tensor, return_features: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.features(x)
        out = torch.flatten(self.avgpool(feats[-1]), 1)
        if self.fc is not None:
            out = self.fc(out)
        return (out, feats) if return_features else out


def resnet18(in_channels: int = 3, num_classes: int | None = 1000, **kwargs) -> ResNet:
    """ResNet-18 with ``in_channels`` inputs and a ``num_classes`` head (None: none);
    further keywords go to :class:`ResNetConfig`."""
    return ResNet(ResNetConfig(in_channels=in_channels, num_classes=num_classes, **kwargs))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of a module."""
    return sum(p.numel() for p in module.parameters()
               if p.requires_grad or not trainable_only)
