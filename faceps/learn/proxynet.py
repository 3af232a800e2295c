"""ProxyNet: the proxy estimation network of the paper (section 4.1).

A ResNet-18 regresses, from the face crop, the morphable model's identity and expression
coefficients (std units), the head rotation as Euler angles (pitch, yaw, roll; radians, the
convention of :mod:`faceps.core.rotation`) and the translation t (mm, camera frame), so that
the camera-frame vertices are ``X = R(angles) G(alpha_id, alpha_exp) + t``.

Input. The network sees one RGB image per sample: the mean of its valid input images
(1..N near-light images of the same face), divided by its own mean intensity. The mean keeps
the network independent of the number and order of the images and of the exposure, and
with one image it is that image; the per-light shading differences it averages away matter
for the fine normals (NormalNet), not for the coarse shape.

Translation parametrisation. A crop's position and zoom vary (capture framing and
augmentation), so t is not a function of the crop's pixels alone; it is decoded with the
crop's intrinsics K. The head outputs (a, b, c):

- the model origin projects to ``u0 = (W - 1) / 2 + a W / 2``, ``v0 = (H - 1) / 2 + b H / 2``
  (pixels of the crop; a = b = 0 is the crop centre);
- the depth is log-parametrised relative to a nominal crop: the crop spans
  ``W tz / fx`` mm at the face's depth, and ``tz = exp(c) * nominal_crop_mm * fx / W``
  (c = 0: a crop ``nominal_crop_mm`` wide, about 225 mm for the synthetic builder's
  framing of a face at 650 mm);
- ``t = tz K^-1 (u0, v0, 1)``.

The head's last layer starts with zero bias and tiny weights, so an untrained network
predicts about the mean face, frontal, centred in the crop at the nominal depth.
:func:`translation_to_raw` inverts the decoding (for direct pose supervision or tests).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from faceps.core.camera import project_torch
from faceps.core.errors import ConfigError, ShapeError, check_shape
from faceps.core.rotation import pose_rotation_torch
from faceps.learn.resnet import ResNet, ResNetConfig
from faceps.model.morphable import MorphableModel

__all__ = [
    "ProxyNetConfig",
    "ProxyOutput",
    "ProxyNet",
    "mean_image",
    "translation_from_raw",
    "translation_to_raw",
    "camera_vertices",
    "vertices_from_params",
    "landmark_points",
    "project_landmarks",
]

#: crop width in mm at the face's depth for c = 0 (synthetic builder: 64 px crops with
#: fx ~ 185 px of faces at ~650 mm)
NOMINAL_CROP_MM = 225.0
#: std of the head's initial weights (small: start near the mean face, frontal, centred)
HEAD_INIT_STD = 1e-3


@dataclass(frozen=True)
class ProxyNetConfig:
    """Options of :class:`ProxyNet`.

    Attributes:
        n_id, n_exp: coefficients regressed (the model's sizes, or fewer leading ones).
        norm: normalisation of the ResNet-18 (``batch`` as the reference, ``group`` for
            small batches).
        widths: ResNet stage widths ((64, 128, 256, 512) is the standard ResNet-18).
        nominal_crop_mm: crop width in mm at the face's depth for zero depth output.
        eps: added to the mean intensity before dividing by it.
    """

    n_id: int
    n_exp: int
    norm: str = "batch"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    nominal_crop_mm: float = NOMINAL_CROP_MM
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if int(self.n_id) < 0 or int(self.n_exp) < 0:
            raise ConfigError(f"n_id and n_exp must be >= 0; got {self.n_id}, {self.n_exp}")
        if not self.nominal_crop_mm > 0:
            raise ConfigError(f"nominal_crop_mm must be > 0; got {self.nominal_crop_mm}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    @classmethod
    def for_model(cls, model: MorphableModel, **kwargs) -> ProxyNetConfig:
        """A configuration regressing all of ``model``'s identity and expression
        coefficients."""
        return cls(n_id=model.n_id, n_exp=model.n_exp, **kwargs)

    @property
    def n_outputs(self) -> int:
        """Head outputs: n_id + n_exp + 3 angles + 3 translation parameters."""
        return self.n_id + self.n_exp + 6

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProxyOutput:
    """Prediction of :class:`ProxyNet` for a batch of B crops.

    Attributes:
        alpha_id: (B, n_id) identity coefficients (std units).
        alpha_exp: (B, n_exp) expression coefficients.
        angles: (B, 3) pitch, yaw, roll in radians.
        translation: (B, 3) t in mm, camera frame.
        raw_translation: (B, 3) the head's (a, b, c) (see the module docstring).
    """

    alpha_id: torch.Tensor
    alpha_exp: torch.Tensor
    angles: torch.Tensor
    translation: torch.Tensor
    raw_translation: torch.Tensor = field(repr=False)

    @property
    def pose(self) -> torch.Tensor:
        """(B, 6) pitch, yaw, roll, tx, ty, tz (contract-4 ``params/pose`` layout)."""
        return torch.cat([self.angles, self.translation], dim=-1)

    def vertices(self, model: MorphableModel) -> torch.Tensor:
        """(B, V, 3) camera-frame vertices (mm) of the predicted proxy."""
        return camera_vertices(model, self.alpha_id, self.alpha_exp, self.angles,
                               self.translation)


def _images_and_mask(images: torch.Tensor, image_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k, 3, H, W) images and (B, k) bool mask from (B, k, 3, H, W) or (B, 3, H, W)."""
    if images.ndim == 4:
        images = images.unsqueeze(1)
    check_shape(images, "images", (None, None, 3, None, None))
    B, k = images.shape[:2]
    if image_mask is None:
        image_mask = torch.ones((B, k), dtype=torch.bool, device=images.device)
    check_shape(image_mask, "image_mask", (B, k))
    image_mask = image_mask.to(torch.bool)
    if not bool(image_mask.any(dim=1).all()):
        raise ShapeError("every sample needs at least one valid image (image_mask)")
    return images, image_mask


def mean_image(images: torch.Tensor, image_mask: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Mean of each sample's valid images divided by its mean intensity.

    Args:
        images: (B, k, 3, H, W) (or (B, 3, H, W) for one image) linear intensities.
        image_mask: (B, k) bool, True for real images (None: all).
        eps: added to the mean before dividing.

    Returns:
        (B, 3, H, W) float tensor with mean about 1 (invariant to the exposure and to the
        order of the images).
    """
    images, image_mask = _images_and_mask(images, image_mask)
    w = image_mask.to(images.dtype)[:, :, None, None, None]
    mean = (images * w).sum(1) / w.sum(1)
    level = mean.mean(dim=(1, 2, 3), keepdim=True).abs()
    return mean / (level + eps)


def translation_from_raw(raw: torch.Tensor, K: torch.Tensor, image_size: tuple[int, int],
                         nominal_crop_mm: float = NOMINAL_CROP_MM) -> torch.Tensor:
    """Decode (a, b, c) into t (mm) for crops with intrinsics K (module docstring).

    Args:
        raw: (B, 3) network outputs.
        K: (B, 3, 3) or (3, 3) intrinsics of the crops (pixels).
        image_size: (W, H) of the crops in pixels.
        nominal_crop_mm: crop width in mm at the face's depth for c = 0.

    Returns:
        (B, 3) translation in mm, camera frame.
    """
    check_shape(raw, "raw", (None, 3))
    K = K.to(raw.dtype).expand(raw.shape[0], 3, 3)
    W, H = (float(s) for s in image_size)
    a, b, c = raw.unbind(-1)
    u0 = (W - 1) / 2 + a * W / 2
    v0 = (H - 1) / 2 + b * H / 2
    fx, s, cx = K[:, 0, 0], K[:, 0, 1], K[:, 0, 2]
    fy, cy = K[:, 1, 1], K[:, 1, 2]
    tz = torch.exp(c) * nominal_crop_mm * fx / W
    y = (v0 - cy) / fy
    x = (u0 - cx - s * y) / fx
    return torch.stack([x * tz, y * tz, tz], dim=-1)


def translation_to_raw(t: torch.Tensor, K: torch.Tensor, image_size: tuple[int, int],
                       nominal_crop_mm: float = NOMINAL_CROP_MM) -> torch.Tensor:
    """Inverse of :func:`translation_from_raw`: (B, 3) t (mm, tz > 0) -> (B, 3) (a, b, c)."""
    check_shape(t, "t", (None, 3))
    K = K.to(t.dtype).expand(t.shape[0], 3, 3)
    W, H = (float(s) for s in image_size)
    uv = project_torch(t[:, None, :], K)[:, 0]
    a = (uv[:, 0] - (W - 1) / 2) / (W / 2)
    b = (uv[:, 1] - (H - 1) / 2) / (H / 2)
    c = torch.log(t[:, 2] * W / (nominal_crop_mm * K[:, 0, 0]))
    return torch.stack([a, b, c], dim=-1)


class ProxyNet(nn.Module):
    """ResNet-18 regression of 3DMM coefficients and pose from 1..N crops of a face.

    ``forward(images, K, image_mask=None)``:

    Args:
        images: (B, k, 3, H, W) or (B, 3, H, W) linear intensities.
        K: (B, 3, 3) intrinsics of the crops (pixels); needed to decode the translation.
        image_mask: (B, k) bool, True for real images (padding from
            :func:`faceps.datasets.torch_data.collate_samples` is False); None: all.

    Returns:
        :class:`ProxyOutput`.
    """

    def __init__(self, config: ProxyNetConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNet(ResNetConfig(in_channels=3, num_classes=None,
                                            widths=config.widths, norm=config.norm))
        self.head = nn.Linear(self.backbone.out_channels, config.n_outputs)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor, K: torch.Tensor,
                image_mask: torch.Tensor | None = None) -> ProxyOutput:
        x = mean_image(images, image_mask, self.config.eps)
        B, _, H, W = x.shape
        check_shape(K, "K", (B, 3, 3))
        out = self.head(self.backbone(x))
        ni, ne = self.config.n_id, self.config.n_exp
        alpha_id, alpha_exp = out[:, :ni], out[:, ni:ni + ne]
        angles, raw_t = out[:, ni + ne:ni + ne + 3], out[:, ni + ne + 3:]
        t = translation_from_raw(raw_t, K, (W, H), self.config.nominal_crop_mm)
        return ProxyOutput(alpha_id, alpha_exp, angles, t, raw_t)


# ------------------------------------------------------------------ geometry
def camera_vertices(model: MorphableModel, alpha_id: torch.Tensor, alpha_exp: torch.Tensor,
                    angles: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Camera-frame vertices ``X = R(angles) G(alpha) + t`` (differentiable).

    Args:
        model: the morphable model.
        alpha_id: (B, Ki') identity coefficients (Ki' <= model.n_id, leading components).
        alpha_exp: (B, Ke') expression coefficients.
        angles: (B, 3) pitch, yaw, roll in radians.
        translation: (B, 3) mm.

    Returns:
        (B, V, 3) vertices in mm, camera frame (OpenCV).
    """
    B = alpha_id.shape[0]
    check_shape(angles, "angles", (B, 3))
    check_shape(translation, "translation", (B, 3))
    G = model.geometry_torch(alpha_id, alpha_exp)
    R = pose_rotation_torch(angles)
    return G @ R.transpose(-1, -2) + translation[:, None, :]


def vertices_from_params(model: MorphableModel, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Camera-frame vertices (B, V, 3) of ground-truth ``params`` as batched by
    :func:`faceps.datasets.torch_data.collate_samples` (``id``, ``exp``, ``pose``)."""
    pose = params["pose"]
    return camera_vertices(model, params["id"], params["exp"], pose[:, :3], pose[:, 3:])


def landmark_points(model: MorphableModel, vertices: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The iBUG-68 landmark vertices.

    Args:
        model: the morphable model.
        vertices: (B, V, 3).

    Returns:
        (points (B, 68, 3) with zeros where the model has no vertex, valid (68,) bool).
    """
    check_shape(vertices, "vertices", (None, model.n_vertices, 3))
    ids = torch.as_tensor(model.landmarks68, dtype=torch.int64, device=vertices.device)
    valid = ids >= 0
    pts = vertices[:, ids.clamp_min(0)] * valid[None, :, None].to(vertices.dtype)
    return pts, valid


def project_landmarks(model: MorphableModel, vertices: torch.Tensor, K: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel positions (B, 68, 2) of the landmark vertices under intrinsics K (B, 3, 3),
    and valid (68,) bool (zeros where invalid)."""
    pts, valid = landmark_points(model, vertices)
    safe = torch.where(valid[None, :, None], pts, torch.ones_like(pts))
    uv = project_torch(safe, K)
    return uv * valid[None, :, None].to(uv.dtype), valid
