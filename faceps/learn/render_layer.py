"""The render layer between the two networks (paper Fig. 5): proxy parameters -> proxy
normal map at a crop, and the *proxy degradation* used to train NormalNet.

Rendering. :func:`render_proxy` builds the camera-frame proxy mesh
``X = R(angles) G(alpha_id, alpha_exp) + t`` with the model's torch geometry
(:func:`faceps.learn.proxynet.camera_vertices`) and rasterises it with
:func:`faceps.core.rasterize.render_normals` at the crop's intrinsics K, batched, on the
tensors' device. Its output uses the layout of :mod:`faceps.datasets.torch_data`
(``proxy_normals`` (B, 3, H, W), zero where unknown; ``proxy_mask`` (B, H, W) float32), so
it can replace the dataset's proxy maps in a batch. Rendering the ground-truth parameters
reproduces the synthetic dataset's stored ``proxy_normals`` (same mesh, same rasteriser).

Why degrade the proxy. The synthetic dataset's proxy normals are rendered from the *true*
coefficients and pose: at low resolution they are almost the ground truth (about 0.7 degrees
mean error at 64 px), so a NormalNet trained on them learns to copy its proxy input. At test
time the proxy comes from ProxyNet or from a landmark/photometric fit and is several
degrees off (wrong identity and expression details, a few degrees of head rotation, a few
millimetres of misalignment). :class:`ProxyNoise` adds Gaussian noise to the ground-truth
parameters before rendering so the training proxy has errors of that size.

Noise levels (:class:`ProxyNoise` defaults, chosen by measurement on builds of the built-in
model at 64, 128 and 256 px; ``tests/learn/test_train.py`` checks the range):

==========================  ========  =================================================
parameter                   std       effect
==========================  ========  =================================================
identity coefficients       0.35      model std units: a different but plausible face
                                      shape (nose, cheeks, chin); alone 3.5-4.5 degrees
expression coefficients     0.2       model std units (one-sided blendshapes reflected
                                      at their lower bound); alone about 4 degrees
pitch, yaw, roll            1.25 deg  each, about the face centre (see
                                      :func:`perturb_params`); alone about 3.5 degrees
translation x, y            0.8 mm    about 1 px at a 256 px crop; alone about 3 degrees
translation z               7 mm      depth/scale error of a monocular fit; alone 2-3
                                      degrees
==========================  ========  =================================================

With all of them the perturbed proxy's mean angular error against the ground-truth normals
over the face region it covers is about 7-8.5 degrees (6-10 for single seeds of small sets),
in the range of a fitted proxy (6-10 degrees), against 0.7 (64 px) to 2 degrees (256 px)
for the stored proxy. :meth:`ProxyNoise.scaled` multiplies all levels by one factor (the
error grows about linearly with it).

Determinism. The noise of a sample is drawn from ``numpy.random.default_rng([seed, stream,
index])`` (:func:`sample_proxy_noise`), so it depends only on the seed, a stream number
(e.g. the training epoch) and the sample's row, not on batching, workers or resumption.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from faceps.core.errors import ConfigError, ShapeError, check_shape
from faceps.core.rasterize import render_normals
from faceps.core.rotation import pose_rotation_torch
from faceps.learn.proxynet import camera_vertices
from faceps.model.morphable import MorphableModel

__all__ = [
    "ProxyNoise",
    "ProxyRender",
    "render_proxy",
    "render_params",
    "sample_proxy_noise",
    "perturb_params",
    "perturbed_proxy",
    "EVAL_STREAM",
    "parse_proxy_source",
    "ProxySource",
]

#: noise stream of validation and evaluation (training uses the epoch number)
EVAL_STREAM = 1_000_000
_SOURCES = ("perturbed", "dataset", "none", "proxynet:RUN")


@dataclass(frozen=True)
class ProxyNoise:
    """Gaussian noise on proxy parameters (module docstring for the default levels).

    Attributes:
        id_std: std of the noise on each identity coefficient (model std units).
        exp_std: std of the noise on each expression coefficient (model std units).
        angle_std_deg: std of the noise on pitch, yaw and roll (degrees each).
        translation_std_mm: std of the noise on t_x and t_y (mm).
        depth_std_mm: std of the noise on t_z (mm).
        scale_range: None, or (low, high): every sample's noise is multiplied by its own
            factor drawn uniformly from this range, so a network sees proxies from nearly
            exact to poor (a fitted or regressed proxy's error varies from face to face).
    """

    id_std: float = 0.35
    exp_std: float = 0.2
    angle_std_deg: float = 1.25
    translation_std_mm: float = 0.8
    depth_std_mm: float = 7.0
    scale_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "scale_range":
                continue
            v = float(value)
            if not (np.isfinite(v) and v >= 0):
                raise ConfigError(f"ProxyNoise.{name} must be a finite number >= 0; "
                                  f"got {value!r}")
            object.__setattr__(self, name, v)
        if self.scale_range is not None:
            try:
                lo, hi = (float(x) for x in self.scale_range)
            except (TypeError, ValueError):
                raise ConfigError(f"ProxyNoise.scale_range must be None or (low, high); got "
                                  f"{self.scale_range!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
                raise ConfigError(f"ProxyNoise.scale_range must satisfy 0 <= low <= high; "
                                  f"got {self.scale_range!r}")
            object.__setattr__(self, "scale_range", (lo, hi))

    def scaled(self, factor: float) -> ProxyNoise:
        """All levels multiplied by ``factor`` (>= 0); ``scale_range`` is kept."""
        if not (np.isfinite(factor) and factor >= 0):
            raise ConfigError(f"noise scale must be >= 0; got {factor!r}")
        return ProxyNoise(**{k: (v if k == "scale_range" else v * float(factor))
                             for k, v in asdict(self).items()})

    def with_range(self, scale_range: tuple[float, float] | None) -> ProxyNoise:
        """These levels with a per-sample scale range (see the attribute)."""
        return ProxyNoise(**{**asdict(self), "scale_range": scale_range})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProxyRender:
    """A rendered proxy in the torch-data layout.

    Attributes:
        normals: (B, 3, H, W) unit camera-frame normals, zero where ``mask`` is 0.
        mask: (B, H, W) float32, 1 where the proxy's front surface is seen.
    """

    normals: torch.Tensor
    mask: torch.Tensor


def _triangles(model: MorphableModel, device: torch.device) -> torch.Tensor:
    return model.torch_tensors(device)["triangles"]


def render_proxy(model: MorphableModel, alpha_id: torch.Tensor, alpha_exp: torch.Tensor,
                 angles: torch.Tensor, translation: torch.Tensor, K: torch.Tensor,
                 image_size: Sequence[int]) -> ProxyRender:
    """Render proxy normal maps from model parameters (differentiable in the parameters).

    Args:
        model: the morphable model.
        alpha_id: (B, Ki') identity coefficients (std units; Ki' <= model.n_id leading
            ones).
        alpha_exp: (B, Ke') expression coefficients.
        angles: (B, 3) pitch, yaw, roll (radians).
        translation: (B, 3) mm, camera frame.
        K: (B, 3, 3) or (3, 3) intrinsics of the crop (pixels).
        image_size: (W, H) of the crop in pixels.

    Returns:
        :class:`ProxyRender` on the parameters' device, float32.
    """
    V = camera_vertices(model, alpha_id, alpha_exp, angles, translation)
    K = K.to(device=V.device, dtype=V.dtype)
    if K.ndim == 2:
        K = K.expand(V.shape[0], 3, 3)
    check_shape(K, "K", (V.shape[0], 3, 3))
    n, mask = render_normals(V, _triangles(model, V.device), K, tuple(int(s) for s in image_size))
    return ProxyRender(normals=n.permute(0, 3, 1, 2).contiguous().to(torch.float32),
                       mask=mask.to(torch.float32))


def render_params(model: MorphableModel, params: Mapping[str, torch.Tensor], K: torch.Tensor,
                  image_size: Sequence[int]) -> ProxyRender:
    """:func:`render_proxy` of parameters batched as by
    :func:`faceps.datasets.torch_data.collate_samples`: ``id`` (B, Ki), ``exp`` (B, Ke),
    ``pose`` (B, 6) pitch, yaw, roll (rad), tx, ty, tz (mm)."""
    pose = params["pose"]
    check_shape(pose, "params['pose']", (None, 6))
    return render_proxy(model, params["id"], params["exp"], pose[:, :3], pose[:, 3:], K,
                        image_size)


def sample_proxy_noise(noise: ProxyNoise, indices: Sequence[int] | torch.Tensor, n_id: int,
                       n_exp: int, *, seed: int = 0, stream: int = 0
                       ) -> dict[str, torch.Tensor]:
    """Draw the parameter noise of samples, one generator per sample.

    Sample ``i`` uses ``numpy.random.default_rng([seed, stream, indices[i]])`` and draws, in
    this order, ``n_id`` identity, ``n_exp`` expression, 3 angle and 3 translation values
    (standard normal, then scaled), so its noise does not depend on the batch it is in.
    With ``noise.scale_range`` the same generator then draws the sample's factor.

    Args:
        noise: the levels.
        indices: (B,) non-negative sample ids (e.g. the file rows).
        n_id, n_exp: coefficient counts.
        seed, stream: non-negative integers (e.g. the run seed and the epoch).

    Returns:
        dict of float32 CPU tensors: ``id`` (B, n_id), ``exp`` (B, n_exp), ``pose`` (B, 6)
        (angles in radians, then translation in mm): the additive offsets.
    """
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if any(i < 0 for i in idx) or seed < 0 or stream < 0:
        raise ConfigError("sample indices, seed and stream must be >= 0")
    scale = np.concatenate([
        np.full(n_id, noise.id_std), np.full(n_exp, noise.exp_std),
        np.full(3, np.radians(noise.angle_std_deg)),
        [noise.translation_std_mm, noise.translation_std_mm, noise.depth_std_mm]])
    def draw(i: int) -> np.ndarray:
        rng = np.random.default_rng([int(seed), int(stream), i])
        row = rng.standard_normal(scale.size) * scale
        if noise.scale_range is not None:
            row = row * rng.uniform(*noise.scale_range)
        return row

    rows = np.stack([draw(i) for i in idx]) if idx else np.zeros((0, scale.size))
    rows = torch.from_numpy(rows.astype(np.float32))
    return {"id": rows[:, :n_id], "exp": rows[:, n_id:n_id + n_exp],
            "pose": rows[:, n_id + n_exp:]}


def _landmark_centroid(model: MorphableModel, alpha_id: torch.Tensor, alpha_exp: torch.Tensor
                       ) -> torch.Tensor:
    """(B, 3) centroid (model frame, mm) of the model's landmark vertices (of its face region
    when it has no landmark vertex)."""
    G = model.geometry_torch(alpha_id, alpha_exp)
    ids = np.asarray(model.landmarks68)
    ids = ids[ids >= 0]
    if ids.size == 0:
        ids = np.flatnonzero(model.region)
    sel = torch.as_tensor(ids.astype(np.int64), device=G.device)
    return G[:, sel].mean(dim=1)


def perturb_params(model: MorphableModel, params: Mapping[str, torch.Tensor],
                   offsets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Degrade batched parameters by offsets (from :func:`sample_proxy_noise`) the way a
    landmark-driven fit errs.

    The coefficient and angle offsets are added; then the translation is chosen so that the
    centroid of the landmark vertices (the face centre, about 80 mm in front of the model
    origin) lands where it is in the ground truth, plus the translation offset. So a rotation
    error turns the head about its face centre instead of swinging the face around the model
    origin (several mm of image shift per degree that no fit to image landmarks would leave),
    and a shape error does not move the face as a whole. Expression coefficients with a
    finite lower bound (``model.exp_lower``, one-sided blendshapes) are reflected at it, as
    :meth:`MorphableModel.sample` does.

    Args:
        model: the morphable model.
        params: ``id`` (B, Ki), ``exp`` (B, Ke), ``pose`` (B, 6) pitch, yaw, roll (rad),
            tx, ty, tz (mm).
        offsets: the same keys and shapes.

    Returns:
        new dict with ``id``, ``exp``, ``pose`` (other keys of ``params`` copied).
    """
    out = dict(params)
    for key in ("id", "exp", "pose"):
        p, o = params[key], offsets[key]
        if tuple(p.shape) != tuple(o.shape):
            raise ShapeError(f"expected offsets['{key}'] to have shape {tuple(p.shape)}; "
                             f"got {tuple(o.shape)}")
    dev, dt = params["pose"].device, params["pose"].dtype
    off = {k: offsets[k].to(device=dev, dtype=dt) for k in ("id", "exp", "pose")}
    alpha_id = params["id"] + off["id"]
    alpha_exp = params["exp"] + off["exp"]
    if model.exp_lower is not None:
        lo = torch.as_tensor(np.asarray(model.exp_lower[:alpha_exp.shape[1]], np.float64),
                             device=dev, dtype=dt)
        reflected = torch.where(alpha_exp < lo, 2 * lo - alpha_exp, alpha_exp)
        alpha_exp = torch.where(torch.isfinite(lo), reflected, alpha_exp)
    pose = params["pose"]
    angles = pose[:, :3] + off["pose"][:, :3]
    c_true = _landmark_centroid(model, params["id"], params["exp"])
    c_new = _landmark_centroid(model, alpha_id, alpha_exp)
    centre = (pose_rotation_torch(pose[:, :3]) @ c_true[:, :, None])[..., 0] + pose[:, 3:]
    t = centre - (pose_rotation_torch(angles) @ c_new[:, :, None])[..., 0] + off["pose"][:, 3:]
    out.update(id=alpha_id, exp=alpha_exp, pose=torch.cat([angles, t], dim=1))
    return out


def perturbed_proxy(model: MorphableModel, params: Mapping[str, torch.Tensor],
                    K: torch.Tensor, image_size: Sequence[int], indices: Sequence[int] |
                    torch.Tensor, noise: ProxyNoise | None = None, *, seed: int = 0,
                    stream: int = 0) -> ProxyRender:
    """Render the proxy of ground-truth parameters degraded by :class:`ProxyNoise`.

    Args:
        model: the morphable model.
        params: ground-truth ``id`` (B, Ki), ``exp`` (B, Ke), ``pose`` (B, 6).
        K: (B, 3, 3) crop intrinsics; image_size: (W, H).
        indices: (B,) sample ids keying the noise (see :func:`sample_proxy_noise`).
        noise: levels (default :class:`ProxyNoise`()).
        seed, stream: keys of the noise.

    Returns:
        :class:`ProxyRender` on the device of ``params``.
    """
    noise = noise or ProxyNoise()
    offsets = sample_proxy_noise(noise, indices, params["id"].shape[1], params["exp"].shape[1],
                                 seed=seed, stream=stream)
    with torch.no_grad():
        return render_params(model, perturb_params(model, params, offsets), K, image_size)


# ------------------------------------------------------------------ proxy sources
def parse_proxy_source(spec: str) -> tuple[str, str | None]:
    """Split a proxy source specification into (kind, run).

    ``perturbed`` (ground-truth parameters degraded by :class:`ProxyNoise`), ``dataset``
    (the file's stored ``proxy_normals``), ``none`` (no proxy: zeros, the NormalNet treats
    the proxy as unknown), or ``proxynet:RUN`` (the prediction of the ProxyNet trained in
    run folder or weights file RUN).

    Raises:
        ConfigError: for anything else.
    """
    s = str(spec).strip()
    if s in ("perturbed", "dataset", "none"):
        return s, None
    if s.startswith("proxynet:") and len(s) > len("proxynet:"):
        return "proxynet", s[len("proxynet:"):]
    raise ConfigError(f"proxy source must be one of {', '.join(_SOURCES)}; got {spec!r}")


class ProxySource:
    """Proxy normal maps for batches of :mod:`faceps.datasets.torch_data` samples.

    Args:
        spec: see :func:`parse_proxy_source`.
        model: the morphable model (rendering, and the check of a ProxyNet run).
        noise: levels for ``perturbed`` (default :class:`ProxyNoise`()).
        seed: seed of the ``perturbed`` noise.
        device: where the maps are made.

    Calling ``source(batch, stream=...)`` returns a :class:`ProxyRender` on ``device``
    (no gradient). ``stream`` keys the perturbation noise (the epoch in training,
    :data:`EVAL_STREAM` for validation and evaluation). The batch needs the fields of
    :attr:`fields`; ``images``, ``image_mask``, ``K`` feed a ProxyNet.

    Raises:
        ConfigError: invalid spec; CheckpointError: the ProxyNet run is unusable or was
        trained with another model.
    """

    def __init__(self, spec: str, model: MorphableModel, *, noise: ProxyNoise | None = None,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.spec = str(spec)
        self.kind, self.run = parse_proxy_source(spec)
        self.model = model
        self.noise = noise or ProxyNoise()
        self.seed = int(seed)
        self.device = torch.device(device)
        self.proxynet = None
        if self.kind == "proxynet":
            from faceps.learn.checkpoint import load_network

            self.proxynet = load_network(self.run, kind="proxy", model=model,
                                         device=self.device).network

    @property
    def fields(self) -> tuple[str, ...]:
        """FaceDataset field groups this source reads."""
        return {"perturbed": ("K", "params"), "dataset": ("proxy_normals",),
                "none": (), "proxynet": ("images", "K")}[self.kind]

    def __call__(self, batch: Mapping, *, stream: int = EVAL_STREAM) -> ProxyRender:
        dev = self.device
        if self.kind == "dataset":
            return ProxyRender(batch["proxy_normals"].to(dev), batch["proxy_mask"].to(dev))
        ref = batch["images"] if "images" in batch else batch["normals"]
        B, H, W = ref.shape[0], ref.shape[-2], ref.shape[-1]
        if self.kind == "none":
            return ProxyRender(torch.zeros((B, 3, H, W), device=dev),
                               torch.zeros((B, H, W), device=dev))
        K = batch["K"].to(dev)
        with torch.no_grad():
            if self.kind == "perturbed":
                params = {k: batch["params"][k].to(dev) for k in ("id", "exp", "pose")}
                return perturbed_proxy(self.model, params, K, (W, H), batch["index"],
                                       self.noise, seed=self.seed, stream=int(stream))
            pred = self.proxynet(batch["images"].to(dev), K, batch["image_mask"].to(dev))
            return render_proxy(self.model, pred.alpha_id, pred.alpha_exp, pred.angles,
                                pred.translation, K, (W, H))
