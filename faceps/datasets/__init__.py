"""Datasets: the contract-4 HDF5 schema, the synthetic dataset builder and inspection.

Import the submodules directly (``faceps.datasets.schema``, ``faceps.datasets.build``,
``faceps.datasets.info``); this package imports nothing heavy on its own.
"""
