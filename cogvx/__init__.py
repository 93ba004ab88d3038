"""cogvx: CogVideoX text-to-video on our own kernels (model layer; see cogvx_kernels for the ops)."""
__version__ = "0.1.0"
