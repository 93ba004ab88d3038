"""The `sdpa` backend: torch's own fused attention kernels behind an op's contract (one module per
op, like `cogvx_kernels.triton`). Used where they are the fastest path we have (fp32 attention on
CUDA, see `cogvx_kernels._registry`)."""
