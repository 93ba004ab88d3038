"""Multi-process execution (torch.distributed; launched with torchrun).

- Inference: a `ParallelPlan` ("cfg=2,ulysses=2,ring=1") over a (cfg, ring, ulysses) DeviceMesh:
  CFG parallelism and sequence parallelism (Ulysses, ring attention) for the transformer
  (`ParallelTransformer`, `SequenceParallelAttention`), the context-parallel VAE for decode and
  encode (`vae`), put together for the pipeline by `ParallelRun`; `runtime`: process groups with
  timeouts and `FailureGuard` (a failing rank ends every rank, naming it). See docs/parallelism.md.
- Training: context parallelism for the VAE (frames split over ranks: `vae`).
"""
from .attention import LocalTokens, SequenceParallelAttention, local_rope_tables, token_split
from .plan import ParallelPlan, PlanError
from .run import ParallelRun, vae_ranks
from .transformer import ParallelTransformer

__all__ = ["LocalTokens", "ParallelPlan", "ParallelRun", "ParallelTransformer", "PlanError",
           "SequenceParallelAttention", "local_rope_tables", "token_split", "vae_ranks"]
