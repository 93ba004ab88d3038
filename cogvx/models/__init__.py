"""CogVideoX's networks: the expert transformer and the 3D causal VAE."""
from .transformer import Transformer3D, TransformerConfig
from .vae import CausalVAE, DiagonalGaussian, VAEConfig

__all__ = ["CausalVAE", "DiagonalGaussian", "Transformer3D", "TransformerConfig", "VAEConfig"]
