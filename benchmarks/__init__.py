"""Benchmarks of the cogvx_kernels ops: `python benchmarks/run.py --help`.

One module per op or model (`benchmarks/<op>.py`), each implementing `_interface.Benchmark`;
`run.py` (command line and run loop) times every backend of the op registry against the baseline,
with `_timing.py`, `_memory.py` and `_report.py`.
"""
