"""Torch access to contract-4 HDF5 datasets: a lazy ``Dataset``, subject-disjoint splits,
augmentations that keep the ground truth consistent, and batching of 1..L images.

Reading
    :class:`FaceDataset` reads one sample per ``__getitem__`` from a contract-4 file (a
    shard, a plain file, or the virtual index of a sharded build). Nothing is loaded at
    construction beyond the file's summary; the ``h5py`` file is opened on first access in
    each process (a handle inherited through ``fork`` or found after unpickling is never
    reused), so the dataset works with ``DataLoader(num_workers > 0)``.

Sample layout (what ``__getitem__`` returns; k = images chosen, H x W the output size)

    ==================  ===============  =======  ========================================
    key                 shape            dtype    content
    ==================  ===============  =======  ========================================
    ``images``          (k, 3, H, W)     float32  linear intensities, RGB, channel first
    ``lights``          (k, 11)          float32  :data:`faceps.core.lights.LIGHT_ROW` rows
                                                  of the chosen images (same order)
    ``light_index``     (k,)             int64    which rows of the file's ``lights`` they are
    ``normals``         (3, H, W)        float32  unit ground-truth normals (camera frame);
                                                  0 where ``mask`` is 0
    ``proxy_normals``   (3, H, W)        float32  unit proxy normals; 0 where ``proxy_mask``
                                                  is 0
    ``mask``            (H, W)           float32  1 where normals, albedo and depth are known
    ``proxy_mask``      (H, W)           float32  1 where the proxy normals are known
    ``face_mask``       (H, W)           float32  1 on the face region (the file's
                                                  ``face_mask``; ``mask`` when absent)
    ``albedo``          (3, H, W)        float32  linear albedo; 0 where ``mask`` is 0
    ``depth``           (H, W)           float32  z in mm; 0 where ``mask`` is 0
    ``K``               (3, 3)           float32  intrinsics of the (augmented) crop, pixels
    ``landmarks``       (68, 2)          float32  iBUG-68 (u, v) pixels; 0 where unknown
    ``landmark_mask``   (68,)            float32  1 where the landmark is known
    ``params``          dict             float32  ``id`` (k_id,), ``exp`` (k_exp,),
                                                  ``albedo`` (k_alb,), ``pose`` (6,) pitch,
                                                  yaw, roll (rad), tx, ty, tz (mm)
    ``subject``         str                       subject id
    ``source``          str                       ``synthetic``, ``scan`` or ``real``
    ``index``           int                       row of the sample in the file
    ==================  ===============  =======  ========================================

    NaN ("no value" on disk) never reaches a tensor: it becomes 0 and the matching mask
    says where values are. Padding light rows (valid flag 0, zero images) are never chosen,
    so every image of a sample is valid; the images of an in-the-wild sample (``lighting``
    ``wild``: no point lights) are valid by their ``wild_lighting`` rows.

Image counts and batching
    ``n_images`` chooses how many of a sample's valid images are returned: all (None), a
    fixed k, or a range (k_min, k_max) drawn per sample; the chosen rows keep their file
    order and ``lights`` stays aligned with ``images``. Batches of samples with different
    counts are padded by :func:`collate_samples` (zero images, zero light rows, and a
    boolean ``image_mask`` (B, k_max)). To train as the paper does (one count per
    mini-batch), use :class:`ImageCountBatchSampler`: it draws k per batch and passes
    ``(index, k)`` keys, which ``__getitem__`` accepts.

Augmentations (:class:`AugmentConfig`, applied in this order after choosing the images)
    1. crop/scale: a similarity of the pixel plane ``p' = s p + o`` (pixel centres at integer
       coordinates), resampled bilinearly; K becomes ``A K`` with ``A = [[s, 0, o_x],
       [0, s, o_y], [0, 0, 1]]`` and landmarks ``s q + o``; 3D quantities (normals, depth,
       lights, pose) are unchanged because the camera frame is. Pixel maps with missing
       values are interpolated from their known neighbours only and stay known only where
       all neighbours with weight are known, so ``mask`` keeps meaning "ground truth here".
    2. intensity: images times a global factor g (times a per-channel factor for colour
       jitter); light intensities (columns r, g, b) are multiplied by the same factors, so
       the images still follow eq. 1 with the returned lights.
    3. noise: additive Gaussian noise per image with standard deviation ``noise_std`` times
       that image's mean intensity over ``mask`` (the whole image without a mask).

    Mirroring is not offered: it would flip the camera frame and no longer match the
    (asymmetric) model coefficients.

Splits
    :func:`split_subjects` assigns whole subjects to splits (deterministic for a seed);
    :func:`write_split` writes one JSON file per split (format ``faceps.split/1``) listing
    the rows of the source file, read back by :func:`load_split` and
    :meth:`FaceDataset.from_split`. JSON was chosen over HDF5 virtual datasets: the lists
    are small, readable and diffable, and no second copy of the HDF5 mapping must be kept
    in step with the shards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, RandomSampler, Sampler

from faceps.core.atomic import save_json
from faceps.core.errors import ConfigError, DatasetError
from faceps.datasets.schema import SAMPLES, now_iso, validate_file

__all__ = [
    "SPLIT_FORMAT",
    "SPLIT_NAMES",
    "FIELD_GROUPS",
    "AugmentConfig",
    "FaceDataset",
    "Split",
    "SplitResult",
    "split_subjects",
    "write_split",
    "load_split",
    "crop_scale",
    "random_crop_scale",
    "scale_intensity",
    "add_noise",
    "collate_samples",
    "ImageCountBatchSampler",
]

SPLIT_FORMAT = "faceps.split/1"
SPLIT_NAMES = ("train", "val", "test")
#: column slice of the RGB intensities in a light row (faceps.core.lights.LIGHT_ROW)
_RGB = slice(3, 6)
#: column of the valid flag in a light row
_VALID = 10
#: a resampled pixel is known when the known neighbours carry at least this weight
_KNOWN_WEIGHT = 1.0 - 1e-4

#: output groups that ``fields`` may select -> HDF5 datasets they read
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "images": ("images", "lights"),
    "normals": ("normals", "mask"),
    "proxy_normals": ("proxy_normals",),
    "mask": ("mask",),
    "face_mask": ("face_mask", "mask"),
    "albedo": ("albedo", "mask"),
    "depth": ("depth", "mask"),
    "K": ("K",),
    "landmarks": ("landmarks",),
    "params": ("params/id", "params/exp", "params/albedo", "params/pose"),
}


# ------------------------------------------------------------------ configuration
def _range(value: Any, name: str, low: float, *, positive: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (low, high); got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or a < low or (positive and a <= 0):
        raise ConfigError(f"{name} must satisfy {low} {'<' if positive else '<='} low <= high; "
                          f"got {value!r}")
    return a, b


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentations that keep the ground truth consistent (module docstring).

    Attributes:
        scale_range: (low, high) zoom factor s of the crop (output pixels per input pixel),
            drawn log-uniformly; s > 1 enlarges the face. (1, 1): no zoom.
        shift: maximum shift of the crop centre, fraction of the input size per axis
            (uniform in [-shift, shift]).
        out_size: (W, H) output size in pixels; None keeps the input size.
        intensity_range: (low, high) global intensity factor, drawn log-uniformly.
        color_jitter: per-channel factors exp(U(-c, c)) on top of the global one.
        noise_std: additive Gaussian noise, relative to each image's mean over the mask.
    """

    scale_range: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0
    out_size: tuple[int, int] | None = None
    intensity_range: tuple[float, float] = (1.0, 1.0)
    color_jitter: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range",
                           _range(self.scale_range, "scale_range", 0.0, positive=True))
        object.__setattr__(self, "intensity_range",
                           _range(self.intensity_range, "intensity_range", 0.0, positive=True))
        for name in ("shift", "color_jitter", "noise_std"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        if self.shift > 0.5:
            raise ConfigError(f"shift must be <= 0.5 (fraction of the image); got {self.shift}")
        if self.out_size is not None:
            try:
                w, h = (int(s) for s in self.out_size)
            except (TypeError, ValueError):
                raise ConfigError(f"out_size must be (W, H); got {self.out_size!r}") from None
            if w < 2 or h < 2:
                raise ConfigError(f"out_size must be at least (2, 2); got {self.out_size!r}")
            object.__setattr__(self, "out_size", (w, h))

    @classmethod
    def training(cls) -> AugmentConfig:
        """Defaults for training: +-10 % zoom, 5 % shift, intensity x0.5..2, 5 % colour
        jitter and 1 % noise."""
        return cls(scale_range=(0.9, 1.1), shift=0.05, intensity_range=(0.5, 2.0),
                   color_jitter=0.05, noise_std=0.01)

    @property
    def geometric(self) -> bool:
        """True when the crop/scale step changes the pixel grid."""
        return (self.scale_range != (1.0, 1.0) or self.shift > 0
                or self.out_size is not None)

    @property
    def photometric(self) -> bool:
        """True when intensities are scaled."""
        return self.intensity_range != (1.0, 1.0) or self.color_jitter > 0

    def to_dict(self) -> dict:
        return asdict(self)


def _image_count(n_images: Any) -> tuple[int, int] | None:
    if n_images is None:
        return None
    if isinstance(n_images, int | np.integer):
        lo = hi = int(n_images)
    else:
        try:
            lo, hi = (int(v) for v in n_images)
        except (TypeError, ValueError):
            raise ConfigError(f"n_images must be None, an int or (min, max); "
                              f"got {n_images!r}") from None
    if lo < 1 or hi < lo:
        raise ConfigError(f"n_images must satisfy 1 <= min <= max; got {n_images!r}")
    return lo, hi


# ------------------------------------------------------------------ the dataset
class FaceDataset(Dataset):
    """Samples of a contract-4 HDF5 file as float32 tensors (layout: module docstring).

    Args:
        path: a contract-4 ``.h5`` file: a plain file, a shard, or a virtual index.
        indices: rows of the file this dataset exposes (default: all, in order).
        n_images: images per sample: None (all valid), k, or (k_min, k_max) drawn
            uniformly per sample; a sample with fewer valid images returns all of them.
        augment: random augmentations; None for none.
        fields: output groups to read (keys of :data:`FIELD_GROUPS`); None for all.
            ``subject``, ``source`` and ``index`` are always returned; ``K`` and the masks
            that the augmentations need are read when needed.

    Randomness: ``__getitem__`` draws from torch's global generator (seeded per worker by
    the ``DataLoader``), so ``torch.manual_seed`` makes loading reproducible;
    :meth:`sample` takes an explicit generator.

    Raises:
        DatasetError: when the file is not a valid contract-4 file or an index is out of
            range.
        ConfigError: for invalid options.
    """

    def __init__(self, path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None,
                 *, n_images: int | tuple[int, int] | None = None,
                 augment: AugmentConfig | None = None,
                 fields: Iterable[str] | None = None) -> None:
        self.path = Path(path)
        summary = validate_file(self.path, check_data=False)
        self.n_total = summary.n
        self.n_lights = summary.n_lights
        self.height, self.width = summary.height, summary.width
        self.k_id, self.k_exp, self.k_alb = summary.k_id, summary.k_exp, summary.k_alb
        self.model = summary.model
        self.has_face_mask = "face_mask" in summary.datasets
        if indices is None:
            rows = np.arange(self.n_total, dtype=np.int64)
        else:
            rows = np.asarray(indices, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= self.n_total):
                raise DatasetError(f"{self.path}: indices must be in [0, {self.n_total}); "
                                   f"got {int(rows.min())}..{int(rows.max())}")
        self.indices = rows
        self.n_images = _image_count(n_images)
        self.augment = augment
        if fields is None:
            groups = tuple(FIELD_GROUPS)
        else:
            groups = tuple(dict.fromkeys(fields))
            unknown = [g for g in groups if g not in FIELD_GROUPS]
            if unknown:
                raise ConfigError(f"unknown fields {unknown}; known: {', '.join(FIELD_GROUPS)}")
        self.fields = groups
        needed = {name for g in groups for name in FIELD_GROUPS[g]}
        if augment is not None and augment.geometric:
            if needed & {"images", "normals", "proxy_normals", "mask", "albedo", "depth",
                         "landmarks"}:
                needed.add("K")
        if augment is not None and augment.noise_std > 0 and "images" in needed:
            needed.add("mask")
        if "face_mask" in needed and not self.has_face_mask:
            needed.discard("face_mask")
        if "images" in needed and "wild_lighting" in summary.datasets:
            needed.add("wild_lighting")     # which images of a wild sample are valid
        self._read = tuple(sorted(needed))
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid: int | None = None

    @classmethod
    def from_split(cls, split: str | os.PathLike, **kwargs: Any) -> FaceDataset:
        """The rows of a split file written by :func:`write_split` (keywords as
        :class:`FaceDataset`)."""
        s = load_split(split)
        return cls(s.dataset, s.indices, **kwargs)

    # ------------------------------------------------------------ file handles
    def _handle(self, name: str) -> h5py.Dataset:
        """The ``samples/<name>`` dataset, opening the file once per process."""
        if self._file is None or self._pid != os.getpid():
            # a handle inherited through fork shares HDF5 state with the parent: drop it
            self._file, self._datasets = None, {}
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise DatasetError(f"{self.path}: cannot open ({exc})") from None
            self._pid = os.getpid()
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self._file[f"{SAMPLES}/{name}"]
        return ds

    @property
    def is_open(self) -> bool:
        """True when this process holds an open file handle."""
        return self._file is not None and self._pid == os.getpid()

    def close(self) -> None:
        """Close this process's file handle (it is reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._datasets, self._pid = None, {}, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _datasets={}, _pid=None)
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.indices.size)

    def subjects(self) -> list[str]:
        """The subject id of every sample of this dataset (one read of the column)."""
        col = self._handle("subject").asstr()[:]
        return [str(col[i]) for i in self.indices]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key`` (a position in this dataset), or ``(position, k)`` to ask for k
        images (as :class:`ImageCountBatchSampler` does)."""
        k = None
        if isinstance(key, tuple):
            key, k = key
        needs_rng = (self.n_images is not None and self.n_images[0] != self.n_images[1]) or (
            self.augment is not None) or k is not None
        rng = (np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
               if needs_rng else None)
        return self.sample(int(key), k=k, rng=rng)

    def sample(self, i: int, *, k: int | None = None,
               rng: np.random.Generator | int | None = None) -> dict[str, Any]:
        """Sample at position ``i`` of this dataset.

        Args:
            i: position in [0, len(self)) (negative counts from the end).
            k: images to return (overrides ``n_images``); None: as configured.
            rng: generator (or seed) for the random choices; None: seed 0.

        Returns:
            dict in the module's sample layout.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range [0, {n})")
        row = int(self.indices[i])
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(0 if rng is None else rng)
        raw = {name: self._handle(name)[row] for name in self._read}
        out = self._to_tensors(raw, row, k, rng)
        if self.augment is not None:
            out = self._apply_augment(out, rng)
        return out

    def _choose_images(self, lights: np.ndarray, k: int | None,
                       rng: np.random.Generator, wild: np.ndarray | None = None
                       ) -> np.ndarray:
        ok = lights[:, _VALID] > 0.5
        if wild is not None:  # in-the-wild images: a positive SH constant term
            ok |= np.asarray(wild, np.float32)[:, :3].sum(axis=1) > 0
        valid = np.flatnonzero(ok)
        if valid.size == 0:
            raise DatasetError(f"{self.path}: a sample without any valid light")
        if k is None and self.n_images is not None:
            lo, hi = self.n_images
            k = lo if lo == hi else int(rng.integers(lo, hi + 1))
        if k is None or k >= valid.size:
            return valid
        if k < 1:
            raise ConfigError(f"k must be >= 1; got {k}")
        return np.sort(rng.choice(valid, size=k, replace=False))

    def _to_tensors(self, raw: dict[str, Any], row: int, k: int | None,
                    rng: np.random.Generator) -> dict[str, Any]:
        out: dict[str, Any] = {}
        t = torch.from_numpy
        if "images" in raw:
            lights = np.asarray(raw["lights"], np.float32)
            chosen = self._choose_images(lights, k, rng, raw.get("wild_lighting"))
            imgs = np.asarray(raw["images"][chosen], np.float32)
            out["images"] = t(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
            out["lights"] = t(np.ascontiguousarray(lights[chosen]))
            out["light_index"] = t(chosen.astype(np.int64))
        if "mask" in raw:
            mask = np.asarray(raw["mask"]) > 0
            if "mask" in self.fields or any(g in self.fields for g in
                                            ("normals", "albedo", "depth", "face_mask")):
                out["mask"] = t(mask.astype(np.float32))
            else:
                out["_mask"] = t(mask.astype(np.float32))  # for the noise level only
        if "normals" in raw:
            out["normals"] = _unit_map(raw["normals"], out["mask"] > 0)
        if "proxy_normals" in raw:
            pn = np.asarray(raw["proxy_normals"], np.float32)
            pmask = np.all(np.isfinite(pn), axis=-1)
            out["proxy_normals"] = _unit_map(pn, torch.from_numpy(pmask))
            out["proxy_mask"] = t(pmask.astype(np.float32))
        if "face_mask" in self.fields:
            fm = (np.asarray(raw["face_mask"]) > 0) if "face_mask" in raw else mask
            out["face_mask"] = t((fm & mask).astype(np.float32))
        if "albedo" in raw:
            a = np.nan_to_num(np.asarray(raw["albedo"], np.float32).transpose(2, 0, 1))
            out["albedo"] = t(np.ascontiguousarray(a)) * out["mask"]
        if "depth" in raw:
            d = np.nan_to_num(np.asarray(raw["depth"], np.float32))
            out["depth"] = t(d) * out["mask"]
        if "K" in raw:
            out["K"] = t(np.asarray(raw["K"], np.float32))
        if "landmarks" in raw:
            lm = np.asarray(raw["landmarks"], np.float32)
            ok = np.all(np.isfinite(lm), axis=-1)
            out["landmarks"] = t(np.where(ok[:, None], lm, 0.0).astype(np.float32))
            out["landmark_mask"] = t(ok.astype(np.float32))
        if "params/pose" in raw:
            out["params"] = {key: t(np.asarray(raw[f"params/{key}"], np.float32))
                             for key in ("id", "exp", "albedo", "pose")}
        handle = self._handle
        out["subject"] = str(handle("subject").asstr()[row])
        out["source"] = str(handle("source").asstr()[row])
        out["index"] = row
        return out

    def _apply_augment(self, s: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        aug = self.augment
        if aug is None:
            return s
        if aug.geometric and "K" in s:
            s = random_crop_scale(s, aug, rng)
        if aug.photometric and "images" in s:
            lo, hi = aug.intensity_range
            g = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            c = np.exp(rng.uniform(-aug.color_jitter, aug.color_jitter, size=3))
            s = scale_intensity(s, g * c)
        if aug.noise_std > 0 and "images" in s:
            mask = s.get("mask", s.get("_mask"))
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            s = add_noise(s, aug.noise_std, mask, generator=gen)
        s.pop("_mask", None)
        return s


def _unit_map(normals: Any, valid: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) normals with NaN -> (3, H, W) unit float32, 0 where not ``valid``."""
    n = torch.from_numpy(np.nan_to_num(np.asarray(normals, np.float32))).permute(2, 0, 1)
    norm = n.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return (n / norm * valid.to(n.dtype)).contiguous()


# ------------------------------------------------------------------ augmentations
def _sample_grid(scale: float, offset: tuple[float, float], in_size: tuple[int, int],
                 out_size: tuple[int, int]) -> torch.Tensor:
    """(1, H', W', 2) grid_sample coordinates (align_corners=True) of the input points
    ``p = (p' - o) / s`` seen by the output pixel centres p'."""
    W, H = in_size
    Wo, Ho = out_size
    u = (torch.arange(Wo, dtype=torch.float64) - offset[0]) / scale
    v = (torch.arange(Ho, dtype=torch.float64) - offset[1]) / scale
    x = 2.0 * u / max(W - 1, 1) - 1.0
    y = 2.0 * v / max(H - 1, 1) - 1.0
    grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)
    return grid.to(torch.float32).unsqueeze(0)


