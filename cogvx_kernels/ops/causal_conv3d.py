"""`causal_conv3d`: the temporally causal 3D convolution of CogVideoX's VAE.

The public function validates its arguments, picks a backend from the registry and calls it. The
C++ op `cogvx::causal_conv3d` (CPU and CUDA kernels) and the Python custom op
`cogvx::causal_conv3d_triton` are declared here once (`_declare.declare`): fake implementation and
autograd (a `*_backward` op).
"""
from __future__ import annotations

import torch

from .. import _registry
from ..reference.causal_conv3d import causal_conv3d as reference_causal_conv3d
from ._checks import check_like, check_nonempty, check_shape, check_tensor, is_int
from ._declare import declare

OP = "causal_conv3d"


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  halo: torch.Tensor | None = None, *, padding: tuple[int, int] | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Causal 3D convolution, stride 1.

    x: (B, C_in, T, H, W). weight: (C_out, C_in, kt, kh, kw). bias: (C_out,) or None.
    halo: the kt-1 frames preceding x, (B, C_in, kt-1, H, W); None at the start of a video, where the
    first frame is repeated kt-1 times. padding: zero spatial padding (ph, pw), default (kh//2, kw//2).
    Returns (B, C_out, T, H + 2ph - kh + 1, W + 2pw - kw + 1); output frame t depends only on input
    frames <= t (and the halo). Under torch.autocast the floating inputs are cast to its dtype first.
    """
    if (isinstance(x, torch.Tensor) and torch.amp.is_autocast_available(x.device.type)  # not on meta
            and torch.is_autocast_enabled(x.device.type)):  # as torch's convs
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, halo = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, weight, bias, halo))
    pad_h, pad_w = check_args(x, weight, bias, halo, padding)
    impl = _registry.select(OP, backend, x.device, x.dtype)
    return impl.fn(x, weight, bias, halo, pad_h, pad_w)


def check_args(x, weight, bias, halo, padding) -> tuple[int, int]:
    check_tensor("x", x, dim=5, shape_doc="(B, C_in, T, H, W)")
    check_tensor("weight", weight, dim=5, shape_doc="(C_out, C_in, kt, kh, kw)")
    check_like("weight", weight, "x", x)
    check_nonempty("x", x)
    check_nonempty("weight", weight)
    B, C_in, T, H, W = x.shape
    C_out, w_in, kt, kh, kw = weight.shape
    if w_in != C_in:
        raise ValueError(f"weight must have C_in={C_in} input channels like x (B, C_in, T, H, W); "
                         f"got weight of shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        check_like("bias", bias, "x", x)
        check_shape("bias", bias, (C_out,), "(C_out,)")
    if halo is not None:
        check_tensor("halo", halo)
        check_like("halo", halo, "x", x)
        check_shape("halo", halo, (B, C_in, kt - 1, H, W), "(B, C_in, kt-1, H, W): the kt-1 frames before x")
    if padding is None:
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"weight has an even spatial extent (kh={kh}, kw={kw}): the default padding "
                             "(kh//2, kw//2) would not keep H and W; pass padding=(ph, pw) explicitly")
        pad_h, pad_w = kh // 2, kw // 2
    else:
        if (not isinstance(padding, (tuple, list)) or len(padding) != 2
                or not all(is_int(p) and p >= 0 for p in padding)):
            raise ValueError(f"padding must be a pair of non-negative ints (ph, pw); got {padding!r}")
        pad_h, pad_w = padding
    if H + 2 * pad_h < kh or W + 2 * pad_w < kw:
        raise ValueError(f"the padded frame ({H + 2 * pad_h}×{W + 2 * pad_w}) is smaller than the kernel "
                         f"({kh}×{kw}); x has H={H}, W={W}, padding=({pad_h}, {pad_w})")
    return pad_h, pad_w


# ---- declaration -------------------------------------------------------------------------------

SCHEMA = "(Tensor x, Tensor weight, Tensor? bias, Tensor? halo, SymInt pad_h, SymInt pad_w) -> Tensor"
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor weight, Tensor? halo, SymInt pad_h, SymInt pad_w, "
                   "bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)")


def _forward_fake(x, weight, bias, halo, pad_h, pad_w):
    B, _, T, H, W = x.shape
    C_out, _, _, kh, kw = weight.shape
    return x.new_empty((B, C_out, T, H + 2 * pad_h - kh + 1, W + 2 * pad_w - kw + 1))


def _backward_fake(grad_out, x, weight, halo, pad_h, pad_w, has_bias):
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    grad_halo = torch.empty_like(halo, memory_format=torch.contiguous_format) if halo is not None else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format), grad_bias, grad_halo)


def _setup_context(ctx, inputs, output):
    x, weight, bias, halo, pad_h, pad_w = inputs
    ctx.save_for_backward(x, weight, halo)
    ctx.pads = (pad_h, pad_w)
    ctx.has_bias = bias is not None


def _backward(backward_op, ctx, grad_out):
    x, weight, halo = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_halo = backward_op(grad_out.contiguous(), x, weight, halo, *ctx.pads,
                                                            ctx.has_bias)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, grad_halo if halo is not None else None


# Every backward here is deterministic (no atomics; fixed split-K reduction order on CUDA). The CUDA
# kernels use static shared memory only (<= 48 KiB, fits every GPU): nothing to check per device
# beyond the build's archs.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
declare(OP, SCHEMA, _forward_fake, backward=_backward, setup_context=_setup_context,
        backward_schema=BACKWARD_SCHEMA, backward_fake=_backward_fake, backends={
            "reference": dict(fn=reference_causal_conv3d, dtypes=_DTYPES + (torch.float64,)),
            "cpu": dict(dtypes=_DTYPES),
            "cuda": dict(dtypes=_DTYPES),
            "triton": dict(kernels=(".triton.causal_conv3d", "forward", "backward"), dtypes=_DTYPES),
        })
