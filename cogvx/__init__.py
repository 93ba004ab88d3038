"""cogvx: CogVideoX text-to-video on our own kernels (model layer; see cogvx_kernels for the ops)."""
from .models import CausalVAE, Transformer3D, TransformerConfig, VAEConfig
from .pipeline import Pipeline, PipelineOutput  # cheap: T5 (transformers) is imported only when loaded
from .schedulers import DDIMScheduler, DPMScheduler

__all__ = ["CausalVAE", "DDIMScheduler", "DPMScheduler", "Pipeline", "PipelineOutput", "Transformer3D",
           "TransformerConfig", "VAEConfig"]
__version__ = "0.1.0"
