"""cogvx: CogVideoX text-to-video on our own kernels (model layer; see cogvx_kernels for the ops)."""
from .models import Transformer3D, TransformerConfig

__all__ = ["Transformer3D", "TransformerConfig"]
__version__ = "0.1.0"
