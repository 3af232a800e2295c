"""Where the shared test data lives: ``../shared/data`` beside the repository (as on the
developers' machines and CI), or ``$FACEPS_SHARED_DATA``. Tests that need it skip cleanly
when it is absent (a user's machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    env = os.environ.get("FACEPS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """The path of a shared data file or folder, or skip the calling test."""
    p = shared_data_root().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not available: {p}")
    return p
