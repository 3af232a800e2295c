"""Inspection of a contract-4 dataset: a summary for people and a preview grid PNG.

:func:`dataset_info` validates the file (:func:`faceps.datasets.schema.validate_file`),
counts sources and subjects over all samples, measures value ranges on an evenly spaced
subset of samples, and optionally writes a preview grid: one row per sample with each
light's image tone-mapped, the ground-truth normals, the proxy normals and the mask.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from faceps.core.atomic import save_png
from faceps.core.errors import DatasetError
from faceps.core.imageio import normals_to_rgb
from faceps.core.viz import grid, label, tonemap
from faceps.datasets.schema import SAMPLES, DatasetSummary, validate_file

__all__ = ["DatasetInfo", "dataset_info", "preview_grid"]


@dataclass
class DatasetInfo:
    """Summary and statistics of a dataset file.

    Attributes:
        summary: structure found by :func:`validate_file`.
        sources: sample count per ``source`` value.
        n_subjects: distinct ``subject`` values.
        stats_samples: indices of the samples the statistics below were measured on.
        stats: name -> value: ``image_mean``/``image_max`` (linear, over mask pixels of
            all lights), ``mask_fraction``, ``face_mask_fraction`` (when present),
            ``depth_min``/``depth_max`` (mm), ``exposure_min``/``exposure_max`` (when
            present), ``shadow_fraction`` (cast-shadow share of mask pixels, when present),
            ``normals_outside_mask`` (finite normals outside the mask; 0 for valid data).
        preview: the PNG written, if any.
    """

    summary: DatasetSummary
    sources: dict[str, int] = field(default_factory=dict)
    n_subjects: int = 0
    stats_samples: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    preview: Path | None = None

    def text(self) -> str:
        """A multi-line report for people."""
        s = self.summary
        gen = s.generator
        lines = [
            f"dataset      {s.path}",
            f"format       {s.attrs.get('format')}   created {s.created}   model {s.model}",
            f"samples      N={s.n}  lights L={s.n_lights}  size {s.height}x{s.width} (HxW)"
            f"  coefficients id {s.k_id} / exp {s.k_exp} / albedo {s.k_alb}",
            "sources      " + ", ".join(f"{k}: {v}" for k, v in sorted(self.sources.items())),
            f"subjects     {self.n_subjects}",
            f"file size    {s.file_bytes / 2**20:.2f} MiB ({s.file_bytes / max(s.n, 1) / 1024:.1f}"
            f" KiB per sample)",
        ]
        if s.virtual:
            names = [p.name for p in s.shards]
            shown = ", ".join(names[:3]) + (f", ... {names[-1]}" if len(names) > 3 else "")
            lines.append(f"shards       {len(names)}: {shown}")
        else:
            lines.append("shards       none (a single file)")
        lines.append("extras       " + (", ".join(s.extras) or "none"))
        if gen:
            keys = ("builder", "faceps", "seed", "n", "size", "shard_size")
            parts = [f"{k} {gen[k]}" for k in keys if k in gen]
            model = gen.get("model")
            if isinstance(model, dict):
                parts.append(f"model {model.get('name')} ({model.get('fingerprint')})")
            cfg = gen.get("config")
            # the synthetic builder's rendering options; other builders (real captures)
            # record other settings
            if isinstance(cfg, dict) and "shading" in cfg:
                shading = cfg.get("shading", {}) or {}
                sensor = cfg.get("sensor", {}) or {}
                parts.append(f"lights {cfg.get('n_lights')}")
                parts.append(f"crop_scale {cfg.get('crop_scale')}")
                parts.append("lambertian" if shading.get("lambertian") else "with sheen")
                parts.append("cast shadows" if shading.get("cast_shadows") else "no shadows")
                noisy = (sensor.get("full_well") or 0) > 0 or (sensor.get("read_noise") or 0) > 0
                parts.append("sensor noise" if noisy else "no noise")
            lines.append("generator    " + ", ".join(parts))
            if "config_hash" in s.attrs:
                lines.append(f"config hash  {s.attrs['config_hash']}")
        if self.stats:
            lines.append(f"statistics   over {len(self.stats_samples)} of {s.n} samples:")
            for key, value in self.stats.items():
                lines.append(f"  {key:<22} {value:.4g}")
        return "\n".join(lines)


def _subset(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _valid_images(path: Path, f: h5py.File, i: int) -> np.ndarray:
    """(L,) bool: the sample's real images (a valid light row, or an in-the-wild row with
    a positive SH constant term)."""
    valid = _read(path, f, "lights", i)[:, 10] > 0.5
    if f"{SAMPLES}/wild_lighting" in f:
        valid |= _read(path, f, "wild_lighting", i)[:, :3].sum(axis=1) > 0
    return valid


def _read(path: Path, f: h5py.File, name: str, i: int | slice):
    ds = f[f"{SAMPLES}/{name}"]
    try:
        if h5py.check_string_dtype(ds.dtype) is not None:
            return ds.asstr()[i]
        return ds[i]
    except (OSError, RuntimeError, ValueError) as exc:
        raise DatasetError(f"{path}: dataset '{SAMPLES}/{name}': unreadable ({exc})") from None


def _stats(path: Path, f: h5py.File, summary: DatasetSummary, rows: list[int]
           ) -> dict[str, float]:
    sums = Counter()
    img_max = 0.0
    depth_lo, depth_hi = np.inf, -np.inf
    exp_lo, exp_hi = np.inf, -np.inf
    extras = set(summary.extras)
    for i in rows:
        mask = _read(path, f, "mask", i).astype(bool)
        images = _read(path, f, "images", i).astype(np.float32)
        valid = _valid_images(path, f, i)
        normals = _read(path, f, "normals", i)
        depth = _read(path, f, "depth", i)
        sums["pixels"] += mask.size
        sums["mask"] += int(mask.sum())
        if mask.any() and valid.any():
            vals = images[valid][:, mask]
            sums["image_sum"] += float(vals.sum(dtype=np.float64))
            sums["image_count"] += vals.size
            img_max = max(img_max, float(vals.max()))
        finite = np.isfinite(depth)
        if finite.any():
            depth_lo = min(depth_lo, float(depth[finite].min()))
            depth_hi = max(depth_hi, float(depth[finite].max()))
        sums["normals_outside"] += int((np.all(np.isfinite(normals), -1) & ~mask).sum())
        if "face_mask" in extras:
            sums["face"] += int(_read(path, f, "face_mask", i).astype(bool).sum())
        if "shadow" in extras and valid.any():
            shadow = _read(path, f, "shadow", i)[valid].astype(bool)
            sums["shadow"] += int(shadow[:, mask].sum())
            sums["shadow_count"] += int(valid.sum()) * int(mask.sum())
        if "exposure" in extras:
            e = float(_read(path, f, "exposure", i))
            exp_lo, exp_hi = min(exp_lo, e), max(exp_hi, e)
    out: dict[str, float] = {
        "image_mean": sums["image_sum"] / max(sums["image_count"], 1),
        "image_max": img_max,
        "mask_fraction": sums["mask"] / max(sums["pixels"], 1),
    }
    if "face_mask" in extras:
        out["face_mask_fraction"] = sums["face"] / max(sums["pixels"], 1)
    if np.isfinite(depth_lo):
        out["depth_min"], out["depth_max"] = depth_lo, depth_hi
    if "exposure" in extras and np.isfinite(exp_lo):
        out["exposure_min"], out["exposure_max"] = exp_lo, exp_hi
    if "shadow" in extras:
        out["shadow_fraction"] = sums["shadow"] / max(sums["shadow_count"], 1)
    out["normals_outside_mask"] = float(sums["normals_outside"])
    return out


def preview_grid(path: str | os.PathLike, out: str | os.PathLike, *, n: int = 4,
                 tile: int | None = None) -> Path:
    """Write a PNG with one row per sample (n evenly spaced samples): each light's image
    tone-mapped, the ground-truth normals, the proxy normals and the mask.

    Args:
        path: the dataset file (validated structurally first).
        out: the PNG to write (atomically).
        n: number of samples (rows).
        tile: tile height in pixels (default: the image height, at least 128).

    Returns:
        the PNG path.
    """
    path = Path(path)
    summary = validate_file(path, check_data=False)
    rows_idx = _subset(summary.n, max(1, int(n)))
    height = int(tile or min(max(summary.height, 128), 256))
    rows = []
    with h5py.File(path, "r") as f:
        for i in rows_idx:
            mask = _read(path, f, "mask", i).astype(bool)
            images = _read(path, f, "images", i).astype(np.float32)
            valid = _valid_images(path, f, i)
            tiles = []
            for j in range(images.shape[0]):
                img = tonemap(images[j], mask) if valid[j] else np.zeros(images.shape[1:],
                                                                        np.uint8)
                tiles.append(img)
            tiles.append(normals_to_rgb(_read(path, f, "normals", i).astype(np.float32), 40))
            tiles.append(normals_to_rgb(_read(path, f, "proxy_normals", i).astype(np.float32),
                                        40))
            tiles.append(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))
            names = [f"#{i} light {j}" if j == 0 else f"light {j}"
                     for j in range(images.shape[0])] + ["normals", "proxy", "mask"]
            rows.append([label(_upscale(t, height), s) for t, s in zip(tiles, names)])
    return save_png(out, grid(rows, height))


def _upscale(img: np.ndarray, height: int) -> np.ndarray:
    """Nearest-neighbour upscaling of small tiles (keeps pixels visible)."""
    import cv2

    if img.shape[0] >= height:
        return img
    w = max(1, int(round(img.shape[1] * height / img.shape[0])))
    return cv2.resize(img, (w, height), interpolation=cv2.INTER_NEAREST)


def dataset_info(path: str | os.PathLike, *, preview: str | os.PathLike | None = None,
                 max_samples: int = 64, preview_samples: int = 4) -> DatasetInfo:
    """Validate and summarise a contract-4 file (or index).

    Args:
        path: the dataset file.
        preview: optional PNG path for :func:`preview_grid`.
        max_samples: samples the value statistics are measured on (evenly spaced).
        preview_samples: rows of the preview grid.

    Returns:
        :class:`DatasetInfo`.

    Raises:
        DatasetError: naming the file and the dataset for anything missing, inconsistent
        or unreadable.
    """
    path = Path(path)
    summary = validate_file(path, check_data=True)
    rows = _subset(summary.n, max(1, int(max_samples)))
    with h5py.File(path, "r") as f:
        sources = Counter(str(s) for s in _read(path, f, "source", slice(None)))
        subjects = set(str(s) for s in _read(path, f, "subject", slice(None)))
        stats = _stats(path, f, summary, rows)
    info = DatasetInfo(summary=summary, sources=dict(sources), n_subjects=len(subjects),
                       stats_samples=rows, stats=stats)
    if preview is not None:
        info.preview = preview_grid(path, preview, n=preview_samples)
    return info
