"""cogvx_kernels: the op library of cogvx (reference, C++ CPU, CUDA and Triton implementations).

`import cogvx_kernels` loads the compiled `_C` library when it is built; without it every op still
works through the Triton (GPU) or reference implementations, and `python -m cogvx_kernels.info`
says what is missing.
"""
from . import nn, ops
from ._registry import available, implementations
from .ops import causal_conv3d, joint_attention, qk_norm_rope3d, rope3d

__all__ = ["causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention", "nn", "ops", "available", "implementations"]
__version__ = "0.1.0"
