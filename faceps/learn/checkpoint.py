"""Checkpoints and shipped weights of training runs.

Two files per run folder, both written atomically (temporary name + rename,
:func:`faceps.core.atomic.atomic_path`) and read with ``torch.load(weights_only=True)``
(plain containers and tensors only: loading never executes code):

``checkpoint.pt`` (format :data:`CHECKPOINT_FORMAT`): everything needed to continue a run
    exactly: ``kind`` (``proxy`` or ``normal``), ``network_config`` (the ProxyNetConfig /
    NormalNetConfig fields), ``architecture`` (:func:`architecture_fingerprint`), ``model``
    (name and :func:`model_fingerprint` of the morphable model), ``config`` (the
    :class:`faceps.learn.train.TrainConfig` as a dict), ``state_dict``, ``optimizer``,
    ``scheduler``, ``step`` (optimizer steps done), ``epoch`` and ``batch`` (where the data
    stream continues), ``best`` (best validation metric so far), ``world_size``, versions.

``weights.pt`` / ``best.pt`` (format :data:`WEIGHTS_FORMAT`): the small file to ship: the
    same identification fields, ``state_dict`` and ``metrics``; no optimiser state.

Compatibility is checked before any tensor is copied (:func:`check_compatible`): another
network kind, another architecture (configuration or parameter shapes) or another morphable
model raises :class:`CheckpointError` (a :class:`~faceps.core.errors.FacepsError`) naming
what differs, never a torch ``load_state_dict`` traceback.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from faceps import __version__
from faceps.core.atomic import atomic_path, plain_json
from faceps.core.errors import ConfigError, FacepsError
from faceps.learn.normalnet import NormalNetConfig
from faceps.learn.proxynet import ProxyNet, ProxyNetConfig
from faceps.model.morphable import MorphableModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "WEIGHTS_FORMAT",
    "CHECKPOINT_NAME",
    "WEIGHTS_NAME",
    "BEST_NAME",
    "KINDS",
    "CheckpointError",
    "LoadedNetwork",
    "model_fingerprint",
    "model_signature",
    "model_matches",
    "architecture_fingerprint",
    "export_weights",
    "network_config",
    "build_network",
    "save_checkpoint",
    "save_weights",
    "load_file",
    "check_compatible",
    "load_state",
    "resolve_weights",
    "load_network",
]

CHECKPOINT_FORMAT = "faceps.checkpoint/1"
WEIGHTS_FORMAT = "faceps.weights/1"
CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "weights.pt"
BEST_NAME = "best.pt"
#: network kinds: ProxyNet (section 4.1) and NormalNet (section 4.2)
KINDS = ("proxy", "normal")
_NETWORK_NAMES = {"proxy": "ProxyNet", "normal": "NormalNet"}


class CheckpointError(FacepsError):
    """A checkpoint or weights file is missing, unreadable, or does not fit the network,
    the run or the morphable model it is loaded for."""


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, numpy scalars numbers (safe for
    ``weights_only`` loading and for comparisons with configs read from JSON)."""
    return plain_json(obj)


# ------------------------------------------------------------------ identification
_FINGERPRINTS: dict[int, tuple[MorphableModel, str]] = {}


def model_fingerprint(model: MorphableModel) -> str:
    """16 hex digits of SHA-256 over the model's arrays (geometry, bases, topology,
    landmarks; cached per model object)."""
    cached = _FINGERPRINTS.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    h = hashlib.sha256()
    for key, arr in sorted(model.to_arrays().items()):
        a = np.ascontiguousarray(arr)
        h.update(key.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes() if a.dtype.kind not in "OU" else str(a.tolist()).encode())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[id(model)] = (model, digest)
    return digest


_SIGNATURES: dict[int, tuple[MorphableModel, dict]] = {}
#: pseudo-random +-1 projections per float array in :func:`model_signature`
_SIGNATURE_PROBES = 4
#: tolerance of :func:`model_matches`, relative to each array's RMS
_SIGNATURE_RTOL = 1e-4


