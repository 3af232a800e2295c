"""Morphable face models: the contract-5 format, the built-in procedural model, importers."""

from __future__ import annotations

import os

from faceps.model.morphable import FORMAT, Coefficients, MorphableModel

__all__ = ["MorphableModel", "Coefficients", "FORMAT", "load_model"]


def load_model(spec: str | os.PathLike | MorphableModel | None = "builtin") -> MorphableModel:
    """A model from ``"builtin"`` (or None), a ``.npz`` path, or an existing model."""
    if isinstance(spec, MorphableModel):
        return spec
    if spec is None or str(spec) == "builtin":
        from faceps.model.builtin import builtin_model

        return builtin_model()
    return MorphableModel.load(spec)
