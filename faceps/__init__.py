"""faceps: near-light photometric-stereo face capture, datasets and learning.

Conventions (units, frames, encodings) are listed once in ``docs/conventions.md`` and
implemented in :mod:`faceps.core`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
