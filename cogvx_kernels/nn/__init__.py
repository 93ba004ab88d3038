"""Drop-in, model-agnostic modules built on the ops."""
from .attention import JointAttention
from .causal_conv3d import CausalConv3d
from .rope3d import Rope3D

__all__ = ["CausalConv3d", "JointAttention", "Rope3D"]
