"""Synthetic image data for the tests and the benchmarks (bench/): textures and defects
(textures.py) and datasets of them in the layouts patchq reads (layouts.py).

Neither tests nor bench own it, as both use it. It is importable from the repository root, where
both run (pytest's ``pythonpath = ["."]``, ``python -m bench.…``), and is not in the patchq
wheel: patchq itself never generates data, so an installed fleet has no use for it.
"""
