"""Evaluation of trained networks on a contract-4 test set (paper section 5, Tables 1-2).

NormalNet runs (:func:`evaluate` with a ``normal`` run)
    Table 1: one row per subset of the sample's lights given as input: each single image
    (``S1``, ``S2``, ``S3``: lights 0, 1, 2 of the file), each pair (``S1&S2``, ...) and all
    of them (``S1&S2&S3``), the single-image rows pooled (``S*``: one image, whichever
    it is), plus the ``proxy`` row, the error of the proxy normals the
    network was given. Columns: mean and median angular error (degrees) and the
    percentage of pixels below 11.25, 20, 25 and 30 degrees. Errors are pooled over the
    pixels of the whole test set (every pixel counts once, as the paper's averages), on
    the evaluation region: the sample's face region (``face_mask``) where the proxy
    covers it (eq. 11's region), the same pixels for every row. The median comes from a
    0.01-degree histogram (:class:`ErrorAccumulator`).

    The proxy input is the run's training ``proxy_source`` unless ``proxy`` says otherwise;
    ``perturbed`` proxies use the fixed noise stream :data:`~faceps.learn.render_layer.
    EVAL_STREAM` with ``seed``, so an evaluation is deterministic. A run trained without
    proxy (``proxy_source="none"``) is given zeros, and its region uses a ``perturbed``
    proxy's coverage. Test data of another morphable model or renderer (the file's
    ``model`` differs from the run's) cannot be ``perturbed`` (its coefficients are not
    the run's model's): it is scored with the file's proxy normals unless ``proxy`` names
    a ProxyNet, and ``settings["notes"]`` says so.

    Table 2 (``ablation_no_proxy=True`` and/or ``no_proxy_run=RUN``): mean angular error
    for one input image (pooled over the single-image rows) and for all images, in the
    columns ``w/o proxy (zeroed input)`` (this network with the proxy input replaced by
    zeros, i.e. unknown: a lower bound on what the proxy buys, since the network never saw
    such input in training), ``w/o proxy (trained)`` (a run trained with
    ``proxy_source="none"``, the paper's ablation) and ``ours``.

ProxyNet runs
    The same rows (input subsets; ProxyNet averages its input images), columns: vertex error
    (mean and median over samples of the mean distance in mm between predicted and true
    vertices of the model's face region, camera frame, so pose errors count), landmark
    error (mean over samples of the mean reprojection distance in pixels of the known
    landmarks), and the angular error of the rendered proxy normals against the
    ground-truth normals (mean and median, degrees, pooled over face-region pixels the
    proxy covers). On faces of another morphable model the vertex error is left out (NaN,
    ``-`` in the table): the two models' vertices do not correspond.

Outputs (``out_dir``, default ``RUN/eval-<data name>``): ``eval.json``
(:meth:`EvalResult.to_dict`), ``eval.md`` (:meth:`EvalResult.table_markdown`) and
``maps/sample-<row>.png`` for the first ``n_maps`` samples: input image, ground truth,
proxy and predicted normals, and error maps (inferno, 0 to ``map_vmax_deg`` degrees).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from faceps.core.atomic import atomic_path, save_json, save_png
from faceps.core.errors import ConfigError, DatasetError
from faceps.datasets.torch_data import FaceDataset, collate_samples
from faceps.learn.checkpoint import (
    load_network,
    require_model,
)
from faceps.learn.losses import THRESHOLDS_DEG, AngularStats, angular_error_deg
from faceps.learn.normalnet import check_passes, default_passes
from faceps.learn.proxynet import ProxyOutput, project_landmarks, vertices_from_params
from faceps.learn.render_layer import EVAL_STREAM, ProxySource, parse_proxy_source, render_proxy
from faceps.model.morphable import MorphableModel

log = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "ErrorAccumulator",
    "evaluate",
    "open_dataset",
    "image_subsets",
    "subset_name",
    "proxy_errors",
    "resolve_device",
    "EVAL_FORMAT",
]

EVAL_FORMAT = "faceps.eval/1"
#: histogram bin of :class:`ErrorAccumulator` (degrees)
HIST_BIN_DEG = 0.01
#: subsets evaluated per size at most; beyond, only the first lights of that size
MAX_SUBSETS = 32
#: smallest tile height of the error-map pictures (small crops are enlarged)
MIN_TILE_PX = 192
ABLATION_ZEROED = "w/o proxy (zeroed input)"
ABLATION_TRAINED = "w/o proxy (trained)"
ABLATION_OURS = "ours"
#: the row of every single-image row's errors pooled (one image, whichever it is)
POOLED_SINGLE = "S*"


# ------------------------------------------------------------------ helpers
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise ``torch.device(device)``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None


def open_dataset(data: str | os.PathLike, **kwargs: Any) -> FaceDataset:
    """A :class:`FaceDataset` of a contract-4 ``.h5`` file, or of a split file (``.json``
    written by :func:`faceps.datasets.torch_data.write_split`); keywords as FaceDataset."""
    p = Path(data)
    if p.suffix.lower() == ".json":
        return FaceDataset.from_split(p, **kwargs)
    return FaceDataset(p, **kwargs)


def check_dataset_model(ds: FaceDataset, model: MorphableModel) -> None:
    """Raise ConfigError when the dataset was built with another morphable model."""
    if ds.model and str(ds.model) != model.name:
        raise ConfigError(f"{ds.path} was built with morphable model '{ds.model}'; the run "
                          f"uses '{model.name}'")
    if ds.k_id > model.n_id or ds.k_exp > model.n_exp:
        raise ConfigError(f"{ds.path} has {ds.k_id} identity / {ds.k_exp} expression "
                          f"coefficients; model '{model.name}' has {model.n_id} / "
                          f"{model.n_exp}")


def subset_name(subset: Sequence[int]) -> str:
    """``(0, 2)`` -> ``"S1&S3"`` (1-based light numbers, the paper's notation)."""
    return "&".join(f"S{i + 1}" for i in subset)


def image_subsets(n_lights: int, sizes: Iterable[int] | None = None) -> list[tuple[int, ...]]:
    """The light subsets evaluated: for each size (default 1..n_lights) all combinations in
    lexicographic order, or only the first lights when there would be more than
    :data:`MAX_SUBSETS`.

    Raises:
        ConfigError: for a size outside 1..n_lights.
    """
    sizes = list(range(1, n_lights + 1)) if sizes is None else sorted({int(s) for s in sizes})
    bad = [s for s in sizes if not 1 <= s <= n_lights]
    if bad or not sizes:
        raise ConfigError(f"image counts must be in 1..{n_lights}; got {sizes}")
    out: list[tuple[int, ...]] = []
    for k in sizes:
        combos = list(itertools.combinations(range(n_lights), k))
        out.extend(combos if len(combos) <= MAX_SUBSETS else [tuple(range(k))])
    return out


class ErrorAccumulator:
    """Streaming summary of angular errors (degrees) over many batches.

    Mean, RMS and the percentages below the thresholds are exact; the median is the centre
    of the :data:`HIST_BIN_DEG` histogram bin holding it (error at most half a bin).
    """

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS_DEG) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.below = [0] * len(self.thresholds)
        self.hist = torch.zeros(int(math.ceil(180.0 / HIST_BIN_DEG)) + 1, dtype=torch.int64)

    def add(self, errors: torch.Tensor) -> None:
        """Add errors (any shape; non-finite entries ignored)."""
        e = errors.detach().reshape(-1).to("cpu", torch.float64)
        e = e[torch.isfinite(e)]
        if e.numel() == 0:
            return
        self.n += int(e.numel())
        self.total += float(e.sum())
        self.total_sq += float((e * e).sum())
        for j, t in enumerate(self.thresholds):
            self.below[j] += int((e < t).sum())
        idx = (e / HIST_BIN_DEG).floor().long().clamp_(0, self.hist.numel() - 1)
        self.hist += torch.bincount(idx, minlength=self.hist.numel())

    def stats(self) -> AngularStats:
        """:class:`faceps.learn.losses.AngularStats` of everything added."""
        if self.n == 0:
            nan = float("nan")
            return AngularStats(nan, nan, nan, {t: nan for t in self.thresholds}, 0)
        cum = torch.cumsum(self.hist, 0)
        j = int(torch.searchsorted(cum, torch.tensor((self.n + 1) // 2)))
        return AngularStats(mean=self.total / self.n,
                            median=(j + 0.5) * HIST_BIN_DEG,
                            rmse=math.sqrt(self.total_sq / self.n),
                            below={t: 100.0 * b / self.n
                                   for t, b in zip(self.thresholds, self.below)},
                            n=self.n)


def _flat_stats(stats: AngularStats, n_samples: int) -> dict[str, float]:
    out = {"mean_deg": stats.mean, "median_deg": stats.median, "rmse_deg": stats.rmse,
           "std_deg": (math.sqrt(max(stats.rmse ** 2 - stats.mean ** 2, 0.0))
                       if math.isfinite(stats.rmse) else float("nan"))}
    for t, v in stats.below.items():
        out[f"below_{t:g}_pct"] = v
    out["n_pixels"] = stats.n
    out["n_samples"] = n_samples
    return out


def proxy_errors(model: MorphableModel, pred: ProxyOutput, batch: dict[str, Any],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Errors of a ProxyNet prediction against a batch's ground truth.

    Args:
        model: the morphable model.
        pred: the prediction for the B samples of ``batch``.
        batch: collated samples with ``K``, ``landmarks``, ``landmark_mask``, ``params``
            (the vertex error: faces of ``model``) and, for the normal error, ``normals``
            and ``face_mask``.
        device: the prediction's device.

    Returns:
        ``vertex_mm`` (B,): mean distance (mm) over the face-region vertices (all vertices
        when the model has no region; NaN without ``params``, e.g. for faces of another
        model, whose vertices do not correspond); ``landmark_px`` (B,): mean reprojection distance
        (pixels) of the known landmarks the model has (NaN when none);
        ``normal_deg`` (M,): angular errors (degrees) of the rendered proxy normals at the
        face pixels it covers (absent without ``normals``); ``proxy_normals`` (B, 3, H, W)
        and ``proxy_mask`` (B, H, W) the rendered proxy.
    """
    K = batch["K"].to(device)
    V = pred.vertices(model)
    if "params" in batch:
        params = {k: batch["params"][k].to(device) for k in ("id", "exp", "pose")}
        d = (V - vertices_from_params(model, params)).norm(dim=-1)
        region = torch.as_tensor(model.region, device=device)
        if not bool(region.any()):
            region = torch.ones_like(region)
        out = {"vertex_mm": d[:, region].mean(dim=1)}
    else:
        out = {"vertex_mm": torch.full((V.shape[0],), float("nan"), device=device)}
    uv, valid = project_landmarks(model, V, K)
    known = batch["landmark_mask"].to(device) * valid[None].to(uv.dtype)
    dist = (uv - batch["landmarks"].to(device)).norm(dim=-1)
    n = known.sum(dim=1)
    out["landmark_px"] = torch.where(n > 0, (dist * known).sum(dim=1) / n.clamp_min(1),
                                     torch.full_like(n, float("nan")))
    if "normals" in batch:
        H, W = batch["normals"].shape[-2:]
        r = render_proxy(model, pred.alpha_id, pred.alpha_exp, pred.angles, pred.translation,
                         K, (W, H))
        gt = batch["normals"].to(device)
        m = (batch["face_mask"].to(device) > 0) & (r.mask > 0)
        out["normal_deg"] = angular_error_deg(r.normals, gt)[m]
        out["proxy_normals"], out["proxy_mask"] = r.normals, r.mask
    return out


# ------------------------------------------------------------------ result
@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        kind: ``normal`` or ``proxy``.
        run: the run folder or weights file evaluated; weights: the file read.
        data: the test data; n_samples: samples evaluated.
        rows: row name (``S1``, ``S1&S2``, ..., and ``proxy`` for NormalNet runs) ->
            metrics. NormalNet: ``mean_deg``, ``median_deg``, ``rmse_deg``, ``std_deg``
            (over pixels),
            ``below_<t>_pct`` for t in 11.25, 20, 25, 30, ``n_pixels``, ``n_samples``.
            ProxyNet: ``vertex_mm``, ``vertex_median_mm``, ``landmark_px``,
            ``normal_mean_deg``, ``normal_median_deg``, ``n_samples``.
        ablation: Table 2: ``"1"`` and ``"<L>"`` (image counts) -> column -> mean angular
            error (degrees); None when not asked.
        stages: for networks with several stages (a cascade), ``stage<t>`` -> the metrics
            of the rows' stage-t estimates pooled over all rows; None otherwise.
        settings: how the evaluation ran (proxy source, seed, subsets, device, ...).
        maps: the error-map PNG files written.
        seconds: wall time.
    """

    kind: str
    run: str
    weights: str
    data: str
    n_samples: int
    rows: dict[str, dict[str, float]]
    ablation: dict[str, dict[str, float]] | None = None
    stages: dict[str, dict[str, float]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    maps: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table_markdown(self) -> str:
        """The tables as Markdown (Table 1 layout; Table 2 when measured)."""
        def f(x: float, d: int = 2) -> str:
            return "-" if x is None or not np.isfinite(x) else f"{x:.{d}f}"

        lines: list[str] = []
        if self.kind == "normal":
            th = [f"{t:g}" for t in THRESHOLDS_DEG]
            lines.append("| input | mean (deg) | median (deg) | "
                         + " | ".join(f"< {t} (%)" for t in th) + " |")
            lines.append("|" + " --- |" * (3 + len(th)))
            for name, r in self.rows.items():
                lines.append(f"| {name} | {f(r['mean_deg'], 3)} | {f(r['median_deg'], 3)} | "
                             + " | ".join(f(r[f'below_{t}_pct'], 1) for t in th) + " |")
        else:
            lines.append("| input | vertex mean (mm) | vertex median (mm) | landmarks (px) | "
                         "proxy normals mean (deg) | proxy normals median (deg) |")
            lines.append("|" + " --- |" * 6)
            for name, r in self.rows.items():
                lines.append(f"| {name} | {f(r['vertex_mm'])} | {f(r['vertex_median_mm'])} | "
                             f"{f(r['landmark_px'])} | {f(r['normal_mean_deg'])} | "
                             f"{f(r['normal_median_deg'])} |")
        if self.stages:
            lines += ["", "| stage (all rows) | mean (deg) | median (deg) |",
                      "| --- | --- | --- |"]
            for name, r in self.stages.items():
                lines.append(f"| {name} | {f(r['mean_deg'], 3)} | {f(r['median_deg'], 3)} |")
        if self.ablation:
            cols = list(next(iter(self.ablation.values())).keys())
            lines += ["", "| # input | " + " | ".join(cols) + " |",
                      "|" + " --- |" * (1 + len(cols))]
            for count, r in self.ablation.items():
                lines.append(f"| {count} | " + " | ".join(f(r[c], 3) for c in cols) + " |")
        notes = list(self.settings.get("notes") or [])
        if int(self.settings.get("passes") or 1) > 1:
            notes.append(f"NormalNet ran {int(self.settings['passes'])} passes, each after "
                         f"the first with the previous estimate as the proxy input")
        if notes:
            lines += [""] + [f"Note: {n}." for n in notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict (format :data:`EVAL_FORMAT`)."""
        return {"format": EVAL_FORMAT, "kind": self.kind, "run": self.run,
                "weights": self.weights, "data": self.data, "n_samples": self.n_samples,
                "rows": self.rows, "ablation": self.ablation, "stages": self.stages,
                "settings": self.settings,
                "maps": self.maps, "seconds": self.seconds}


# ------------------------------------------------------------------ pictures
def _up(img: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return img
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _normals_rgb(n: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    from faceps.core.imageio import normals_to_rgb

    a = n.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)
    a[~mask.cpu().numpy().astype(bool)] = np.nan
    return normals_to_rgb(a, background=40)


def _error_tile(err: torch.Tensor, mask: torch.Tensor, factor: int, vmax: float,
                text: str) -> np.ndarray:
    from faceps.core.viz import error_map, label

    e = err.detach().cpu().numpy().astype(np.float32)
    e[~mask.cpu().numpy().astype(bool)] = np.nan
    return label(error_map(_up(e, factor), vmax=vmax, unit="deg"), text)


def _write_map(path: Path, picture: dict[str, Any], vmax: float) -> Path:
    """One sample's picture: inputs and normals on the first row, error maps below."""
    from faceps.core.viz import grid, label, tonemap

    mask = picture["mask"]
    H = int(mask.shape[0])
    factor = max(1, int(math.ceil(MIN_TILE_PX / H)))
    img = picture["image"].detach().cpu().permute(1, 2, 0).numpy()
    top = [label(_up(tonemap(img, picture["sample_mask"].cpu().numpy() > 0), factor),
                 picture["image_name"]),
           label(_up(_normals_rgb(picture["gt"], picture["sample_mask"] > 0), factor),
                 "ground truth")]
    bottom = []
    for name, n in picture["normals"].items():
        top.append(label(_up(_normals_rgb(n, mask), factor), name))
        err = angular_error_deg(n, picture["gt"], dim=0)
        m = picture["err_mask"]
        mean = float(err[m].mean()) if bool(m.any()) else float("nan")
        bottom.append(_error_tile(err, m, factor, vmax, f"{name}: {mean:.2f} deg"))
    return save_png(path, grid([top, bottom], height=H * factor))


# ------------------------------------------------------------------ evaluation
def _select(batch: dict[str, Any], subset: Sequence[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Images of the lights ``subset`` (file rows): ((B', k, 3, H, W), (B', k) mask, (B',)
    sample positions in the batch) for the samples that have all of them."""
    li = batch["light_index"]
    rows, keep = [], []
    for b in range(li.shape[0]):
        pos = [int(torch.nonzero(li[b] == s)[0]) if bool((li[b] == s).any()) else -1
               for s in subset]
        if min(pos) >= 0:
            rows.append(pos)
            keep.append(b)
    if not keep:
        return None
    keep_t = torch.tensor(keep, dtype=torch.int64)
    pos_t = torch.tensor(rows, dtype=torch.int64)
    imgs = batch["images"][keep_t[:, None], pos_t]
    return imgs, torch.ones(pos_t.shape, dtype=torch.bool), keep_t


def _default_out_dir(run: Path, weights: Path, data: Path) -> Path:
    base = run if run.is_dir() else weights.parent
    return base / f"eval-{data.stem}"


def evaluate(run: str | os.PathLike, data: str | os.PathLike, *,
             n_images: Sequence[int] | None = None, ablation_no_proxy: bool = False,
             no_proxy_run: str | os.PathLike | None = None, proxy: str | None = None,
             passes: int | None = None, out_dir: str | os.PathLike | None = None,
             write: bool = True,
             batch_size: int = 8, device: str | torch.device = "auto", n_maps: int = 4,
             map_vmax_deg: float = 30.0, seed: int = 0, which: str = "auto",
             model: str | os.PathLike | MorphableModel | None = None,
             max_samples: int | None = None, num_workers: int = 0,
             progress: bool = False) -> EvalResult:
    """Evaluate a trained ProxyNet or NormalNet on test data (module docstring).

    Args:
        run: run folder (``best.pt``, else ``weights.pt``, see ``which``) or ``.pt`` file.
        data: contract-4 ``.h5`` test file or split ``.json``.
        n_images: image counts whose subsets are rows (default 1..L, L lights of the file).
        ablation_no_proxy: add Table 2 with the proxy input zeroed (NormalNet runs).
        no_proxy_run: a NormalNet run trained with ``proxy_source="none"`` for Table 2's
            trained column (implies the table).
        proxy: proxy source for NormalNet input (``perturbed``, ``dataset``,
            ``proxynet:RUN``); None: the run's training source.
        passes: NormalNet passes (``NormalNet.forward``); None: what the run was trained
            for (:func:`faceps.learn.normalnet.default_passes`), except with the file's
            proxy normals (``dataset``: one pass; a second loses over a near-exact proxy).
        out_dir: where ``eval.json``, ``eval.md`` and ``maps/`` go (default
            ``RUN/eval-<data name>``); write: False writes nothing.
        batch_size: samples per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        n_maps: samples drawn as error-map PNGs (0: none).
        map_vmax_deg: top of the error-map colour scale (degrees).
        seed: seed of a ``perturbed`` proxy's noise.
        which: file of a run folder (:func:`faceps.learn.checkpoint.resolve_weights`).
        model: the morphable model (default: the one in the run's configuration).
        max_samples: evaluate only the first samples (None: all).
        num_workers: DataLoader workers.
        progress: show a progress bar (when stderr is a terminal).

    Returns:
        :class:`EvalResult`.

    Raises:
        CheckpointError: unusable run; ConfigError / DatasetError: invalid options or data.
    """
    from faceps.model import load_model

    t0 = time.perf_counter()
    dev = resolve_device(device)
    run_p, data_p = Path(run), Path(data)
    loaded = load_network(run_p, device=dev, which=which)
    net, kind = loaded.network, loaded.kind
    model_obj = load_model(model if model is not None
                           else loaded.train_config.get("model", "builtin"))
    require_model(loaded.model_entry, model_obj, loaded.path)
    if kind == "proxy" and (ablation_no_proxy or no_proxy_run is not None):
        raise ConfigError("the no-proxy ablation (Table 2) applies to NormalNet runs")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    if passes is not None:
        passes = check_passes(passes)
        if kind == "proxy" and passes != 1:
            raise ConfigError("passes apply to NormalNet runs")

    train_source = str(loaded.train_config.get("proxy_source", "perturbed"))
    zero_input = kind == "normal" and train_source == "none"
    spec = proxy or ("perturbed" if train_source == "none" else train_source)
    # Only the ground-truth coefficients tie test data to a morphable model: a ProxyNet is
    # scored against them and the ``perturbed`` proxy degrades them. A NormalNet given the
    # file's proxy normals or a ProxyNet's prediction takes faces of any model or renderer.
    data_model = open_dataset(data_p, n_images=None, augment=None, fields=["normals"]).model
    other_model = bool(data_model) and str(data_model) != model_obj.name
    notes: list[str] = []
    differs = (f"the data's faces are of morphable model '{data_model}', not the run's "
               f"'{model_obj.name}'")
    if kind == "proxy" and other_model:
        notes.append(f"{differs}: no vertex error (the vertices do not correspond); "
                     f"landmarks and proxy normals are scored")
    if kind == "normal" and other_model and parse_proxy_source(spec)[0] == "perturbed":
        if proxy is not None:
            raise ConfigError(
                f"{data_p} was built with morphable model '{data_model}', the run with "
                f"'{model_obj.name}': the 'perturbed' proxy degrades the data's coefficients "
                f"in the run's model; use --proxy dataset (the file's proxy normals) or "
                f"--proxy proxynet:RUN")
        spec = "dataset"
        notes.append(f"{differs}: NormalNet's proxy input is the file's proxy normals "
                     f"(proxy source 'dataset')")
    for note in notes:
        log.warning("%s", note)
    n_passes = (passes if passes is not None
                else default_passes(loaded.train_config)
                if kind == "normal" and parse_proxy_source(spec)[0] != "dataset" else 1)
    source = None
    if kind == "normal":
        from faceps.learn.render_layer import ProxyNoise

        noise = ProxyNoise(**dict(loaded.train_config.get("proxy_noise") or {}))
        source = ProxySource(spec, model_obj, noise=noise, seed=seed, device=dev)
    trained_np = None
    if no_proxy_run is not None:
        np_loaded = load_network(no_proxy_run, kind="normal", device=dev)
        if np_loaded.train_config.get("proxy_source") != "none":
            raise ConfigError(f"{no_proxy_run}: was trained with proxy_source "
                              f"{np_loaded.train_config.get('proxy_source')!r}; the no-proxy "
                              f"ablation needs a run trained with proxy_source='none'")
        trained_np = np_loaded.network
    fields = ["images", "normals", "face_mask"]
    if source is not None:
        fields += list(source.fields)
    else:
        fields += ["K", "landmarks"] + ([] if other_model else ["params"])
    ds = open_dataset(data_p, n_images=None, augment=None, fields=fields)
    if "params" in fields:
        check_dataset_model(ds, model_obj)
    if max_samples is not None:
        ds.indices = ds.indices[: max(0, int(max_samples))]
    single = kind == "normal" and bool(getattr(net, "single_image", False))
    if single:
        if n_images is not None and set(int(c) for c in n_images) != {1}:
            raise ConfigError(f"{loaded.path}: a {net.config.arch} network reads one image: "
                              f"n_images must be 1; got {list(n_images)}")
        n_images = (1,)
    if len(ds) == 0:
        raise DatasetError(f"{data_p}: no samples to evaluate (an empty split?)")
    subsets = image_subsets(ds.n_lights, n_images)
    names = [subset_name(s) for s in subsets]
    L = ds.n_lights
    table2 = kind == "normal" and (ablation_no_proxy or trained_np is not None)
    counts2 = sorted({1, L}) if table2 else []

    acc = {n: ErrorAccumulator() for n in names}
    counts = dict.fromkeys(names, 0)
    proxy_acc = ErrorAccumulator()
    single_acc = ErrorAccumulator()      # every single-image row's errors, pooled
    n_single = 0
    stage_acc: dict[str, ErrorAccumulator] = {}
    t_net, n_net = 0.0, 0
    abl: dict[str, dict[str, ErrorAccumulator]] = {
        str(c): {col: ErrorAccumulator() for col in
                 ([ABLATION_ZEROED] if ablation_no_proxy else [])
                 + ([ABLATION_TRAINED] if trained_np is not None else []) + [ABLATION_OURS]}
        for c in counts2}
    pvals: dict[str, dict[str, list[float]]] = {n: {"vertex_mm": [], "landmark_px": []}
                                                for n in names}
    pictures: list[dict[str, Any]] = []

    loader = DataLoader(ds, batch_size=int(batch_size), shuffle=False,
                        num_workers=int(num_workers), collate_fn=collate_samples)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(ds), unit="sample", desc="evaluate", dynamic_ncols=True)
    n_done = 0
    with torch.no_grad():
        for batch in loader:
            B = batch["images"].shape[0]
            gt = batch["normals"].to(dev)
            face = batch["face_mask"].to(dev) > 0
            if kind == "normal":
                pr = source(batch, stream=EVAL_STREAM)
                region = face & (pr.mask > 0)
                proxy_acc.add(angular_error_deg(pr.normals, gt)[region])
                zeros_n = torch.zeros_like(pr.normals)
                zeros_m = torch.zeros_like(pr.mask)
                net_in = (zeros_n, zeros_m) if zero_input else (pr.normals, pr.mask)
            preds: dict[str, torch.Tensor] = {}
            for subset, name in zip(subsets, names):
                sel = _select(batch, subset)
                if sel is None:
                    continue
                imgs, imask, keep = sel
                imgs, imask = imgs.to(dev), imask.to(dev)
                kd = keep.to(dev)
                counts[name] += int(keep.numel())
                if kind == "normal":
                    t_f = time.perf_counter()
                    out = net(imgs, net_in[0][kd], imask, net_in[1][kd], passes=n_passes)
                    t_net += time.perf_counter() - t_f
                    n_net += int(kd.sum())
                    err = angular_error_deg(out.normals, gt[kd])
                    e = err[region[kd]]
                    acc[name].add(e)
                    if len(subset) == 1:
                        single_acc.add(e)
                        n_single += int(keep.numel())
                    if len(out.stages) > 1:
                        for t_i, st_n in enumerate(out.stages):
                            stage_acc.setdefault(f"stage{t_i}", ErrorAccumulator()).add(
                                angular_error_deg(st_n, gt[kd])[region[kd]])
                    if str(len(subset)) in abl:
                        group = abl[str(len(subset))]
                        group[ABLATION_OURS].add(e)
                        if ABLATION_ZEROED in group:
                            o0 = net(imgs, zeros_n[kd], imask, zeros_m[kd],
                                     passes=n_passes)
                            group[ABLATION_ZEROED].add(
                                angular_error_deg(o0.normals, gt[kd])[region[kd]])
                        if ABLATION_TRAINED in group:
                            o1 = trained_np(imgs, zeros_n[kd], imask, zeros_m[kd])
                            group[ABLATION_TRAINED].add(
                                angular_error_deg(o1.normals, gt[kd])[region[kd]])
                    full = torch.zeros_like(gt)
                    full[kd] = out.normals
                    preds[name] = full
                else:
                    sub = {k: (v[keep] if isinstance(v, torch.Tensor) else v)
                           for k, v in batch.items() if k != "params"}
                    if "params" in batch:
                        sub["params"] = {k: v[keep] for k, v in batch["params"].items()}
                    pred = net(imgs, batch["K"][keep].to(dev), imask)
                    pe = proxy_errors(model_obj, pred, sub, dev)
                    pvals[name]["vertex_mm"] += pe["vertex_mm"].tolist()
                    pvals[name]["landmark_px"] += pe["landmark_px"].tolist()
                    acc[name].add(pe["normal_deg"])
                    full = torch.zeros_like(gt)
                    full[kd] = pe["proxy_normals"]
                    preds[name] = full
                    fullm = torch.zeros_like(face, dtype=torch.float32)
                    fullm[kd] = pe["proxy_mask"]
                    preds[name + ":mask"] = fullm
            for b in range(B):
                if len(pictures) >= n_maps:
                    break
                pictures.append(_picture(kind, batch, b, preds, names, subsets, gt, face,
                                         pr if kind == "normal" else None))
            n_done += B
            if bar is not None:
                bar.update(B)
    if bar is not None:
        bar.close()

    rows: dict[str, dict[str, float]] = {}
    for name in names:
        st = acc[name].stats()
        if kind == "normal":
            rows[name] = _flat_stats(st, counts[name])
        else:
            v = np.asarray(pvals[name]["vertex_mm"], np.float64)
            lm = np.asarray(pvals[name]["landmark_px"], np.float64)
            lm = lm[np.isfinite(lm)]
            rows[name] = {
                "vertex_mm": float(v.mean()) if v.size else float("nan"),
                "vertex_median_mm": float(np.median(v)) if v.size else float("nan"),
                "landmark_px": float(lm.mean()) if lm.size else float("nan"),
                "normal_mean_deg": st.mean, "normal_median_deg": st.median,
                "n_samples": counts[name]}
    if kind == "normal":
        if sum(len(sub) == 1 for sub in subsets) > 1:
            rows[POOLED_SINGLE] = _flat_stats(single_acc.stats(), n_single)
        rows["proxy"] = _flat_stats(proxy_acc.stats(), n_done)
    ablation = ({c: {col: a.stats().mean for col, a in group.items()}
                 for c, group in abl.items()} if table2 else None)
    settings = {"device": str(dev), "subsets": [list(s) for s in subsets],
                "n_lights": L, "batch_size": int(batch_size), "which": which,
                "model": model_obj.name, "data_model": data_model, "notes": notes}
    if kind == "normal":
        settings.update(proxy_source=spec, proxy_seed=int(seed), passes=n_passes,
                        proxy_input="zeros" if zero_input else spec,
                        region="face_mask & proxy coverage",
                        no_proxy_run=None if no_proxy_run is None else str(no_proxy_run))
    else:
        settings.update(region="face-region vertices; face_mask & proxy coverage pixels")
    if kind == "normal":
        from faceps.learn.resnet import count_parameters

        settings.update(arch=str(getattr(net.config, "arch", "facepsnet")),
                        parameters=int(count_parameters(net)),
                        ms_per_sample=1000.0 * t_net / max(1, n_net),
                        threads=int(torch.get_num_threads()))
    stages = ({k: _flat_stats(a.stats(), n_done) for k, a in stage_acc.items()}
              if stage_acc else None)
    result = EvalResult(kind=kind, run=str(run_p), weights=str(loaded.path), data=str(data_p),
                        n_samples=n_done, rows=rows, ablation=ablation, stages=stages,
                        settings=settings)
    if write:
        out = Path(out_dir) if out_dir is not None else _default_out_dir(run_p, loaded.path,
                                                                         data_p)
        out.mkdir(parents=True, exist_ok=True)
        for pic in pictures:
            path = out / "maps" / f"sample-{pic['row']:05d}.png"
            result.maps.append(str(_write_map(path, pic, float(map_vmax_deg))))
        result.seconds = time.perf_counter() - t0
        save_json(out / "eval.json", result.to_dict())
        with atomic_path(out / "eval.md") as tmp:
            tmp.write_text(result.table_markdown(), encoding="utf-8")
        log.info("evaluation written to %s", out)
    result.seconds = time.perf_counter() - t0
    return result


def _picture(kind: str, batch: dict[str, Any], b: int, preds: dict[str, torch.Tensor],
             names: list[str], subsets: list[tuple[int, ...]], gt: torch.Tensor,
             face: torch.Tensor, pr: Any) -> dict[str, Any]:
    """The arrays of one sample's error-map picture (CPU tensors)."""
    first = names[0]
    full = max(names, key=lambda n: n.count("&"))
    shown = [n for n in dict.fromkeys([full, first]) if n in preds]
    li = batch["light_index"][b]
    pos = int(torch.nonzero(li == subsets[0][0])[0]) if bool((li == subsets[0][0]).any()) else 0
    sample_mask = face[b].cpu().to(torch.float32)
    normals: dict[str, torch.Tensor] = {}
    if kind == "normal":
        err_mask = (face[b] & (pr.mask[b] > 0)).cpu()
        normals["proxy"] = pr.normals[b].cpu()
        for n in shown:
            normals[n] = preds[n][b].cpu()
        mask = err_mask
    else:
        n = shown[0]
        err_mask = (face[b] & (preds[n + ":mask"][b] > 0)).cpu()
        normals[f"proxy ({n})"] = preds[n][b].cpu()
        mask = err_mask
    return {"row": int(batch["index"][b]), "image": batch["images"][b, pos],
            "image_name": f"S{subsets[0][0] + 1}" if kind == "normal" else "input",
            "gt": gt[b].cpu(), "sample_mask": sample_mask, "mask": mask,
            "err_mask": err_mask, "normals": normals}
