"""cogvx: CogVideoX text-to-video on our own kernels (model layer; see cogvx_kernels for the ops)."""
from .models import CausalVAE, Transformer3D, TransformerConfig, VAEConfig

__all__ = ["CausalVAE", "Transformer3D", "TransformerConfig", "VAEConfig"]
__version__ = "0.1.0"
