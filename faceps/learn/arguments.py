"""Command-line options of training, kept free of torch so that building the ``faceps``
parser stays fast; :mod:`faceps.learn.train` turns them into a ``TrainConfig``."""

from __future__ import annotations

import argparse

#: the networks that can be trained (as :data:`faceps.learn.checkpoint.KINDS`)
KINDS = ("proxy", "normal")
#: the normal-network architectures (faceps.learn.archs.ARCHS, kept import-free here)
ARCH_NAMES = ("facepsnet", "casfne", "exemplar", "crossmodal")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adam", "adamw")


def add_arguments(parser: argparse.ArgumentParser, *, kind_option: bool = True
                  ) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (shared by ``python -m faceps.learn.train``
    and the ``faceps train`` command, which passes the kind positionally and
    ``kind_option=False``); :func:`config_from_args` turns the result into a
    :class:`TrainConfig`, :func:`run_from_args` trains."""
    p = parser
    if kind_option:
        p.add_argument("--kind", choices=KINDS, help="network to train")
    p.add_argument("--data", required=True, help="training data (.h5 or split .json)")
    p.add_argument("--val-data", help="validation data (.h5 or split .json)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--config", help="start from this config.json (or run folder)")
    p.add_argument("--model", help="morphable model: builtin or a .npz file")
    p.add_argument("--network", help='network options as JSON, e.g. \'{"cascade": 2}\'')
    p.add_argument("--arch", choices=ARCH_NAMES,
                   help="normal network architecture (default facepsnet; casfne, exemplar "
                        "and crossmodal read one image per sample and default to "
                        "--image-counts 1, and casfne and crossmodal to --proxy-source none)")
    p.add_argument("--cascade", type=int, help="refinement stages (facepsnet, casfne)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--image-counts", help="images per sample to draw from, e.g. 1,2,3")
    p.add_argument("--no-augment", action="store_true", help="no data augmentation")
    p.add_argument("--proxy-source", help="perturbed, dataset, none or proxynet:RUN")
    p.add_argument("--proxy-noise-scale", type=float,
                   help="multiply the default proxy noise levels")
    p.add_argument("--proxy-noise-range",
                   help="per-sample factor range of the proxy noise, e.g. 0.5,2.5")
    p.add_argument("--self-feed", type=float,
                   help="NormalNet: share of the samples (0-1) whose proxy input is the "
                        "network's own first estimate; such networks infer in two passes")
    p.add_argument("--init-weights", help="start from the weights of this run or .pt file")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--val-every", type=int, help="epochs between validations")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this step")
    return p
