"""Public ops: argument validation, backend choice, fake impls and autograd registration."""
from .._extension import load_error
from . import causal_conv3d as _causal_conv3d
from . import joint_attention as _joint_attention
from . import rope3d as _rope3d
from .causal_conv3d import causal_conv3d
from .joint_attention import joint_attention
from .rope3d import qk_norm_rope3d, rope3d

if load_error() is None:
    _causal_conv3d._register_native()
    _rope3d._register_native()
    _joint_attention._register_native()

__all__ = ["causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention"]
