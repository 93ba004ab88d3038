"""Triton kernels of the cogvx op library.

One module per op (e.g. ``causal_conv3d``), each exposing its launchers (``forward``/``backward``)
and ``aot_specs()``, the production compile configurations checked by ``cogvx_kernels.triton.aot``
(register use, no spills, tensor-core instructions) without a GPU.

The kernels run on CUDA tensors when compiled, and on CPU tensors under ``TRITON_INTERPRET=1``
(how they are tested on machines without a GPU). Importing this package imports nothing heavy.
"""
