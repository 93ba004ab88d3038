"""Public ops: argument validation, backend choice, fake impls and autograd registration."""
from .._extension import load_error
from .causal_conv3d import causal_conv3d
from .causal_conv3d import _register_native as _register_causal_conv3d

if load_error() is None:
    _register_causal_conv3d()

__all__ = ["causal_conv3d"]
