"""`joint_attention`: non-causal flash attention over CogVideoX's concatenated text + video sequence.

The public function validates its arguments, picks a backend from the registry and calls it. Every
backend returns (out, lse): out (B, heads, Lq, D) laid out as (B, Lq, heads, D) in memory (what the
output projection reads after `transpose(1, 2)`, for free), lse the fp32 natural-log log-sum-exp of
each query row, so that attention over separate key blocks can be merged exactly (ring attention).

Autograd recomputes the probabilities from the saved lse (no Lq × Lk matrix is stored). The
gradient reaching `lse` (when the caller uses it) is honoured: d lse / d score = p, which enters the
backward as `delta - grad_lse`. Backward determinism follows `torch.use_deterministic_algorithms`:
when it is on, the kernels take their atomics-free path (bit-identical run to run).
"""
from __future__ import annotations

import math

import torch

from .. import _extension, _registry
from ..reference.joint_attention import joint_attention as reference_joint_attention
from ..sdpa.joint_attention import accepts as _sdpa_accepts
from ._checks import check_fp32_positive, check_like, check_tensor
from ._declare import declare

OP = "joint_attention"
LOG2E = math.log2(math.e)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    return_lse: bool = False, backend: str | None = None):
    """softmax(q·kᵀ·scale)·v for q (B, heads, Lq, D) and k, v (B, heads, Lk, D), non-causal.

    Any strides with a unit last-dim stride (the head-split view `(B, L, heads, D).transpose(1, 2)`
    is read in place). scale defaults to 1/sqrt(D); the kernels fold scale·log2(e) into fp32, so it must
    be a normal fp32 there: 8.15e-39 <= scale <= 2.36e38 (logits beyond fp32 are not checked). Returns out (B, heads, Lq, D) in q's dtype, and
    with return_lse=True also lse (B, heads, Lq) fp32 (differentiable). The GPU kernels take
    D ∈ {64, 128}; other head dims run on the reference implementation (with a one-time warning)
    unless a backend is named, which then raises.
    """
    scale = check_args(q, k, v, scale)
    impl = _registry.select(OP, backend, q.device, q.dtype, inputs=(q, k, v))
    out, lse = impl.fn(q, k, v, scale)
    return (out, lse) if return_lse else out


def check_args(q, k, v, scale) -> float:
    for name, t, doc in (("q", q, "(B, heads, Lq, D)"), ("k", k, "(B, heads, Lk, D)"), ("v", v, "(B, heads, Lk, D)")):
        check_tensor(name, t, dim=4, shape_doc=doc)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have q's batch, heads and head dim ({B}, {H}, Lk, {D}); got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} (B, heads, Lk, D); got {tuple(v.shape)}")
    if Lq == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k must hold at least one token (L >= 1); got Lq={Lq}, Lk={k.shape[2]}")
    if B == 0 or H == 0 or D == 0:
        raise ValueError(f"q must have non-zero batch, heads and head dim; got shape {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension (stride 1); got strides "
                             f"{t.stride()}: call .contiguous() on it")
    if scale is None:
        return 1.0 / math.sqrt(D)
    # every kernel multiplies the logits by scale·log2(e) in fp32 (the lse is fp32 for all dtypes)
    return check_fp32_positive("scale", scale, "the kernels fold scale·log2(e) into fp32; default 1/sqrt(D)",
                               factor=LOG2E)


# ---- declaration: schemas, fake implementations, autograd ------------------------------------

SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
                   "float scale, bool deterministic) -> (Tensor, Tensor, Tensor)")


def _blhd_like(t: torch.Tensor, L: int, dtype=None) -> torch.Tensor:
    """An empty (B, heads, L, D) tensor laid out as (B, L, heads, D) in memory (the kernels' layout)."""
    B, H, _, D = t.shape
    return t.new_empty((B, L, H, D), dtype=dtype).transpose(1, 2)


def _forward_fake(q, k, v, scale):
    B, H, Lq, _ = q.shape
    return _blhd_like(q, Lq), q.new_empty((B, H, Lq), dtype=torch.float32)


def _backward_fake(grad_out, q, k, v, out, lse, grad_lse, scale, deterministic):
    return _blhd_like(q, q.shape[2]), _blhd_like(k, k.shape[2]), _blhd_like(v, v.shape[2])


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # an unused lse output brings no gradient (None, not zeros)


def _backward(backward_op, ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    return backward_op(grad_out, q, k, v, out, lse, grad_lse, ctx.scale, torch.are_deterministic_algorithms_enabled())


# ---- registry ---------------------------------------------------------------------------------

def _head_dims(*allowed: int, max_fp32: int | None = None):
    """`accepts` check: the head dims a backend's kernels are built for (the fp32 test path of the
    CUDA kernels takes any D up to max_fp32)."""
    def accepts(q, k, v):
        D = q.shape[-1]
        if D in allowed or (max_fp32 is not None and q.dtype == torch.float32 and D <= max_fp32):
            return None
        return f"head dim D={D} is not supported (supported: {', '.join(map(str, allowed))})"
    return accepts


def _triton_accepts(q, k, v):
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch × heads = {q.shape[0] * q.shape[1]} exceeds the launch grid limit 65535"
    return _head_dims(16, 32, 64, 128)(q, k, v)


def _cuda_shared_memory(q, k, v, *, backward: bool) -> dict[str, int]:
    """Dynamic shared memory per block of the tensor-core kernels at q's head dim, as the extension
    reports it (csrc/cuda/joint_attention.h): the forward's, and the backward's (dK/dV and the
    deterministic dQ kernel: deterministic mode may change before the backward runs) when it runs.
    The fp32 test path uses no dynamic shared memory."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return {}
    table = (_extension.CUDA_SMEM or {}).get(OP, {}).get(q.shape[-1], {})
    return {kernel: need for kernel, need in table.items() if backward or kernel == "forward"}


_HALF = (torch.bfloat16, torch.float16)
declare(OP, SCHEMA, _forward_fake, backward=_backward, setup_context=_setup_context,
        backward_schema=BACKWARD_SCHEMA, backward_fake=_backward_fake, backends={
            "reference": dict(fn=reference_joint_attention, dtypes=(torch.float32, torch.float64) + _HALF),
            "cpu": dict(dtypes=(torch.float32,) + _HALF),  # any head dim; no atomics
            # fp32: the one-warp-per-row CUDA-core test path, run only when backend="cuda" is named
            "cuda": dict(dtypes=_HALF, dtypes_on_request=(torch.float32,), accepts=_head_dims(64, 128, max_fp32=256),
                         shared_memory=_cuda_shared_memory, deterministic="on request"),
            # the fp32 path on CUDA (see _registry's docstring for why)
            "sdpa": dict(kernels=(".sdpa.joint_attention", "forward", "backward"), dtypes=(torch.float32,),
                         accepts=_sdpa_accepts, deterministic="on request"),
            # fp32 dots use TF32 on GPUs only when torch.backends.cuda.matmul.allow_tf32 is set; the
            # backward is always the deterministic one
            "triton": dict(kernels=(".triton.joint_attention", "forward", "backward"), dtypes=_HALF + (torch.float32,),
                           accepts=_triton_accepts),
        })
