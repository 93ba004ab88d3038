"""Public ops: argument validation, backend choice, and their declaration (`_declare`): fake impls,
autograd, the Triton custom ops and the registry entries."""
from .causal_conv3d import causal_conv3d
from .joint_attention import joint_attention
from .rope3d import qk_norm_rope3d, rope3d

__all__ = ["causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention"]
