"""CogVideoX's networks: the expert transformer (and, to come, the 3D causal VAE)."""
from .transformer import Transformer3D, TransformerConfig

__all__ = ["Transformer3D", "TransformerConfig"]
