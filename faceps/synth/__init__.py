"""Synthetic data: near-light image formation, random detailed faces, synthetic capture
sessions with ground truth, and (in :mod:`faceps.synth.register`) scan registration.

Import the submodules directly (``faceps.synth.session``, ``faceps.synth.faces``, ...);
this package imports nothing heavy on its own.
"""