def model_signature(model: MorphableModel) -> dict[str, Any]:
    """A tolerant identity of the model's arrays, stored with trained networks.

    The exact fingerprint (:func:`model_fingerprint`) hashes the bytes, and a model built
    procedurally (the built-in one) differs in the last bits of a few float32 values
    between CPUs and math libraries, which made one model two. The signature keeps, per
    float array, the count of NaNs, the mean, the RMS and four fixed pseudo-random +-1
    projections (divided by the square root of the count, so all are on the scale of the
    RMS); per other array (topology, landmarks, names) a SHA-256 digest.
    :func:`model_matches` compares them within 1e-4 of the RMS: rounding moves them by
    about 1e-7 of it, one flipped basis column of K by about ``2 / sqrt(K)``.
    """
    cached = _SIGNATURES.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    out: dict[str, Any] = {}
    for key, arr in sorted(model.to_arrays().items()):
        a = np.ascontiguousarray(arr)
        if a.dtype.kind == "f":
            x = a.astype(np.float64).ravel()
            nan = ~np.isfinite(x)
            x = np.where(nan, 0.0, x)
            n = max(x.size, 1)
            rng = np.random.default_rng(20261122)
            probes = [float(np.dot(rng.integers(0, 2, x.size) * 2.0 - 1.0, x) / np.sqrt(n))
                      for _ in range(_SIGNATURE_PROBES)]
            out[key] = [float(nan.sum()), float(x.sum() / n),
                        float(np.sqrt(np.dot(x, x) / n))] + probes
        else:
            h = hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes() if a.dtype.kind not in "OU" else str(a.tolist()).encode())
            out[key] = h.hexdigest()[:16]
    _SIGNATURES[id(model)] = (model, out)
    return out


def model_matches(stored: dict[str, Any], model: MorphableModel) -> bool:
    """Whether ``model`` is the one a checkpoint's ``model`` entry describes: by its
    signature (:func:`model_signature`) when stored, else by the exact fingerprint (files
    written before signatures), and True when neither is stored."""
    sig = stored.get("signature")
    if sig:
        here = model_signature(model)
        if set(sig) != set(here):
            return False
        for key, ref in sig.items():
            now = here[key]
            if isinstance(ref, str) or isinstance(now, str):
                if ref != now:
                    return False
                continue
            ref = np.asarray(ref, np.float64)
            now = np.asarray(now, np.float64)
            if ref.shape != now.shape or ref[0] != now[0]:
                return False
            tol = _SIGNATURE_RTOL * max(float(ref[2]), 1e-12)
            if np.any(np.abs(ref[1:] - now[1:]) > tol):
                return False
        return True
    fp = stored.get("fingerprint", "")
    return not fp or fp == model_fingerprint(model)


