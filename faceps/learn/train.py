"""Training of ProxyNet and NormalNet (paper section 5.1), on one process or data-parallel.

Entry points: :func:`train` (library; the ``faceps train`` command calls it) and
``python -m faceps.learn.train`` (:func:`main`; works under ``torchrun``).

What a run does
    - Configuration: :class:`TrainConfig`, written to ``RUN/config.json`` (plain JSON, read
      back by :meth:`TrainConfig.load`); ``RUN/run.json`` records the data, the morphable
      model, the process count and versions.
    - Data: :class:`faceps.datasets.torch_data.FaceDataset` over a contract-4 file or a split
      file, with :class:`~faceps.datasets.torch_data.AugmentConfig` augmentations. As in the
      paper, every mini-batch has one image count k drawn from ``image_counts`` (1, 2 or 3
      images per sample); padded batches come from
      :func:`~faceps.datasets.torch_data.collate_samples`.
    - ProxyNet loss: eq. 10 (:func:`faceps.learn.losses.proxy_loss`) against the
      ground-truth vertices of the sample's ``params`` through the model
      (:func:`faceps.learn.proxynet.vertices_from_params`) and the image landmarks.
    - NormalNet loss: eq. 11 over the face region covered by the proxy
      (``face_mask * proxy_mask``), summed over the cascade stages when ``cascade > 0``
      (Cas-FNE: every stage is supervised). The proxy input comes from ``proxy_source``
      (:class:`faceps.learn.render_layer.ProxySource`): ``perturbed`` (default; ground-truth
      parameters degraded by ``proxy_noise`` and rendered by the render layer, because the
      synthetic set's stored proxy is almost the ground truth and would be copied),
      ``dataset``, ``none`` (an images-only network, Table 2's ablation) or
      ``proxynet:RUN``.
    - Optimiser Adam (AdamW with ``optimizer="adamw"``), learning-rate schedule per step
      (``cosine`` with optional warm-up, ``step`` or ``constant``), optional gradient
      clipping; a non-finite loss or gradient stops the run with :class:`TrainingError`
      naming the step.
    - Validation at the end of every ``val_every`` epochs when validation data is given:
      NormalNet: mean / median angular error (degrees) of the network and of its proxy
      input; ProxyNet: vertex error (mm), landmark error (px) and the rendered proxy's
      normal error (degrees), as :mod:`faceps.learn.evaluate` defines them.
    - Outputs: ``metrics.csv`` (one row per ``log_every`` steps and per validation: step,
      epoch, split, the loss and its terms, lr, samples/s, validation metrics),
      ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end, ``weights.pt``
      (latest weights, weights-only) with it, ``best.pt`` at each validation improvement
      (:mod:`faceps.learn.checkpoint`); TensorBoard events in ``RUN/tensorboard`` when the
      package is installed and ``tensorboard`` is on.

Determinism and resumption
    All randomness of the data is keyed, not drawn from a running generator: the sample
    order of epoch e is a permutation seeded by ``seed + e`` (torch's
    ``DistributedSampler``), batch b's image count comes from ``default_rng([seed, e, b,
    tag])``, sample i's image choice and augmentation from ``default_rng([seed, e, i,
    tag])`` and its proxy noise from ``default_rng([seed, e, row])``. The initial weights
    come from ``torch.manual_seed(seed)`` (in a forked generator: the caller's random state
    is untouched). So a run is reproducible on the CPU whatever ``num_workers``, and
    ``resume=True`` continues from ``checkpoint.pt`` (weights, optimiser, scheduler, and the
    position in the data stream) with the same losses as an uninterrupted run.

Data-parallel training
    When ``WORLD_SIZE > 1`` is in the environment (``torchrun --nproc_per_node N -m
    faceps.learn.train ...``), each process joins the process group (gloo on the CPU, nccl
    on CUDA, one GPU per ``LOCAL_RANK``), reads its share of every epoch
    (``DistributedSampler``; ``batch_size`` is per process) and trains a
    ``DistributedDataParallel`` copy; all processes draw the same image count per step.
    Only rank 0 validates, logs (losses averaged over the processes) and writes files.
    ProxyNet's BatchNorm normalises with per-process batch statistics (no SyncBatchNorm);
    its running statistics are rank 0's (DDP broadcasts buffers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from faceps import __version__
from faceps.core.atomic import atomic_path, save_json
from faceps.core.errors import ConfigError, FacepsError
from faceps.datasets.schema import now_iso
from faceps.datasets.torch_data import AugmentConfig, FaceDataset, collate_samples
from faceps.learn.archs import LossInputs, arch_of, config_class, network_class
from faceps.learn.arguments import OPTIMIZERS, SCHEDULES, add_arguments  # noqa: F401
from faceps.learn.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    KINDS,
    WEIGHTS_NAME,
    CheckpointError,
    build_network,
    check_compatible,
    load_file,
    load_state,
    model_fingerprint,
    network_config,
    resolve_weights,
    save_checkpoint,
    save_weights,
)
from faceps.learn.evaluate import (
    ErrorAccumulator,
    check_dataset_model,
    open_dataset,
    proxy_errors,
    resolve_device,
)
from faceps.learn.losses import (
    ProxyLossConfig,
    angular_error_deg,
    gradient_magnitude_loss,
    normal_loss,
    proxy_loss,
)
from faceps.learn.normalnet import default_passes
from faceps.learn.proxynet import ProxyNetConfig, vertices_from_params
from faceps.learn.render_layer import EVAL_STREAM, ProxyNoise, ProxySource, parse_proxy_source
from faceps.model.morphable import MorphableModel

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FORMAT",
    "CONFIG_NAME",
    "METRICS_NAME",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "EpochBatchSampler",
    "train",
    "lr_factor",
    "add_arguments",
    "config_from_args",
    "leave_process",
    "run_from_args",
    "main",
]

CONFIG_FORMAT = "faceps.train-config/1"
CONFIG_NAME = "config.json"
RUN_NAME = "run.json"
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
#: fields that may change when a run is resumed (they do not change what is computed,
#: except epochs / max_steps, which move the end of the schedule)
RUNTIME_FIELDS = ("epochs", "max_steps", "checkpoint_every", "log_every", "val_every",
                  "num_workers", "threads", "device", "progress", "tensorboard")
#: tags separating the keyed random streams (image choice/augmentation, image counts)
_SAMPLE_TAG = 0x5A17
_COUNT_TAG = 0xC0DE
#: process-group timeout (s): covers rank 0's validation and checkpoint writing
PROCESS_GROUP_TIMEOUT_S = 2 * 3600
#: paper section 5.1: ProxyNet 200 epochs at batch 50, NormalNet 100 epochs at batch 6
PAPER_DEFAULTS = {"proxy": {"epochs": 200, "batch_size": 50},
                  "normal": {"epochs": 100, "batch_size": 6}}


class TrainingError(FacepsError):
    """Training cannot continue (a non-finite loss or gradient, an unusable run folder)."""


def _pair_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as ``RUN/config.json``).

    Attributes:
        kind: ``proxy`` (ProxyNet) or ``normal`` (NormalNet).
        model: the morphable model: ``builtin`` or a ``.npz`` path (contract 5).
        network: ProxyNetConfig / NormalNetConfig fields (e.g. ``{"cascade": 2}``); missing
            ones take their defaults (ProxyNet's ``n_id``/``n_exp``: the model's sizes).
            Stored resolved (all fields) in the run's ``config.json``.
        proxy_loss: ProxyLossConfig fields (eq. 10 weights) for ProxyNet.
        stage_weights: NormalNet loss weight per cascade stage (None: 1 each).
        batch_size: samples per step and process (paper: 50 ProxyNet, 6 NormalNet).
        lr: peak learning rate; weight_decay: L2 (``adam``) or decoupled (``adamw``).
        optimizer: ``adam`` (the paper's) or ``adamw``.
        epochs: passes over the training data; max_steps: stop after this many optimiser
            steps if that comes first (None: no step limit). The schedule spans
            ``min(max_steps, epochs * steps_per_epoch)`` steps.
        schedule: ``cosine`` (to ``min_lr_ratio * lr``), ``step`` (times ``step_gamma``
            every ``step_epochs`` epochs) or ``constant``; warmup_steps: linear warm-up.
        grad_clip: clip the global gradient norm to this (None: no clipping).
        image_counts: images per sample, drawn per mini-batch (the paper: 1, 2 or 3).
        augment: AugmentConfig (None: no augmentation).
        proxy_source: NormalNet proxy input: ``perturbed``, ``dataset``, ``none`` or
            ``proxynet:RUN`` (module docstring).
        proxy_noise: ProxyNoise levels for ``perturbed`` (render_layer docstring).
        self_feed: NormalNet: the share of the samples whose proxy input is the network's
            own estimate from their proxy (one pass without gradient, then the loss on the
            second pass), drawn per sample from ``(seed, epoch, row)``. It teaches the
            network to refine its own estimates, which inference then does in two passes
            (:func:`faceps.learn.normalnet.default_passes`). 0: off.
        init_weights: start from the network weights of this run folder or ``.pt`` file
            (same kind, architecture and morphable model; fine-tuning or a longer schedule
            after a first run) instead of random ones. The optimiser, schedule and step
            count start fresh. Ignored when resuming (the checkpoint has the weights).
        seed: seed of the initial weights and of every keyed random stream.
        checkpoint_every: steps between checkpoints (and at the end).
        log_every: steps between ``metrics.csv`` rows.
        val_every: epochs between validations (with validation data).
        num_workers: DataLoader worker processes.
        threads: torch intra-op threads during the run (None: unchanged).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ...
        progress: progress bar on stderr (only when it is a terminal, rank 0).
        tensorboard: also write TensorBoard events when the package is installed.
    """

    kind: str = "normal"
    model: str = "builtin"
    network: dict[str, Any] = field(default_factory=dict)
    proxy_loss: dict[str, Any] = field(default_factory=dict)
    stage_weights: tuple[float, ...] | None = None
    batch_size: int = 6
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    epochs: int = 100
    max_steps: int | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    step_epochs: int = 30
    step_gamma: float = 0.1
    grad_clip: float | None = None
    image_counts: tuple[int, ...] = (1, 2, 3)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig.training)
    proxy_source: str = "perturbed"
    proxy_noise: ProxyNoise = field(default_factory=ProxyNoise)
    self_feed: float = 0.0
    init_weights: str | None = None
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    val_every: int = 1
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}; got {self.kind!r}")
        s(self, "model", str(self.model))
        s(self, "network", dict(self.network or {}))
        net_cls = (ProxyNetConfig if self.kind == "proxy"
                   else config_class(arch_of(self.network)))
        unknown = sorted(set(self.network) - set(net_cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown {net_cls.__name__} option(s) {unknown} in network; "
                              f"known: {sorted(net_cls.__dataclass_fields__)}")
        s(self, "proxy_loss", dict(self.proxy_loss or {}))
        try:
            ProxyLossConfig(**self.proxy_loss)
        except TypeError as exc:
            raise ConfigError(f"invalid proxy_loss options {self.proxy_loss}: {exc}") from None
        if isinstance(self.augment, dict):
            s(self, "augment", AugmentConfig(**{k: _pair_tuple(v)
                                                for k, v in self.augment.items()}))
        if isinstance(self.proxy_noise, dict):
            s(self, "proxy_noise", ProxyNoise(**self.proxy_noise))
        if self.stage_weights is not None:
            s(self, "stage_weights", tuple(float(w) for w in self.stage_weights))
        counts = tuple(int(c) for c in self.image_counts)
        if not counts or min(counts) < 1:
            raise ConfigError(f"image_counts must be integers >= 1; got {self.image_counts}")
        s(self, "image_counts", counts)
        for name, low in (("batch_size", 1), ("epochs", 1), ("checkpoint_every", 1),
                          ("log_every", 1), ("val_every", 1), ("num_workers", 0),
                          ("warmup_steps", 0), ("step_epochs", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}; got {v!r}")
            s(self, name, int(v))
        for name in ("max_steps", "threads"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)
                                  or v < 1):
                raise ConfigError(f"{name} must be None or an integer >= 1; got {v!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf),
                             ("min_lr_ratio", 0.0, 1.0), ("step_gamma", 0.0, math.inf),
                             ("self_feed", 0.0, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and lo <= v <= hi):
                raise ConfigError(f"{name} must be a number in [{lo}, {hi}]; got {v!r}")
            s(self, name, float(v))
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip)
                                               and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be None or > 0; got {self.grad_clip!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        parse_proxy_source(self.proxy_source)
        if self.self_feed > 0 and (self.kind != "normal" or self.proxy_source == "none"):
            raise ConfigError(f"self_feed applies to NormalNet runs with a proxy input; got "
                              f"kind {self.kind!r}, proxy_source {self.proxy_source!r}")
        if self.kind == "normal":
            arch = arch_of(self.network)
            if self.self_feed > 0 and arch != "facepsnet":
                raise ConfigError(f"self_feed applies to the facepsnet architecture; got "
                                  f"arch {arch!r}")
            if network_class(arch).single_image and self.image_counts != (1,):
                raise ConfigError(f"the {arch} architecture reads one image per sample: "
                                  f"image_counts must be (1,); got {self.image_counts}")
            if arch != "facepsnet" and self.stage_weights is not None:
                raise ConfigError(f"stage_weights apply to the facepsnet architecture; "
                                  f"{arch} weighs its own loss terms (its network options)")
        resolve_device(self.device)
        if self.init_weights is not None:
            s(self, "init_weights", str(self.init_weights))

    # ------------------------------------------------------------ construction
    @classmethod
    def for_kind(cls, kind: str, **overrides: Any) -> TrainConfig:
        """The paper's settings for ``kind`` (epochs, batch size; section 5.1) with
        ``overrides``."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}; got {kind!r}")
        return cls(**{"kind": kind, **PAPER_DEFAULTS[kind], **overrides})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict with ``format`` (:data:`CONFIG_FORMAT`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["augment"] = None if self.augment is None else self.augment.to_dict()
        d["proxy_noise"] = self.proxy_noise.to_dict()
        return json.loads(json.dumps({"format": CONFIG_FORMAT, **d}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise ConfigError)."""
        d = dict(data)
        fmt = d.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"not a training configuration (format {fmt!r}; expected "
                              f"'{CONFIG_FORMAT}')")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically."""
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a configuration written by :meth:`save` (or a run folder's
        ``config.json`` when ``path`` is a folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_NAME
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such configuration file") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{p}: not a readable JSON configuration ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls.from_dict(data)


@dataclass
class TrainResult:
    """What :func:`train` did (on this process).

    Attributes:
        run_dir: the run folder; kind: ``proxy`` or ``normal``.
        step: optimiser steps done in total; epoch: the (0-based) epoch of the last step.
        losses: the training loss of every step of this call (this process's batch).
        val: metrics of the last validation ({} without validation data).
        best: best validation metric (NormalNet mean angular error in degrees, ProxyNet
            vertex error in mm) or None.
        checkpoint, weights, best_weights: files written (best_weights None without
            validation).
        seconds: wall time of this call; samples_per_s: training throughput (all processes).
        finished: True when the configured epochs / steps are done (False when stopped by
            ``stop_at``).
        rank, world_size: this process and the process count.
    """

    run_dir: Path
    kind: str
    step: int
    epoch: int
    losses: list[float]
    val: dict[str, float]
    best: float | None
    checkpoint: Path
    weights: Path
    best_weights: Path | None
    seconds: float
    samples_per_s: float
    finished: bool
    rank: int = 0
    world_size: int = 1

    def summary(self) -> str:
        val = ", ".join(f"{k} {v:.4g}" for k, v in self.val.items())
        last = f"{self.losses[-1]:.5g}" if self.losses else "-"
        return (f"{self.kind} run {self.run_dir}: step {self.step}, epoch {self.epoch}, last "
                f"loss {last}, {self.samples_per_s:.1f} samples/s, {self.seconds:.1f} s"
                + (f"; validation: {val}" if val else "")
                + ("" if self.finished else " (stopped early; resume to continue)"))


# ------------------------------------------------------------------ data stream
class _KeyedDataset(Dataset):
    """Samples of a FaceDataset keyed by ``(position, k, epoch)``: the image choice and
    augmentation use ``default_rng([seed, epoch, position, tag])``."""

    def __init__(self, base: FaceDataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        pos, k, epoch = key
        rng = np.random.default_rng([self.seed, int(epoch), int(pos), _SAMPLE_TAG])
        return self.base.sample(int(pos), k=int(k), rng=rng)


class EpochBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of ``(position, k, epoch)`` keys for one epoch, one image count k per batch.

    The positions of epoch e are those of ``DistributedSampler(n, world_size, rank,
    shuffle, seed)`` at epoch e (a seeded permutation, split between processes, padded to
    equal shares); batch b's count is drawn from ``counts`` by
    ``default_rng([seed, e, b, tag])`` (the same on every process).

    Args:
        n: dataset length; batch_size: per batch.
        counts: image counts to draw from.
        seed: the run seed; rank, world_size: this process and the process count.
        shuffle: permute the samples (else file order).
        drop_last: drop a last incomplete batch (ignored when there is only one batch).
    """

    def __init__(self, n: int, batch_size: int, counts: Sequence[int], *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if n < 1:
            raise ConfigError("the training data holds no sample")
        self.positions = DistributedSampler(range(n), num_replicas=world_size, rank=rank,
                                            shuffle=shuffle, seed=seed)
        self.batch_size = int(batch_size)
        self.counts = tuple(int(c) for c in counts)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select epoch ``epoch`` and skip its first ``skip`` batches (resumption)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def __len__(self) -> int:
        m = len(self.positions)
        if self.drop_last and m >= self.batch_size:
            return m // self.batch_size
        return -(-m // self.batch_size)

    def __iter__(self):
        self.positions.set_epoch(self.epoch)
        pos = list(self.positions)
        bs = self.batch_size
        for b in range(self.skip, len(self)):
            rng = np.random.default_rng([self.seed, self.epoch, b, _COUNT_TAG])
            k = self.counts[int(rng.integers(len(self.counts)))]
            yield [(p, k, self.epoch) for p in pos[b * bs:(b + 1) * bs]]


def lr_factor(step: int, config: TrainConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then
    ``cosine``: ``r + (1 - r) (1 + cos(pi p)) / 2`` with p the progress from the end of the
    warm-up to ``total_steps`` and r = ``min_lr_ratio``; ``step``: ``step_gamma ** (step //
    (step_epochs * steps_per_epoch))``; ``constant``: 1.
    """
    w = config.warmup_steps
    if w and step < w:
        return (step + 1) / w
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.step_gamma ** (step // max(1, config.step_epochs * steps_per_epoch))
    p = min(1.0, max(0.0, (step - w) / max(1, total_steps - w)))
    r = config.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))


# ------------------------------------------------------------------ processes
@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist(0, 1, resolve_device(device), False)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # rank 0 validates alone while the others wait in the next collective
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
        owns = True
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has "
                          f"{dist.get_world_size()} processes")
    return _Dist(dist.get_rank(), world, dev, owns)


def _all_true(flag: bool, d: _Dist) -> bool:
    """True when ``flag`` holds on every process."""
    if d.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def _mean_over_processes(values: dict[str, float], d: _Dist) -> dict[str, float]:
    """The mean of each value over the processes (the same keys on every process)."""
    if d.world == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return {k: float(v) / d.world for k, v in zip(keys, t.tolist())}


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------ logging
class _MetricsLog:
    """``metrics.csv`` (rank 0): fixed columns per run kind; on resumption the rows after
    the checkpoint's step are dropped, then rows are appended."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        self.path = path
        self.columns = columns
        kept: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                kept = [r for r in csv.DictReader(f)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept)

    def write(self, row: dict[str, Any]) -> None:
        def fmt(v: Any) -> Any:
            if isinstance(v, float):
                return "" if not math.isfinite(v) else f"{v:.7g}"
            return v
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: fmt(v) for k, v in row.items()})


def _tensorboard(enabled: bool, out: Path) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: metrics go to %s only", METRICS_NAME)
        return None
    return SummaryWriter(str(out / TENSORBOARD_DIR))


# ------------------------------------------------------------------ the trainer
class _Trainer:
    """State of one training call (see :func:`train`)."""

    def __init__(self, config: TrainConfig, model: MorphableModel, net: nn.Module,
                 dist_info: _Dist, out: Path) -> None:
        self.cfg = config
        self.model = model
        self.net = net
        self.d = dist_info
        self.out = out
        self.dev = dist_info.device
        self.kind = config.kind
        self.ploss = ProxyLossConfig(**config.proxy_loss)
        self.source: ProxySource | None = None
        self.val_source: ProxySource | None = None
        if self.kind == "normal":
            self.source = ProxySource(config.proxy_source, model, noise=config.proxy_noise,
                                      seed=config.seed, device=self.dev)
            self.val_source = self.source
            if self.source.kind == "none":
                self.val_source = ProxySource("perturbed", model, noise=config.proxy_noise,
                                              seed=config.seed, device=self.dev)
        #: the normal architecture (facepsnet keeps the trainer's own losses)
        self.arch = arch_of(net.config) if self.kind == "normal" else None
        #: optimiser steps done (read by architectures whose loss follows a schedule)
        self.step = 0
        #: passes of the validation forward: as the network will be used
        self.val_passes = default_passes(config.to_dict()) if self.kind == "normal" else 1
        self.wrapped: nn.Module = net
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.arch not in (None, "facepsnet"):
                # their losses run passes outside forward (and leave modules unused per
                # step): DDP's gradient hooks cannot follow them
                raise ConfigError(f"data-parallel training runs the facepsnet architecture "
                                  f"only; train {self.arch} in one process")
            self.wrapped = DDP(net, device_ids=[self.dev.index] if self.dev.type == "cuda"
                               else None)

    # --------------------------------------------------------- fields read
    def train_fields(self) -> list[str]:
        if self.kind == "proxy":
            return ["images", "K", "landmarks", "params"]
        return sorted({"images", "normals", "face_mask", *self.source.fields,
                       *getattr(self.net, "extra_fields", ())})

    def val_fields(self) -> list[str]:
        if self.kind == "proxy":
            return ["images", "K", "landmarks", "params", "normals", "face_mask"]
        return sorted({"images", "normals", "face_mask", "K", *self.val_source.fields,
                       *getattr(self.net, "extra_fields", ())})

    def loss_columns(self) -> list[str]:
        if self.kind == "proxy":
            return ["geometry", "landmarks", "regularization"]
        if self.arch != "facepsnet":
            return list(self.net.loss_names)
        return ([f"stage{i}" for i in range(self.net.config.cascade + 1)]
                + (["grad"] if self.net.config.grad_head else []))

    def val_columns(self) -> list[str]:
        if self.kind == "proxy":
            return ["vertex_mm", "landmark_px", "proxy_deg"]
        return ["mean_deg", "median_deg", "proxy_mean_deg"]

    # --------------------------------------------------------- one step
    def losses(self, net: nn.Module, batch: dict[str, Any], stream: int,
               source: ProxySource | None, *, passes: int = 1
               ) -> tuple[torch.Tensor, dict[str, float], Any]:
        """(total loss, its terms, prediction) of a batch; NormalNet runs ``passes``
        times, and in training mode a ``self_feed`` share of the samples gets its own
        first estimate as the proxy input."""
        dev = self.dev
        images = batch["images"].to(dev, non_blocking=True)
        imask = batch["image_mask"].to(dev)
        if self.kind == "proxy":
            K = batch["K"].to(dev)
            pred = net(images, K, imask)
            params = {k: batch["params"][k].to(dev) for k in ("id", "exp", "pose")}
            gt = vertices_from_params(self.model, params)
            pl = proxy_loss(self.model, pred.vertices(self.model), gt, K,
                            batch["landmarks"].to(dev), batch["landmark_mask"].to(dev),
                            (pred.alpha_id, pred.alpha_exp), self.ploss)
            return pl.total, {k: v for k, v in pl.items().items() if k != "total"}, pred
        proxy = source(batch, stream=stream)
        gt = batch["normals"].to(dev)
        region = batch["face_mask"].to(dev)
        if source.kind != "none":
            region = region * proxy.mask
        proxy_normals = proxy.normals
        if self.arch != "facepsnet":
            out = net(images, proxy_normals, imask, proxy.mask)
            extra = {k: batch[k].to(dev) for k in getattr(self.net, "extra_fields", ())}
            total, terms = self.net.loss(out, gt, region, LossInputs(
                images=images, image_mask=imask, proxy_normals=proxy_normals,
                proxy_mask=proxy.mask, step=self.step, batch=extra))
            return total, {k: float(v.detach()) for k, v in terms.items()}, out
        if self.cfg.self_feed > 0 and net.training and source.kind != "none":
            fed = self_feed_mask(batch["index"], self.cfg.self_feed, self.cfg.seed, stream)
            if bool(fed.any()):
                sel = fed.to(dev)
                with torch.no_grad():
                    first = net(images[sel], proxy_normals[sel], imask[sel],
                                proxy.mask[sel]).normals
                proxy_normals = proxy_normals.clone()
                proxy_normals[sel] = first
        out = net(images, proxy_normals, imask, proxy.mask, passes=passes)
        weights = self.cfg.stage_weights or (1.0,) * len(out.stages)
        terms = [normal_loss(s, gt, region) for s in out.stages]
        total = sum(w * t for w, t in zip(weights, terms))
        named = {f"stage{i}": float(t.detach()) for i, t in enumerate(terms)}
        if "grad_magnitude" in out.aux:
            g = gradient_magnitude_loss(out.aux["grad_magnitude"], batch["depth"].to(dev),
                                        batch["K"].to(dev), batch["mask"].to(dev))
            total = total + self.net.config.grad_weight * g
            named["grad"] = float(g.detach())
        return total, named, out

    # --------------------------------------------------------- validation
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Validation metrics (rank 0, the unwrapped network, eval mode)."""
        net = self.net
        was_training = net.training
        net.eval()
        acc, proxy_acc = ErrorAccumulator(), ErrorAccumulator()
        vert: list[float] = []
        lms: list[float] = []
        loss_sum, n_batches = 0.0, 0
        try:
            with torch.no_grad():
                for batch in loader:
                    if self.kind == "proxy":
                        loss, _, pred = self.losses(net, batch, EVAL_STREAM, None)
                        pe = proxy_errors(self.model, pred, batch, self.dev)
                        vert += pe["vertex_mm"].tolist()
                        lms += [x for x in pe["landmark_px"].tolist() if math.isfinite(x)]
                        acc.add(pe["normal_deg"])
                    else:
                        proxy = self.val_source(batch, stream=EVAL_STREAM)
                        gt = batch["normals"].to(self.dev)
                        region = (batch["face_mask"].to(self.dev) > 0) & (proxy.mask > 0)
                        net_src = (self.source if self.source.kind == "none"
                                   else _Fixed(proxy))
                        loss, _, out = self.losses(net, batch, EVAL_STREAM, net_src,
                                                   passes=self.val_passes)
                        acc.add(angular_error_deg(out.normals, gt)[region])
                        proxy_acc.add(angular_error_deg(proxy.normals, gt)[region])
                    loss_sum += float(loss)
                    n_batches += 1
        finally:
            net.train(was_training)
        res = {"loss": loss_sum / max(1, n_batches)}
        st = acc.stats()
        if self.kind == "proxy":
            res.update(vertex_mm=float(np.mean(vert)) if vert else float("nan"),
                       landmark_px=float(np.mean(lms)) if lms else float("nan"),
                       proxy_deg=st.mean)
        else:
            res.update(mean_deg=st.mean, median_deg=st.median,
                       proxy_mean_deg=proxy_acc.stats().mean)
        return res

    def best_key(self) -> str:
        return "vertex_mm" if self.kind == "proxy" else "mean_deg"


def self_feed_mask(indices: Any, share: float, seed: int, stream: int) -> torch.Tensor:
    """(B,) bool: the samples whose proxy input is the network's own first estimate
    (``TrainConfig.self_feed``); sample ``i`` draws from ``numpy.random.default_rng([seed,
    stream, i, 1])``, so the choice does not depend on the batch it is in."""
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return torch.tensor([np.random.default_rng([int(seed), int(stream), int(i), 1]).random()
                         < share for i in idx], dtype=torch.bool)


class _Fixed:
    """A proxy source that returns one precomputed render (validation)."""

    kind = "fixed"

    def __init__(self, render: Any) -> None:
        self.render = render

    def __call__(self, batch: Any, *, stream: int = 0) -> Any:
        return self.render


def _build_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    a, b = saved.to_dict(), new.to_dict()
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RUNTIME_FIELDS and a.get(k) != b.get(k)]


def _resolve_network(cfg: TrainConfig, model: MorphableModel) -> TrainConfig:
    """``cfg`` with every network field filled in (and the stage weights checked)."""
    net_cfg = network_config(cfg.kind, cfg.network, model)
    stages = getattr(net_cfg, "cascade", 0) + 1
    if cfg.kind == "normal" and cfg.stage_weights is not None and \
            len(cfg.stage_weights) != stages:
        raise ConfigError(f"stage_weights has {len(cfg.stage_weights)} entries; the network "
                          f"has {stages} stages (cascade {stages - 1} + 1)")
    return cfg.replace(network=json.loads(json.dumps(net_cfg.to_dict())))


# ------------------------------------------------------------------ train
def train(kind: str, config: TrainConfig | None, data: str | os.PathLike,
          val_data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          resume: bool = False, *, stop_at: int | None = None,
          model: MorphableModel | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a ProxyNet (``kind="proxy"``) or NormalNet (``kind="normal"``) into run folder
    ``out`` (module docstring for what is written).

    Args:
        kind: ``proxy`` or ``normal`` (must agree with ``config.kind``).
        config: the run's configuration; None: :meth:`TrainConfig.for_kind` defaults, or on
            resumption the run's saved configuration.
        data: training data: contract-4 ``.h5`` file or split ``.json``.
        val_data: validation data (same forms) or None.
        out: the run folder (created). A folder that already holds ``checkpoint.pt`` needs
            ``resume=True``.
        resume: continue the run in ``out`` from its ``checkpoint.pt``. Without ``config``
            the saved configuration is used; with one, only :data:`RUNTIME_FIELDS` may
            differ from it.
        stop_at: stop (writing a checkpoint) once this many optimiser steps are done in
            total, as if interrupted; the schedule still follows ``config``.
        model: the morphable model object (default: loaded from ``config.model``).
        on_step: called as ``on_step(step, loss)`` after every optimiser step.

    Returns:
        :class:`TrainResult` (rank 0's files; every process returns its own losses).

    Raises:
        ConfigError: invalid options, data of another model, a run folder in the way.
        CheckpointError: resuming a checkpoint of another kind, architecture or model.
        TrainingError: a non-finite loss or gradient (the message names the step).
        DatasetError: unreadable data.
    """
    from faceps.model import load_model

    t_start = time.perf_counter()
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}; got {kind!r}")
    if out is None:
        raise ConfigError("train needs an output run folder (out)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if resume:
        ckpt = load_file(ckpt_path)
        if ckpt.get("format") != "faceps.checkpoint/1":
            raise CheckpointError(f"{ckpt_path}: a weights-only file cannot be resumed")
        check_compatible(ckpt, kind=kind, path=ckpt_path)
        saved = TrainConfig.from_dict(dict(ckpt["config"]))
        config = saved if config is None else config
    elif ckpt_path.exists():
        raise ConfigError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass resume=True "
                          f"to continue it, or choose another folder")
    config = config or TrainConfig.for_kind(kind)
    if config.kind != kind:
        raise ConfigError(f"config.kind is {config.kind!r} but kind is {kind!r}")
    model_obj = model if model is not None else load_model(config.model)
    config = _resolve_network(config, model_obj)

    d = _setup_distributed(config.device)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = build_network(kind, network_config(kind, config.network, model_obj))
        state = {"step": 0, "epoch": 0, "batch": 0, "best": None}
        if ckpt is not None:
            load_state(net, ckpt, kind=kind, model=model_obj, path=ckpt_path)
            diffs = _config_differences(saved, config)
            if diffs:
                raise ConfigError(f"{out}: resuming keeps the run's settings; these differ "
                                  f"from {CONFIG_NAME}: " + "; ".join(diffs[:6])
                                  + f" (only {', '.join(RUNTIME_FIELDS)} may change)")
            state = {k: ckpt[k] for k in ("step", "epoch", "batch", "best")}
            if int(ckpt.get("world_size", 1)) != d.world:
                log.warning("%s was trained on %s process(es), resumed on %s: the data "
                            "order differs from an uninterrupted run", out,
                            ckpt.get("world_size", 1), d.world)
        elif config.init_weights is not None:
            init_path = resolve_weights(config.init_weights)
            _init_from(net, load_file(init_path), kind, model_obj, init_path)
            log.info("%s: network initialised from %s", out, init_path)
        net.to(d.device).train()
        return _run(config, model_obj, net, d, out, data, val_data, state, ckpt,
                    stop_at, on_step, t_start)
    finally:
        torch.set_num_threads(threads_before)
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_from(net: nn.Module, ckpt: dict[str, Any], kind: str, model: MorphableModel,
               path: Path) -> None:
    """Copy the weights of ``ckpt`` into ``net`` (``TrainConfig.init_weights``). A network
    that only adds parameters to the file's (a new head, e.g. ``grad_head``) takes every
    stored one and keeps its initial values for the new ones; any other difference raises
    :class:`CheckpointError` (:func:`load_state`)."""
    try:
        load_state(net, ckpt, kind=kind, model=model, path=path)
        return
    except CheckpointError:
        mine, theirs = net.state_dict(), ckpt.get("state_dict") or {}
        if ckpt.get("kind") != kind or not theirs or not set(theirs) < set(mine) or any(
                tuple(mine[k].shape) != tuple(theirs[k].shape) for k in theirs):
            raise
    check_compatible(ckpt, kind=kind, model=model, path=path)   # the kind and the model
    net.load_state_dict(theirs, strict=False)
    new = sorted(set(mine) - set(theirs))
    log.warning("%s: %d parameter(s) of this network are not in the file and keep their "
                "initial values (e.g. %s)", path, len(new), ", ".join(new[:3]))


def _run(cfg: TrainConfig, model: MorphableModel, net: nn.Module, d: _Dist, out: Path,
         data: str | os.PathLike, val_data: str | os.PathLike | None, state: dict[str, Any],
         ckpt: dict[str, Any] | None, stop_at: int | None,
         on_step: Callable[[int, float], None] | None, t_start: float) -> TrainResult:
    tr = _Trainer(cfg, model, net, d, out)
    ds = open_dataset(data, augment=cfg.augment, fields=tr.train_fields())
    check_dataset_model(ds, model)
    sampler = EpochBatchSampler(len(ds), cfg.batch_size, cfg.image_counts, seed=cfg.seed,
                                rank=d.rank, world_size=d.world,
                                drop_last=len(ds) >= cfg.batch_size * d.world)
    pin = d.device.type == "cuda"
    loader = DataLoader(_KeyedDataset(ds, cfg.seed), batch_sampler=sampler,
                        collate_fn=collate_samples, num_workers=cfg.num_workers,
                        pin_memory=pin)
    val_loader = None
    if val_data is not None and d.main:
        vds = open_dataset(val_data, n_images=None, augment=None, fields=tr.val_fields())
        check_dataset_model(vds, model)
        val_loader = DataLoader(vds, batch_size=cfg.batch_size, shuffle=False,
                                collate_fn=collate_samples, num_workers=cfg.num_workers)
    spe = len(sampler)
    total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * spe)

    opt = _build_optimizer(cfg, net)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg, total, spe))
    if ckpt is not None:
        before = dict(ckpt.get("extra") or {})
        if before.get("steps_per_epoch", spe) != spe or before.get("n_samples", len(ds)) \
                != len(ds):
            log.warning("%s: the training data has changed since the checkpoint (%s samples, "
                        "%s steps per epoch; now %d, %d): the run does not continue as an "
                        "uninterrupted one would", out, before.get("n_samples"),
                        before.get("steps_per_epoch"), len(ds), spe)
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            sched.load_state_dict(ckpt["scheduler"])

    step, epoch, batch_pos = int(state["step"]), int(state["epoch"]), int(state["batch"])
    tr.step = step
    best = state["best"]
    resume_step = step if ckpt is not None else None
    metrics = tb = None
    columns = (["step", "epoch", "split", "loss"] + tr.loss_columns()
               + ["lr", "samples_per_s", "seconds"] + tr.val_columns())
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_NAME)
        save_json(out / RUN_NAME, {
            "format": "faceps.train-run/1", "kind": cfg.kind, "data": str(data),
            "val_data": None if val_data is None else str(val_data),
            "model": {"name": model.name, "fingerprint": model_fingerprint(model)},
            "world_size": d.world, "device": str(d.device), "resumed_at_step": resume_step,
            "started": now_iso(), "faceps_version": __version__,
            "torch_version": str(torch.__version__), "steps_per_epoch": spe, "total_steps": total})
        metrics = _MetricsLog(out / METRICS_NAME, columns, resume_step)
        tb = _tensorboard(cfg.tensorboard, out)
    _barrier(d)

    bar = None
    if cfg.progress and d.main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", desc=f"train {cfg.kind}",
                   dynamic_ncols=True)
    losses: list[float] = []
    last_val: dict[str, float] = {}
    n_samples_total, t_loop = 0, time.perf_counter()
    interval: dict[str, float] = {}
    n_interval, samples_interval, t_interval = 0, 0, time.perf_counter()
    stopped = done = False
    ckpt_file = out / CHECKPOINT_NAME
    weights_file = out / WEIGHTS_NAME
    best_file = out / BEST_NAME if (out / BEST_NAME).exists() else None

    def save_all(epoch_next: int, batch_next: int) -> None:
        if not d.main:
            return
        save_checkpoint(ckpt_file, kind=cfg.kind, network=net, optimizer=opt, scheduler=sched,
                        step=step, epoch=epoch_next, batch=batch_next, config=cfg.to_dict(),
                        model=model, best=best, world_size=d.world,
                        extra={"steps_per_epoch": spe, "n_samples": len(ds)})
        save_weights(weights_file, kind=cfg.kind, network=net, model=model,
                     config=cfg.to_dict(), metrics=last_val, step=step)

    try:
        while step < total and epoch < cfg.epochs and (stop_at is None or step < stop_at):
            sampler.set_epoch(epoch, skip=batch_pos)
            b_idx = batch_pos - 1
            for b_idx, batch in enumerate(loader, start=batch_pos):
                loss, terms, _ = tr.losses(tr.wrapped, batch, epoch, tr.source)
                value = float(loss.detach())
                lr_now = opt.param_groups[0]["lr"]
                if not _all_true(math.isfinite(value), d):
                    raise TrainingError(
                        f"non-finite training loss ({value}) at step {step + 1} (epoch "
                        f"{epoch}, batch {b_idx}); terms: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                        + f"; learning rate {lr_now:g}: lower it, or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(
                    net.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
                if not _all_true(bool(torch.isfinite(gnorm)), d):
                    raise TrainingError(f"non-finite gradient at step {step + 1} (epoch "
                                        f"{epoch}, batch {b_idx}; loss {value:.6g}); "
                                        f"learning rate {lr_now:g}: lower it, or set "
                                        f"grad_clip")
                opt.step()
                sched.step()
                step += 1
                tr.step = step
                B = int(batch["images"].shape[0])
                losses.append(value)
                n_samples_total += B * d.world
                for k, v in {"loss": value, **terms}.items():
                    interval[k] = interval.get(k, 0.0) + v
                n_interval += 1
                samples_interval += B * d.world
                if on_step is not None:
                    on_step(step, value)
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0:
                    dt = max(time.perf_counter() - t_interval, 1e-9)
                    row = _mean_over_processes(
                        {k: v / n_interval for k, v in interval.items()}, d)
                    row.update(step=step, epoch=epoch, split="train", lr=lr_now,
                               samples_per_s=samples_interval / dt,
                               seconds=time.perf_counter() - t_start)
                    if d.main:
                        metrics.write(row)
                        if tb is not None:
                            for k, v in row.items():
                                if isinstance(v, float) and k != "seconds":
                                    tb.add_scalar(f"train/{k}", v, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4g}",
                                        sps=f"{row['samples_per_s']:.1f}")
                    interval, n_interval, samples_interval = {}, 0, 0
                    t_interval = time.perf_counter()
                end_of_epoch = b_idx == spe - 1
                done = step >= total or (end_of_epoch and epoch + 1 >= cfg.epochs)
                if (val_loader is not None and ((end_of_epoch and (epoch + 1) % cfg.val_every
                                                 == 0) or (done and not end_of_epoch))):
                    last_val = tr.validate(val_loader)
                    metrics.write({**last_val, "step": step, "epoch": epoch, "split": "val",
                                   "lr": lr_now, "seconds": time.perf_counter() - t_start})
                    if tb is not None:
                        for k, v in last_val.items():
                            tb.add_scalar(f"val/{k}", v, step)
                    key = last_val.get(tr.best_key(), float("nan"))
                    if math.isfinite(key) and (best is None or key < best):
                        best = key
                        best_file = save_weights(out / BEST_NAME, kind=cfg.kind, network=net,
                                                 model=model, config=cfg.to_dict(),
                                                 metrics=last_val, step=step)
                    log.info("step %d epoch %d validation: %s", step, epoch,
                             ", ".join(f"{k} {v:.4g}" for k, v in last_val.items()))
                stopped = stop_at is not None and step >= stop_at and not done
                nxt = (epoch + 1, 0) if end_of_epoch else (epoch, b_idx + 1)
                if step % cfg.checkpoint_every == 0 or done or stopped:
                    save_all(*nxt)
                if done or stopped:
                    break
            if step >= total or stopped or done:
                break
            epoch += 1
            batch_pos = 0
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
    _barrier(d)
    if d.world > 1:
        log.info("rank %d/%d finished at step %d", d.rank, d.world, step)
    finished = step >= total
    seconds = time.perf_counter() - t_start
    sps = n_samples_total / max(time.perf_counter() - t_loop, 1e-9)
    return TrainResult(run_dir=out, kind=cfg.kind, step=step, epoch=epoch, losses=losses,
                       val=last_val, best=best, checkpoint=ckpt_file, weights=weights_file,
                       best_weights=best_file, seconds=seconds, samples_per_s=sps,
                       finished=finished, rank=d.rank, world_size=d.world)


# ------------------------------------------------------------------ command line
def config_from_args(args: argparse.Namespace, kind: str | None = None) -> TrainConfig | None:
    """The :class:`TrainConfig` the parsed options ask for.

    Starts from ``--config`` when given, else (with ``--resume``) from the run's saved
    configuration, else from :meth:`TrainConfig.for_kind`; the options given on the command
    line replace fields. Returns None when resuming without any option that changes the
    saved configuration (:func:`train` then uses it as is).
    """
    changes: dict[str, Any] = {}
    for name in ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "optimizer",
                 "schedule", "warmup_steps", "grad_clip", "seed", "checkpoint_every",
                 "log_every", "val_every", "num_workers", "threads", "device", "model",
                 "proxy_source", "self_feed"):
        v = getattr(args, name, None)
        if v is not None:
            changes[name] = v
    if getattr(args, "image_counts", None):
        try:
            changes["image_counts"] = tuple(int(x) for x in args.image_counts.split(","))
        except ValueError:
            raise ConfigError(f"--image-counts must be integers like 1,2,3; got "
                              f"{args.image_counts!r}") from None
    if getattr(args, "no_augment", False):
        changes["augment"] = None
    if getattr(args, "no_progress", False):
        changes["progress"] = False
    if getattr(args, "proxy_noise_scale", None) is not None:
        changes["proxy_noise"] = ProxyNoise().scaled(args.proxy_noise_scale)
    if getattr(args, "proxy_noise_range", None):
        try:
            lo, hi = (float(x) for x in args.proxy_noise_range.split(","))
        except ValueError:
            raise ConfigError(f"--proxy-noise-range must be two numbers like 0.5,2.5; got "
                              f"{args.proxy_noise_range!r}") from None
        changes["proxy_noise"] = changes.get("proxy_noise", ProxyNoise()).with_range((lo, hi))
    if getattr(args, "init_weights", None):
        changes["init_weights"] = args.init_weights
    network: dict[str, Any] = {}
    if getattr(args, "network", None):
        try:
            network = dict(json.loads(args.network))
        except (ValueError, TypeError):
            raise ConfigError(f"--network must be a JSON object; got {args.network!r}") from None
    if getattr(args, "cascade", None) is not None:
        network["cascade"] = args.cascade
    if getattr(args, "arch", None):
        network["arch"] = args.arch
        cls = network_class(args.arch)
        if cls.single_image and "image_counts" not in changes:
            changes["image_counts"] = (1,)
        if not cls.uses_proxy and "proxy_source" not in changes:
            changes["proxy_source"] = "none"
    base: TrainConfig | None = None
    if getattr(args, "config", None):
        base = TrainConfig.load(args.config)
    elif getattr(args, "resume", False):
        if not changes and not network:
            return None
        base = TrainConfig.load(args.out)
    if network:
        changes["network"] = {**(base.network if base else {}), **network}
    if base is not None:
        if kind is not None and base.kind != kind:
            raise ConfigError(f"the configuration is for a {base.kind!r} run, not {kind!r}")
        return base.replace(**changes)
    kind = kind or getattr(args, "kind", None)
    if kind is None:
        raise ConfigError("the network kind is required (proxy or normal)")
    return TrainConfig.for_kind(kind, **changes)


