"""Drop-in, model-agnostic modules built on the ops."""
from .causal_conv3d import CausalConv3d

__all__ = ["CausalConv3d"]