def architecture_fingerprint(kind: str, network: nn.Module | dict[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the kind and the sorted (name, shape) list of the
    network's state (parameters and buffers): equal exactly when the states are
    interchangeable."""
    state = network.state_dict() if isinstance(network, nn.Module) else network
    h = hashlib.sha256(kind.encode())
    for name in sorted(state):
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    return h.hexdigest()[:16]


def network_config(kind: str, values: dict[str, Any] | None = None,
                   model: MorphableModel | None = None) -> ProxyNetConfig | NormalNetConfig:
    """The network configuration of ``kind`` from a dict of its fields.

    Args:
        kind: ``proxy`` or ``normal``.
        values: fields of :class:`ProxyNetConfig` / a normal network's configuration
            (``arch`` picks it, :mod:`faceps.learn.archs`; lists are accepted for
            tuples); missing ones take their defaults (for ProxyNet, ``n_id``
            and ``n_exp`` default to the model's sizes).
        model: the morphable model (needed for ProxyNet without ``n_id``/``n_exp``).

    Raises:
        ConfigError: for an unknown kind or field.
    """
    values = dict(values or {})
    if kind == "normal":
        from faceps.learn.archs import normal_config

        return normal_config(values)
    if kind != "proxy":
        raise ConfigError(f"network kind must be one of {KINDS}; got {kind!r}")
    if ("n_id" not in values or "n_exp" not in values) and model is None:
        raise ConfigError("a ProxyNet configuration needs n_id and n_exp (or a model)")
    if model is not None:
        values.setdefault("n_id", model.n_id)
        values.setdefault("n_exp", model.n_exp)
    known = set(ProxyNetConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {_NETWORK_NAMES[kind]} option(s) {unknown}; known: "
                          f"{sorted(known)}")
    for key, value in list(values.items()):
        if isinstance(value, list):
            values[key] = tuple(value)
    try:
        return ProxyNetConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid {_NETWORK_NAMES[kind]} options {values}: {exc}") from None


def build_network(kind: str, config: Any) -> nn.Module:
    """A freshly initialised ProxyNet or normal network (the architecture of
    ``config.arch``, :mod:`faceps.learn.archs`); initialisation uses torch's global
    generator: seed it, or fork it, for reproducible weights."""
    if kind == "proxy" and isinstance(config, ProxyNetConfig):
        return ProxyNet(config)
    if kind == "normal" and not isinstance(config, ProxyNetConfig) and \
            hasattr(config, "arch"):
        from faceps.learn.archs import build_normal_network

        return build_normal_network(config)
    raise ConfigError(f"a {type(config).__name__} does not configure a {kind!r} network")


def _identity(kind: str, network: nn.Module, model: MorphableModel | None,
              model_name: str | None = None) -> dict[str, Any]:
    cfg = getattr(network, "config", None)
    return {
        "kind": kind,
        "network_config": _plain(cfg.to_dict()) if cfg is not None else {},
        "architecture": architecture_fingerprint(kind, network),
        "model": {"name": model.name if model is not None else (model_name or ""),
                  "fingerprint": model_fingerprint(model) if model is not None else "",
                  "signature": model_signature(model) if model is not None else {}},
        "faceps_version": __version__,
        "torch_version": str(torch.__version__),
    }


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}


def _save(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ------------------------------------------------------------------ writing
def save_checkpoint(path: str | os.PathLike, *, kind: str, network: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, step: int, epoch: int,
                    batch: int, config: dict[str, Any], model: MorphableModel,
                    best: float | None = None, world_size: int = 1,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint.pt`` atomically (module docstring for the fields).

    Args:
        path: the file to write.
        kind: ``proxy`` or ``normal``.
        network: the network (unwrapped from DDP); its state is copied to the CPU.
        optimizer, scheduler: their ``state_dict()`` are stored.
        step: optimizer steps done; epoch, batch: the next batch of the data stream.
        config: the training configuration as a plain dict.
        model: the morphable model of the run.
        best: best validation metric so far (None before any validation).
        world_size: processes of the run.
        extra: more plain values (e.g. timings).

    Returns:
        ``path``.
    """
    obj = {
        "format": CHECKPOINT_FORMAT,
        **_identity(kind, network, model),
        "config": _plain(config),
        "state_dict": _cpu_state(network),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "step": int(step),
        "epoch": int(epoch),
        "batch": int(batch),
        "best": None if best is None else float(best),
        "world_size": int(world_size),
        "extra": _plain(extra or {}),
    }
    return _save(path, obj)


def save_weights(path: str | os.PathLike, *, kind: str, network: nn.Module,
                 model: MorphableModel, config: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None, step: int | None = None) -> Path:
    """Write a weights-only file (``weights.pt`` / ``best.pt``) atomically: identification,
    ``state_dict``, the training configuration and ``metrics`` (plain values)."""
    obj = {
        "format": WEIGHTS_FORMAT,
        **_identity(kind, network, model),
        "config": _plain(config or {}),
        "state_dict": _cpu_state(network),
        "metrics": _plain(metrics or {}),
        "step": None if step is None else int(step),
    }
    return _save(path, obj)


def export_weights(run: str | os.PathLike, out: str | os.PathLike, *, which: str = "auto",
                   float16: bool = False) -> Path:
    """Write the weights-only file of a run (or checkpoint) to ``out``, e.g. to ship it.

    The file keeps the identification (kind, network options, architecture, morphable
    model), the training configuration and metrics, and drops the optimiser state. With
    ``float16`` the floating-point tensors are stored in half precision (half the size;
    :func:`load_state` copies them into the float32 network, so a loaded network is
    float32; the rounding changes outputs by about 1e-3 relative).

    Args:
        run: run folder or ``.pt`` file (:func:`resolve_weights`).
        out: the new file (written atomically).
        which: which file of a run folder (:func:`resolve_weights`).
        float16: store floating-point tensors as float16.

    Returns:
        ``out`` as a Path.
    """
    from faceps.learn.infer import training_crop

    src = resolve_weights(run, which)
    ckpt = load_file(src)
    state = {k: (v.half() if float16 and v.is_floating_point() else v)
             for k, v in ckpt["state_dict"].items()}
    crop = training_crop(src, ckpt["kind"], ckpt.get("crop"))
    obj = {"format": WEIGHTS_FORMAT,
           **{k: ckpt[k] for k in ("kind", "network_config", "architecture", "model")},
           "faceps_version": ckpt.get("faceps_version", __version__),
           "torch_version": ckpt.get("torch_version", str(torch.__version__)),
           "config": ckpt.get("config") or {}, "state_dict": state,
           "metrics": ckpt.get("metrics") or {}, "step": ckpt.get("step"),
           "exported_from": str(src), "float16": bool(float16)}
    if crop is not None:
        # the file describes its own input crops wherever it is copied (a ``crop.json``
        # beside it still takes precedence)
        obj["crop"] = {"size": crop.size, "scale": crop.scale, "source": crop.source}
    return _save(out, obj)


# ------------------------------------------------------------------ reading
def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu"
              ) -> dict[str, Any]:
    """Read a checkpoint or weights file with ``torch.load(weights_only=True)``.

    Returns:
        the stored dict (``format`` is :data:`CHECKPOINT_FORMAT` or :data:`WEIGHTS_FORMAT`).

    Raises:
        CheckpointError: when the file is missing, not a torch file, holds anything but
            plain containers and tensors, or is not a faceps checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "WeightsUnpickler error" in ln),
                   lines[0] if lines else type(exc).__name__)
        if "WeightsUnpickler error" in why:
            # torch's hint (allow-list the global) would load code; say what faceps does
            why = why.split(" Please use", 1)[0].rstrip(" .,")
            why += ("; faceps loads only tensors and plain containers and never runs code "
                    "from a checkpoint")
        raise CheckpointError(f"{p}: not a readable faceps checkpoint ({why})") from None
    if not isinstance(obj, dict) or obj.get("format") not in (CHECKPOINT_FORMAT,
                                                              WEIGHTS_FORMAT):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{p}: not a faceps checkpoint (format {found!r}; expected "
                              f"'{CHECKPOINT_FORMAT}' or '{WEIGHTS_FORMAT}')")
    for key in ("kind", "network_config", "architecture", "model", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{p}: field '{key}' is missing")
    if obj["kind"] not in KINDS:
        raise CheckpointError(f"{p}: field 'kind' must be one of {KINDS}; got {obj['kind']!r}")
    return obj


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} (file) vs {b.get(k)!r} (network)" for k in keys
            if _plain(a.get(k)) != _plain(b.get(k))]


def check_compatible(ckpt: dict[str, Any], *, kind: str, network: nn.Module | None = None,
                     model: MorphableModel | None = None, path: str | os.PathLike = "") -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` (from :func:`load_file`) can be loaded
    into ``network`` of ``kind`` for ``model``.

    The message names the file and what differs: the kind; the network options and the
    parameters missing, unexpected or of another shape; the morphable model's name and
    fingerprint.
    """
    where = f"{path}: " if str(path) else ""
    if ckpt["kind"] != kind:
        raise CheckpointError(f"{where}holds a {_NETWORK_NAMES[ckpt['kind']]} "
                              f"({ckpt['kind']!r} run); a {_NETWORK_NAMES.get(kind, kind)} "
                              f"({kind!r}) was asked for")
    if network is not None and architecture_fingerprint(kind, network) != ckpt["architecture"]:
        mine = network.state_dict()
        theirs = ckpt["state_dict"]
        missing = sorted(set(mine) - set(theirs))
        unexpected = sorted(set(theirs) - set(mine))
        shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(mine[k].shape)}"
                  for k in sorted(set(mine) & set(theirs))
                  if tuple(mine[k].shape) != tuple(theirs[k].shape)]
        cfg = getattr(network, "config", None)
        diffs = _config_differences(dict(ckpt["network_config"]),
                                    _plain(cfg.to_dict()) if cfg is not None else {})
        parts = []
        if diffs:
            parts.append("options differ: " + "; ".join(diffs[:6]))
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing from the file (e.g. "
                         f"{', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s) in the file (e.g. "
                         f"{', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (file vs network), e.g. "
                         + "; ".join(shapes[:3]))
        raise CheckpointError(f"{where}the {_NETWORK_NAMES[kind]} architecture differs from "
                              f"the one asked for: " + ("; ".join(parts) or "fingerprints "
                              "differ"))
    if model is not None:
        require_model(dict(ckpt.get("model") or {}), model, path)