def run_from_args(args: argparse.Namespace, kind: str | None = None) -> TrainResult:
    """Train as the options of :func:`add_arguments` say (``kind`` overrides ``--kind``;
    when resuming, the kind defaults to the run's)."""
    kind = kind or getattr(args, "kind", None)
    config = config_from_args(args, kind)
    if config is not None:
        kind = kind or config.kind
    elif kind is None:
        kind = TrainConfig.load(args.out).kind
    return train(kind, config, args.data, getattr(args, "val_data", None), args.out,
                 resume=bool(getattr(args, "resume", False)),
                 stop_at=getattr(args, "stop_at", None))


def leave_process(world_size: int) -> int:
    """Exit code 0 for a finished run; a data-parallel process (``world_size`` > 1) leaves
    at once instead, without the interpreter's teardown.

    By then the run is complete: every file is written and the process group destroyed.
    What remains is the teardown of torch's C++ objects at interpreter exit, where the
    gloo/c10d threads occasionally abort a finished process ("terminate called without an
    active exception", exit -6: about once in fifty two-process CPU runs here), which makes
    torchrun report a failed job. Output streams and logging handlers are flushed first.
    """
    if world_size <= 1:
        return 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m faceps.learn.train``: train and print one summary line per process
    (exit code 2 on a :class:`FacepsError`)."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m faceps.learn.train", description="Train ProxyNet or NormalNet "
        "(also under torchrun for data-parallel training)."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_from_args(args)
    except FacepsError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(f"rank {result.rank}/{result.world_size}: {result.summary()}", flush=True)  # noqa: T201
    return leave_process(result.world_size)


if __name__ == "__main__":
    sys.exit(main())
