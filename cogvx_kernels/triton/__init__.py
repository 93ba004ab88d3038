"""Triton kernels of the cogvx op library.

One module per op (e.g. ``causal_conv3d``), each exposing its launchers (``forward``/``backward``)
and ``aot_specs()``, the production compile configurations checked by ``cogvx_kernels.triton.aot``
(register use, no spills, tensor-core instructions) without a GPU.

The kernels run on CUDA tensors when compiled, and on CPU tensors under ``TRITON_INTERPRET=1``
(how they are tested on machines without a GPU). Importing this package imports nothing heavy.
"""

import os


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter (TRITON_INTERPRET=1 when it was decorated):
    launchers then take their single small config instead of the per-arch tables."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        if isinstance(kernel, InterpretedFunction):
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("TRITON_INTERPRET") == "1"