def require_model(stored: dict[str, Any], model: MorphableModel,
                  path: str | os.PathLike = "") -> None:
    """Raise :class:`CheckpointError` unless ``model`` is the morphable model of a file's
    stored ``model`` entry (:func:`model_matches`); the message names the file."""
    if not model_matches(stored, model):
        where = f"{path}: " if str(path) else ""
        raise CheckpointError(
            f"{where}was trained with morphable model '{stored.get('name', '?')}' "
            f"(fingerprint {stored.get('fingerprint', '')}); the model given is "
            f"'{model.name}' (fingerprint {model_fingerprint(model)})")


def load_state(network: nn.Module, ckpt: dict[str, Any], *, kind: str,
               model: MorphableModel | None = None, path: str | os.PathLike = "") -> None:
    """:func:`check_compatible`, then copy the stored state into ``network`` (strict)."""
    check_compatible(ckpt, kind=kind, network=network, model=model, path=path)
    network.load_state_dict(ckpt["state_dict"], strict=True)


def resolve_weights(run: str | os.PathLike, which: str = "auto") -> Path:
    """The weights file of a run folder, or ``run`` itself when it is a file.

    Args:
        run: a run folder (written by :func:`faceps.learn.train.train`) or a ``.pt`` file.
        which: ``auto`` (``best.pt`` when the run validated, else ``weights.pt``, else
            ``checkpoint.pt``), ``best``, ``weights`` or ``checkpoint``.

    Raises:
        CheckpointError: when there is no such file.
    """
    p = Path(run)
    if p.is_file():
        return p
    names = {"best": (BEST_NAME,), "weights": (WEIGHTS_NAME,), "checkpoint": (CHECKPOINT_NAME,),
             "auto": (BEST_NAME, WEIGHTS_NAME, CHECKPOINT_NAME)}
    if which not in names:
        raise ConfigError(f"which must be one of {sorted(names)}; got {which!r}")
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such run folder or weights file")
    for name in names[which]:
        if (p / name).is_file():
            return p / name
    raise CheckpointError(f"{p}: holds no {' or '.join(names[which])} (not a training run, "
                          f"or it has not written weights yet)")


