"""Plain-PyTorch reference implementations: readable, and the ground truth of every parity test."""
from .causal_conv3d import causal_conv3d
from .joint_attention import joint_attention

__all__ = ["causal_conv3d", "joint_attention"]
