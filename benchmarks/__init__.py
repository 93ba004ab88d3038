"""Benchmarks of the cogvx_kernels ops: `python benchmarks/run.py --help`.

One module per op (`benchmarks/<op>.py`); `run.py` maps op names to them and times every backend
of the op registry against the `reference` baseline.
"""