@dataclass
class LoadedNetwork:
    """A network restored from a run.

    Attributes:
        kind: ``proxy`` or ``normal``.
        network: the ProxyNet / NormalNet in eval mode on the requested device.
        config: its network configuration.
        train_config: the training configuration stored with it (plain dict).
        model_name, model_fingerprint: the morphable model it was trained with.
        model_entry: the stored ``model`` entry (name, fingerprint and, in files written
            since signatures exist, :func:`model_signature`), for :func:`model_matches`.
        path: the file it was read from.
        metrics: validation metrics stored with the weights (may be empty).
        crop: the input crop recorded in the file (``size``, ``scale``, ``source``;
            exported weights), or None.
    """

    kind: str
    network: nn.Module
    config: ProxyNetConfig | NormalNetConfig
    train_config: dict[str, Any]
    model_name: str
    model_fingerprint: str
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model_entry: dict[str, Any] = field(default_factory=dict)
    crop: dict[str, Any] | None = None


def load_network(run: str | os.PathLike, *, kind: str | None = None,
                 model: MorphableModel | None = None, device: str | torch.device = "cpu",
                 which: str = "auto") -> LoadedNetwork:
    """Rebuild a trained network from a run folder or weights/checkpoint file.

    Args:
        run: run folder or ``.pt`` file (:func:`resolve_weights`).
        kind: expected kind (None: any).
        model: when given, the morphable model must be the one of training.
        device: where to put the network.
        which: which file of a run folder (:func:`resolve_weights`).

    Raises:
        CheckpointError: unreadable file, other kind or model.
    """
    path = resolve_weights(run, which)
    ckpt = load_file(path)
    if kind is not None:
        check_compatible(ckpt, kind=kind, path=path)
    k = ckpt["kind"]
    try:
        cfg = network_config(k, dict(ckpt["network_config"]))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: stored network options are invalid ({exc})") from None
    net = build_network(k, cfg)
    load_state(net, ckpt, kind=k, model=model, path=path)
    net.to(device).eval()
    stored = dict(ckpt.get("model") or {})
    return LoadedNetwork(kind=k, network=net, config=cfg,
                         train_config=dict(ckpt.get("config") or {}),
                         model_name=str(stored.get("name", "")),
                         model_fingerprint=str(stored.get("fingerprint", "")), path=path,
                         metrics=dict(ckpt.get("metrics") or {}), model_entry=stored,
                         crop=dict(ckpt["crop"]) if isinstance(ckpt.get("crop"), dict)
                         else None)