def _resample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of (C, H, W) at ``grid``; zero outside."""
    return torch.nn.functional.grid_sample(x.unsqueeze(0), grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=True)[0]


def _resample_known(x: torch.Tensor, known: torch.Tensor, grid: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample values known where ``known`` (H, W) is 1: interpolate the known neighbours
    only; a result is known where they carry (almost) all the weight. Returns (values with
    0 where unknown, known (H', W') float32)."""
    k = known.to(torch.float32).unsqueeze(0)
    num = _resample(x * k, grid)
    den = _resample(k, grid)
    ok = den >= _KNOWN_WEIGHT
    vals = torch.where(ok, num / den.clamp_min(1e-8), torch.zeros_like(num))
    return vals, ok[0].to(torch.float32)


def crop_scale(sample: Mapping[str, Any], scale: float, offset: tuple[float, float],
               out_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Apply the pixel-plane similarity ``p' = scale * p + offset`` to a sample.

    Pixel maps are resampled bilinearly (pixel centres at integer coordinates); maps with
    missing values use :func:`_resample_known` so the masks stay exact; normals are
    renormalised; ``K`` becomes ``A @ K`` and landmarks ``scale * q + offset``. Everything
    3D (lights, pose, params, depth values) is unchanged.

    Args:
        sample: a sample in the module's layout (needs ``K``; any subset of the maps).
        scale: s > 0, output pixels per input pixel.
        offset: (o_x, o_y) pixels.
        out_size: (W', H'); None keeps the input size.

    Returns:
        a new sample dict (inputs are not modified).
    """
    if not scale > 0:
        raise ConfigError(f"scale must be > 0; got {scale}")
    s = dict(sample)
    shape = next((v.shape[-2:] for key, v in s.items()
                  if key in ("images", "normals", "mask", "depth", "albedo", "proxy_normals")),
                 None)
    if shape is None:
        raise DatasetError("crop_scale needs at least one pixel map in the sample")
    H, W = int(shape[0]), int(shape[1])
    Wo, Ho = (W, H) if out_size is None else (int(out_size[0]), int(out_size[1]))
    ox, oy = float(offset[0]), float(offset[1])
    grid = _sample_grid(float(scale), (ox, oy), (W, H), (Wo, Ho))
    if "images" in s:
        imgs = s["images"]
        s["images"] = torch.nn.functional.grid_sample(
            imgs, grid.expand(imgs.shape[0], -1, -1, -1), mode="bilinear",
            padding_mode="zeros", align_corners=True)
    for mask_key in ("mask", "_mask"):
        if mask_key in s:
            known = s[mask_key]
            new_mask = _resample_known(known.unsqueeze(0), known, grid)[1]
            if "normals" in s:
                n, _ = _resample_known(s["normals"], known, grid)
                s["normals"] = n / n.norm(dim=0, keepdim=True).clamp_min(1e-8) * new_mask
            if "albedo" in s:
                s["albedo"] = _resample_known(s["albedo"], known, grid)[0]
            if "depth" in s:
                s["depth"] = _resample_known(s["depth"].unsqueeze(0), known, grid)[0][0]
            if "face_mask" in s and mask_key == "mask":
                fm = _resample(s["face_mask"].unsqueeze(0), grid)[0]
                s["face_mask"] = ((fm > 0.5).to(torch.float32) * new_mask)
            s[mask_key] = new_mask
    if "proxy_normals" in s:
        known = s.get("proxy_mask", (s["proxy_normals"].norm(dim=0) > 0.5).to(torch.float32))
        n, ok = _resample_known(s["proxy_normals"], known, grid)
        s["proxy_normals"] = n / n.norm(dim=0, keepdim=True).clamp_min(1e-8) * ok
        s["proxy_mask"] = ok
    if "K" in s:
        A = torch.tensor([[scale, 0.0, ox], [0.0, scale, oy], [0.0, 0.0, 1.0]],
                         dtype=torch.float64)
        s["K"] = (A @ s["K"].to(torch.float64)).to(torch.float32)
    if "landmarks" in s:
        lm = s["landmarks"] * scale + torch.tensor([ox, oy], dtype=torch.float32)
        if "landmark_mask" in s:
            lm = lm * s["landmark_mask"][:, None]
        s["landmarks"] = lm
    return s


def random_crop_scale(sample: Mapping[str, Any], config: AugmentConfig,
                      rng: np.random.Generator) -> dict[str, Any]:
    """:func:`crop_scale` with a random zoom and shift drawn as ``config`` says: the input
    point ``c + delta`` (c the image centre, delta uniform within ``shift`` times the size)
    lands on the output centre."""
    s = dict(sample)
    shape = next(v.shape[-2:] for key, v in s.items()
                 if key in ("images", "normals", "mask", "depth", "albedo", "proxy_normals"))
    H, W = int(shape[0]), int(shape[1])
    Wo, Ho = config.out_size or (W, H)
    lo, hi = config.scale_range
    scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    delta = rng.uniform(-config.shift, config.shift, size=2) * np.array([W, H])
    cx, cy = (W - 1) / 2 + delta[0], (H - 1) / 2 + delta[1]
    offset = ((Wo - 1) / 2 - scale * cx, (Ho - 1) / 2 - scale * cy)
    return crop_scale(s, scale, offset, (Wo, Ho))


def scale_intensity(sample: Mapping[str, Any], factor: float | Sequence[float] | np.ndarray
                    ) -> dict[str, Any]:
    """Multiply images and light intensities by the same factor (one number or RGB), so
    the images still follow eq. 1 with the returned lights.

    Args:
        sample: with ``images`` (k, 3, H, W) and ``lights`` (k, 11).
        factor: > 0, scalar or (3,) per channel.

    Returns:
        a new sample dict.
    """
    f = torch.as_tensor(np.broadcast_to(np.asarray(factor, np.float64), (3,)).copy(),
                        dtype=torch.float32)
    if not bool(torch.all(f > 0)):
        raise ConfigError(f"intensity factors must be > 0; got {f.tolist()}")
    s = dict(sample)
    s["images"] = s["images"] * f[None, :, None, None]
    lights = s["lights"].clone()
    lights[:, _RGB] = lights[:, _RGB] * f
    s["lights"] = lights
    return s


def add_noise(sample: Mapping[str, Any], std: float, mask: torch.Tensor | None = None, *,
              generator: torch.Generator | None = None) -> dict[str, Any]:
    """Additive Gaussian noise on the images: per image, standard deviation ``std`` times
    its mean intensity over ``mask`` (H, W) (the whole image when None or empty).

    Returns:
        a new sample dict (images are linear and not clipped, so values may go negative).
    """
    s = dict(sample)
    imgs = s["images"]
    if mask is not None and float(mask.sum()) > 0:
        w = mask.to(imgs.dtype)
        level = (imgs * w).sum(dim=(1, 2, 3)) / (3.0 * w.sum())
    else:
        level = imgs.mean(dim=(1, 2, 3))
    noise = torch.randn(imgs.shape, generator=generator, dtype=imgs.dtype)
    s["images"] = imgs + noise * (float(std) * level.abs())[:, None, None, None]
    return s


# ------------------------------------------------------------------ batching
def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples whose image counts may differ.

    ``images`` become (B, k_max, 3, H, W) with zero padding, ``lights`` (B, k_max, 11) with
    zero rows (valid flag 0), ``light_index`` (B, k_max) with -1, and ``image_mask``
    (B, k_max) bool marks the real images. Other tensors are stacked, ``params`` stacked per
    key, strings become lists, ints an int64 tensor.

    Raises:
        DatasetError: when the samples' pixel maps differ in size or keys differ.
    """
    if not batch:
        raise DatasetError("cannot collate an empty batch")
    keys = list(batch[0].keys())
    if any(list(b.keys()) != keys for b in batch[1:]):
        raise DatasetError("samples of a batch hold different keys")
    out: dict[str, Any] = {}
    if "images" in batch[0]:
        counts = [int(b["images"].shape[0]) for b in batch]
        kmax = max(counts)
        B = len(batch)
        shape = batch[0]["images"].shape[1:]
        if any(b["images"].shape[1:] != shape for b in batch):
            raise DatasetError("samples of a batch have images of different sizes")
        images = batch[0]["images"].new_zeros((B, kmax) + tuple(shape))
        lights = batch[0]["lights"].new_zeros((B, kmax, batch[0]["lights"].shape[-1]))
        index = torch.full((B, kmax), -1, dtype=torch.int64)
        image_mask = torch.zeros((B, kmax), dtype=torch.bool)
        for i, (b, c) in enumerate(zip(batch, counts)):
            images[i, :c] = b["images"]
            lights[i, :c] = b["lights"]
            if "light_index" in b:
                index[i, :c] = b["light_index"]
            image_mask[i, :c] = True
        out.update(images=images, lights=lights, light_index=index, image_mask=image_mask)
    for key in keys:
        if key in out or key == "light_index":
            continue
        values = [b[key] for b in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            try:
                out[key] = torch.stack(values)
            except RuntimeError as exc:
                raise DatasetError(f"cannot batch '{key}': {exc}") from None
        elif isinstance(first, Mapping):
            out[key] = {k: torch.stack([v[k] for v in values]) for k in first}
        elif isinstance(first, int | np.integer):
            out[key] = torch.as_tensor(values, dtype=torch.int64)
        else:
            out[key] = list(values)
    return out


class ImageCountBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, k)`` keys with one image count k per batch (the paper draws 1,
    2 or 3 images per mini-batch), for ``DataLoader(dataset, batch_sampler=...)``.

    Args:
        sampler: the sample order: a ``Sampler`` over positions, or the dataset length
            (a ``RandomSampler`` is made).
        batch_size: samples per batch.
        counts: the image counts to draw from (uniformly per batch).
        drop_last: drop a last incomplete batch.
        generator: torch generator for the counts (and the default sampler).
    """

    def __init__(self, sampler: Sampler[int] | int, batch_size: int,
                 counts: Sequence[int] = (1, 2, 3), *, drop_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(sampler, int | np.integer):
            sampler = RandomSampler(range(int(sampler)), generator=generator)
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
        counts = tuple(int(c) for c in counts)
        if not counts or min(counts) < 1:
            raise ConfigError(f"counts must be a non-empty list of integers >= 1; got {counts}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.counts = counts
        self.drop_last = bool(drop_last)
        self.generator = generator

    def _count(self) -> int:
        j = int(torch.randint(len(self.counts), (), generator=self.generator))
        return self.counts[j]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                k = self._count()
                yield [(j, k) for j in batch]
                batch = []
        if batch and not self.drop_last:
            k = self._count()
            yield [(j, k) for j in batch]

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


# ------------------------------------------------------------------ splits
def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray([float(x) for x in fractions], dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ConfigError(f"fractions must be numbers >= 0; got {list(fractions)}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(f"fractions must sum to 1; got {list(fractions)} "
                          f"(sum {f.sum():.6g})")
    return f


def _subject_counts(n: int, f: np.ndarray) -> np.ndarray:
    """Subjects per split: largest-remainder rounding of ``n * f``; every split with a
    positive fraction gets at least one subject when there are enough."""
    exact = n * f
    counts = np.floor(exact).astype(np.int64)
    for j in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[j] += 1
    positive = np.flatnonzero(f > 0)
    if n >= positive.size:
        for j in positive:
            if counts[j] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[j] += 1
    return counts


def split_subjects(subjects: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> list[np.ndarray]:
    """Assign whole subjects to splits; return the sample positions of each split.

    The distinct subjects are sorted, shuffled with ``numpy.random.default_rng(seed)`` and
    cut into consecutive groups whose sizes are ``fractions`` of the number of subjects
    (largest-remainder rounding; a split with a positive fraction gets at least one subject
    when there are at least as many subjects as such splits). So the result depends only
    on the set of subjects and the seed, not on the sample order, and no subject is in two
    splits. Fractions count subjects, not samples, as the paper splits by subject.

    Args:
        subjects: (N,) subject id per sample.
        fractions: one fraction >= 0 per split, summing to 1.
        seed: shuffle seed.

    Returns:
        one sorted int64 array of sample positions per split.
    """
    f = _check_fractions(fractions)
    subj = np.asarray([str(s) for s in subjects], dtype=object)
    unique = sorted(set(subj.tolist()))
    order = np.random.default_rng(int(seed)).permutation(len(unique))
    counts = _subject_counts(len(unique), f)
    split_of: dict[str, int] = {}
    start = 0
    for j, c in enumerate(counts):
        for pos in order[start:start + int(c)]:
            split_of[unique[int(pos)]] = j
        start += int(c)
    which = np.asarray([split_of[s] for s in subj.tolist()], dtype=np.int64)
    return [np.flatnonzero(which == j).astype(np.int64) for j in range(f.size)]


@dataclass(frozen=True)
class Split:
    """One split file (format ``faceps.split/1``).

    Attributes:
        name: split name (``train``, ``val``, ``test``, ...).
        dataset: the contract-4 file the rows belong to (resolved path).
        indices: (n,) int64 rows of that file.
        subjects: the distinct subjects of the split, sorted.
        seed, fractions: how the split was drawn (fractions by split name).
        path: the JSON file it was read from.
    """

    name: str
    dataset: Path
    indices: np.ndarray
    subjects: tuple[str, ...]
    seed: int
    fractions: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.indices.size)


@dataclass(frozen=True)
class SplitResult:
    """What :func:`write_split` wrote: the split files by name, their sample and subject
    counts."""

    files: dict[str, Path]
    samples: dict[str, int]
    subjects: dict[str, int]

    def summary(self) -> str:
        return ", ".join(f"{k}: {self.samples[k]} samples / {self.subjects[k]} subjects "
                         f"({self.files[k].name})" for k in self.files)


def write_split(src: str | os.PathLike, out_dir: str | os.PathLike,
                fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, *,
                names: Sequence[str] = SPLIT_NAMES) -> SplitResult:
    """Split a contract-4 dataset by subject and write ``OUT_DIR/<name>.json`` per split.

    Each file holds ``format`` (:data:`SPLIT_FORMAT`), ``split`` (its name), ``dataset``
    (the source file, relative to ``out_dir`` when possible, so both can move together),
    ``created``, ``seed``, ``fractions`` (by name), ``n``, ``subjects`` (sorted) and
    ``indices`` (rows of the source file, sorted). Written atomically.

    Args:
        src: the dataset (plain file, shard or virtual index).
        out_dir: folder for the split files (created).
        fractions: one per name, >= 0, summing to 1.
        seed: shuffle seed of :func:`split_subjects`.
        names: split names (default train, val, test).

    Returns:
        :class:`SplitResult`.

    Raises:
        DatasetError: when ``src`` is not a valid dataset.
        ConfigError: for invalid fractions or names.
    """
    names = tuple(str(n) for n in names)
    f = _check_fractions(fractions)
    if len(names) != f.size:
        raise ConfigError(f"{f.size} fractions given for {len(names)} split names {names}")
    if len(set(names)) != len(names) or not all(n and "/" not in n and n.strip() == n
                                                for n in names):
        raise ConfigError(f"split names must be distinct, non-empty file names; got {names}")
    src = Path(src)
    validate_file(src, check_data=False)
    with h5py.File(src, "r") as h:
        subjects = [str(s) for s in h[f"{SAMPLES}/subject"].asstr()[:]]
    parts = split_subjects(subjects, f, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        rel = os.path.relpath(src.resolve(), out.resolve())
    except ValueError:  # another drive on Windows
        rel = str(src.resolve())
    files, samples, subj_counts = {}, {}, {}
    for name, rows in zip(names, parts):
        subj = sorted({subjects[i] for i in rows})
        doc = {
            "format": SPLIT_FORMAT,
            "split": name,
            "dataset": Path(rel).as_posix(),
            "created": now_iso(),
            "seed": int(seed),
            "fractions": {n: float(x) for n, x in zip(names, f)},
            "n": int(rows.size),
            "subjects": subj,
            "indices": [int(i) for i in rows],
        }
        files[name] = save_json(out / f"{name}.json", doc)
        samples[name] = int(rows.size)
        subj_counts[name] = len(subj)
    return SplitResult(files, samples, subj_counts)


def load_split(path: str | os.PathLike) -> Split:
    """Read a split file written by :func:`write_split`.

    Raises:
        DatasetError: naming the file and field when it is missing or malformed.
    """
    import json

    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{p}: no such split file") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{p}: not a readable JSON split file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
        raise DatasetError(f"{p}: field 'format' must be '{SPLIT_FORMAT}'")
    for key, kind in (("split", str), ("dataset", str), ("indices", list)):
        if not isinstance(doc.get(key), kind):
            raise DatasetError(f"{p}: field '{key}' is missing or not a {kind.__name__}")
    idx = doc["indices"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
        raise DatasetError(f"{p}: field 'indices' must hold integers >= 0")
    dataset = Path(doc["dataset"])
    if not dataset.is_absolute():
        dataset = (p.parent / dataset).resolve()
    return Split(name=doc["split"], dataset=dataset, indices=np.asarray(idx, np.int64),
                 subjects=tuple(str(s) for s in doc.get("subjects", [])),
                 seed=int(doc.get("seed", 0)),
                 fractions={str(k): float(v) for k, v in dict(doc.get("fractions", {})).items()},
                 path=p)
