"""joint_attention on torch's fused attention kernels, with the op's full contract.

Kernels: on CUDA `aten::_scaled_dot_product_efficient_attention` / `_efficient_attention_backward`
(memory-efficient attention, CUTLASS; fp32 products as 3xTF32 on tensor cores on sm_80+); on CPU
`aten::_scaled_dot_product_flash_attention_for_cpu` and its backward. They are the kernels
`F.scaled_dot_product_attention` runs for fp32, called directly because the op needs what the public
function does not give:

* the lse (fp32, natural log, (B, heads, Lq) contiguous): the CUDA kernel pads its rows to a
  multiple of 32 (padding +inf) and reads that layout back in the backward, so the backward re-pads;
* the gradient of the lse (ring attention merges blocks with it): the kernels' backward has none, so
  its term is added. d lse_i / d s_ij = p_ij with s = scale·q·kᵀ, hence
  dq_i += scale · g_i · Σ_j p_ij k_j = scale · g_i · attention(q, k, k)_i and
  dk_j += scale · Σ_i p_ij g_i q_i = scale · (Pᵀ (g∘q))_j, the dV of a backward with dO = g∘q;
* the layout: out and the gradients in (B, L, heads, D) memory (copied into it when a kernel
  returns another layout);
* determinism: the CUDA backward takes `num_splits_key=1` when asked (one block walks all key
  blocks of a (batch, head): no atomics across key splits); the CPU backward is always
  deterministic (one task per (batch, head)).
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
_LSE_ALIGN = 32  # rows of the CUDA kernel's lse are padded to a multiple of this


def _blhd(t: torch.Tensor) -> torch.Tensor:
    """t (B, heads, L, D) laid out as (B, L, heads, D) in memory: itself, or a copy in that layout."""
    if t.transpose(1, 2).is_contiguous():
        return t
    out = t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2)
    return out.copy_(t)


def _forward(q, k, v, scale):
    """(out, lse) of the device's kernel; lse (B, heads, Lq) fp32, possibly strided."""
    if q.device.type == "cuda":
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
        return out, lse[:, :, :q.shape[2]]
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)


def _backward(grad_out, q, k, v, out, lse, scale, deterministic):
    if q.device.type == "cuda":
        B, H, Lq, _ = q.shape
        padded = lse.new_full((B, H, -(-Lq // _LSE_ALIGN) * _LSE_ALIGN), float("inf"))
        padded[:, :, :Lq] = lse
        unused = torch.empty((), dtype=torch.int64)  # philox seed / offset: no dropout
        t = [x.transpose(1, 2) for x in (grad_out, q, k, v, out)]  # the kernel's (B, L, heads, D) view
        dq, dk, dv, _ = aten._efficient_attention_backward(
            *t[:4], None, t[4], None, None, Lq, k.shape[2], padded, 0.0, unused, unused, 0, False,
            scale=scale, num_splits_key=1 if deterministic else None)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, scale=scale)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out, lse): out (B, heads, Lq, D) in q's dtype, (B, Lq, heads, D) in memory; lse fp32
    (B, heads, Lq) contiguous."""
    out, lse = _forward(q, k, v, scale)
    return _blhd(out), lse.float().contiguous()


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, grad_lse: torch.Tensor | None, scale: float, deterministic: bool):
    """(dq, dk, dv) from the saved (out, lse); grad_lse (B, heads, Lq) fp32 or None (lse unused)."""
    grad_out = grad_out.to(q.dtype)
    dq, dk, dv = _backward(grad_out, q, k, v, out.to(q.dtype), lse, scale, deterministic)
    if grad_lse is not None:
        g = grad_lse.to(q.dtype).unsqueeze(-1)
        dq = dq + scale * g * _forward(q, k, k, scale)[0]
        dk = dk + scale * _backward(g * q, q, k, v, out, lse, scale, deterministic)[2]
    return _blhd(dq), _blhd(dk), _blhd(dv)


def accepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The CUDA kernel's alignment rules (16 bytes: 4 fp32 elements) for head dim, strides and
    data pointers; the CPU kernel takes any."""
    if q.device.type != "cuda":
        return None
    if q.shape[-1] % 4:
        return f"head dim D={q.shape[-1]} is not a multiple of 4 (its CUDA kernel's 16-byte alignment)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or any(s % 4 for s in t.stride()[:3]):
            return f"{name} is not 16-byte aligned (data pointer or strides {t.stride()})"
    return None
