"""The raw C++ ops (torch.ops.cogvx.*, public through torch.ops) refuse arguments their kernels would
index out of bounds with: each argument mismatched in turn must raise a RuntimeError naming it
(csrc/common/checks.h, shared by the CPU and CUDA implementations). CUDA runs the same cases on a GPU."""
import pytest
import torch

import cogvx_kernels  # noqa: F401  (loads the ops)
from cogvx_kernels._extension import load_error
from cogvx_kernels.reference.rope3d import axis_tables

pytestmark = pytest.mark.skipif(load_error() is not None, reason=f"cogvx_kernels._C not loaded: {load_error()}")
ops = torch.ops.cogvx

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _call(op, good, override, device):
    """Calls `op` with the arguments of `good` (a name → value dict, in schema order), some replaced;
    tensors move to `device`."""
    args = {**good, **override}
    return op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()])


def _check(op, good, bad, device):
    _call(op, good, {}, device)  # the good arguments pass
    for override, match in bad:
        with pytest.raises(RuntimeError, match=match):
            _call(op, good, override, device)


# ---- causal_conv3d ------------------------------------------------------------------------------

def _conv_good():
    return dict(x=torch.randn(1, 4, 3, 8, 8), weight=torch.randn(6, 4, 3, 3, 3), bias=torch.randn(6),
                halo=torch.randn(1, 4, 2, 8, 8), pad_h=1, pad_w=1)


CONV_BAD = [
    (dict(bias=torch.randn(1)), r"bias must have shape \[6\]"),
    (dict(bias=torch.randn(6, 1)), r"bias must have shape \[6\]"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), r"bias must have the dtype of x"),
    (dict(halo=torch.randn(1, 4, 2, 1, 1)), r"halo must have shape \[1, 4, 2, 8, 8\]"),
    (dict(halo=torch.randn(1, 4, 1, 8, 8)), r"halo must have shape \[1, 4, 2, 8, 8\]"),
    (dict(halo=torch.randn(2, 4, 2, 8, 8)), r"halo must have shape"),
    (dict(halo=torch.randn(1, 3, 2, 8, 8)), r"halo must have shape"),
    (dict(halo=torch.randn(1, 4, 2, 8, 8).half()), r"halo must have the dtype of x"),
    (dict(x=torch.randn(4, 3, 8, 8)), r"x must have 5 dimensions"),
    (dict(weight=torch.randn(6, 4, 3, 3)), r"weight must have 5 dimensions"),
    (dict(weight=torch.randn(6, 3, 3, 3, 3)), r"weight must have C_in = 4"),
    (dict(weight=torch.randn(6, 4, 3, 3, 3).half()), r"weight must have the dtype of x"),
    (dict(weight=torch.randn(6, 4, 0, 3, 3), halo=None), r"weight must have a non-empty kernel"),
    (dict(pad_h=-1), r"pad_h and pad_w must be >= 0"),
    (dict(x=torch.randn(1, 4, 3, 2, 2), halo=None, pad_h=0), r"padded frame"),
    (dict(pad_w=2**62), r"padded frame"),  # 2·pad overflows int64
]


@pytest.mark.parametrize("device", DEVICES)
def test_causal_conv3d(device):
    _check(ops.causal_conv3d, _conv_good(), CONV_BAD, device)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_conv3d_backward(device):
    g = _conv_good()
    good = dict(grad_out=torch.randn(1, 6, 3, 8, 8), x=g["x"], weight=g["weight"], halo=g["halo"], pad_h=1, pad_w=1,
                has_bias=True)
    bad = [(o, m) for o, m in CONV_BAD if "bias" not in o and "x" not in o and "weight" not in o] + [
        (dict(grad_out=torch.randn(1, 6, 3, 6, 6)), r"grad_out must have shape \[1, 6, 3, 8, 8\]"),
        (dict(grad_out=torch.randn(1, 5, 3, 8, 8)), r"grad_out must have shape"),
        (dict(grad_out=torch.randn(1, 6, 3, 8)), r"grad_out must have shape"),
        (dict(grad_out=torch.randn(1, 6, 3, 8, 8).half()), r"grad_out must have the dtype of x"),
        (dict(weight=torch.randn(6, 3, 3, 3, 3)), r"weight must have C_in = 4"),
        (dict(x=torch.randn(1, 4, 3, 8, 8).half()), r"weight must have the dtype of x"),
    ]
    _check(ops.causal_conv3d_backward, good, bad, device)


@pytest.mark.cuda
def test_causal_conv3d_device_mismatch():
    for name in ("weight", "bias", "halo"):
        g = {k: v.cuda() if isinstance(v, torch.Tensor) and k != name else v for k, v in _conv_good().items()}
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of x"):
            ops.causal_conv3d(*g.values())


# ---- rope3d, qk_norm_rope3d ---------------------------------------------------------------------

AXES = [16, 24, 24]


def _rope_good():
    tables = axis_tables(torch.arange(2.0), torch.arange(3.0), torch.arange(4.0), AXES, 10000.0)
    return dict(x=torch.randn(1, 2, 28, 64), tables=tables, text_len=4, grid_t=2, grid_h=3, grid_w=4,
                axes_dim=AXES)


ROPE_BAD = [
    (dict(tables=torch.zeros(2, 8, 32)), r"tables must have shape \[2, 9, 32\]"),
    (dict(tables=torch.zeros(2, 9, 16)), r"tables must have shape \[2, 9, 32\]"),
    (dict(tables=torch.zeros(1, 9, 32)), r"tables must have shape"),
    (dict(tables=torch.zeros(9, 32)), r"tables must have shape"),
    (dict(tables=torch.zeros(2, 9, 32, dtype=torch.float16)), r"tables must be float32"),
    (dict(grid_w=5), r"x has L = 28 tokens but text_len \+ grid_t·grid_h·grid_w = 4 \+ 2·3·5"),
    (dict(text_len=-1, grid_w=29, grid_t=1, grid_h=1), r"text_len must be >= 0"),
    (dict(text_len=25, grid_t=-1, grid_h=-1, grid_w=3), r"grid_t, grid_h, grid_w must be >= 0"),
    (dict(grid_t=2**21, grid_h=2**21, grid_w=2**21), r"overflows int64"),
    (dict(axes_dim=[16, 48]), r"axes_dim must have 3 entries"),
    (dict(axes_dim=[16, 24, 26]), r"axes_dim must sum to the head dim D = 64"),
    (dict(axes_dim=[15, 25, 24]), r"axes_dim entries must be even"),
    (dict(axes_dim=[-2, 42, 24]), r"axes_dim entries must be even and in \[0, D = 64\]"),
    (dict(x=torch.randn(2, 28, 64)), r"x must have 4 dimensions"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True], ids=["rope3d", "rope3d_"])
def test_rope3d(device, inplace):
    op = ops.rope3d_ if inplace else ops.rope3d
    _check(op, {**_rope_good(), "inverse": False}, ROPE_BAD, device)


@pytest.mark.parametrize("device", DEVICES)
def test_rope3d_inplace_refuses_overlapping_memory(device):
    good = _rope_good()
    x = torch.randn(1, 1, 28, 64, device=device)
    before = x.clone()
    with pytest.raises(RuntimeError, match=r"x is written in place but has overlapping memory.*more than one "
                                           r"element of the written-to tensor refers to a single memory location"):
        _call(ops.rope3d_, {**good, "inverse": False}, dict(x=x.expand(1, 2, 28, 64)), device)
    assert torch.equal(x, before)
    ops.rope3d(x.expand(1, 2, 28, 64), *[a.to(device) if isinstance(a, torch.Tensor) else a
                                         for a in list(good.values())[1:]], False)  # reading an overlap is fine


def test_rope3d_triton_inplace_refuses_overlapping_memory():
    good = _rope_good()
    x = torch.randn(1, 1, 28, 64)
    with pytest.raises(RuntimeError, match=r"rope3d_triton_: x is written in place but has overlapping memory"):
        ops.rope3d_triton_(x.expand(1, 2, 28, 64), *list(good.values())[1:], False)


def _affine_bad(name):
    return [
        ({name: torch.ones(3)}, rf"{name} must have shape \[64\]"),
        ({name: torch.ones(64, 1)}, rf"{name} must have shape \[64\]"),
        ({name: torch.ones(64, dtype=torch.float64)}, rf"{name} must have x's dtype \(Float\) or float32"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_rope3d(device):
    g = _rope_good()
    good = dict(x=g.pop("x"), weight=torch.ones(64), bias=torch.zeros(64), **g, eps=1e-6)
    _check(ops.qk_norm_rope3d, good, ROPE_BAD + _affine_bad("weight") + _affine_bad("bias"), device)


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_rope3d_backward(device):
    g = _rope_good()
    x = g.pop("x")
    good = dict(grad_out=torch.randn_like(x), x=x, weight=torch.ones(64), mean=torch.zeros(1, 2, 28),
                rstd=torch.ones(1, 2, 28), **g, has_weight=True, has_bias=True)
    bad = ROPE_BAD + _affine_bad("weight") + [
        (dict(grad_out=torch.randn(1, 2, 27, 64)), r"grad_out must have shape \[1, 2, 28, 64\]"),
        (dict(grad_out=torch.randn(1, 2, 28, 64).half()), r"grad_out must have the dtype of x"),
        (dict(mean=torch.zeros(1, 2, 27)), r"mean must have shape \[1, 2, 28\]"),
        (dict(rstd=torch.ones(1, 2, 28, 1)), r"rstd must have shape \[1, 2, 28\]"),
        (dict(rstd=torch.ones(1, 2, 28).half()), r"rstd must be float32"),
        (dict(weight=None), r"has_weight is true but weight is None"),
    ]
    _check(ops.qk_norm_rope3d_backward, good, bad, device)


@pytest.mark.cuda
def test_rope3d_device_mismatch():
    g = _rope_good()
    with pytest.raises(RuntimeError, match="tables must be on the device of x"):
        ops.rope3d(g["x"].cuda(), *list(g.values())[1:], False)
    with pytest.raises(RuntimeError, match="weight must be on the device of x"):
        ops.qk_norm_rope3d(g["x"].cuda(), torch.ones(64), None, g["tables"].cuda(), *list(g.values())[2:], 1e-6)


# ---- joint_attention ----------------------------------------------------------------------------

def _attention_good():
    return dict(q=torch.randn(1, 2, 8, 64), k=torch.randn(1, 2, 9, 64), v=torch.randn(1, 2, 9, 64))


ATTENTION_BAD = [
    (dict(q=torch.randn(2, 8, 64)), r"q must have 4 dimensions"),
    (dict(k=torch.randn(1, 2, 9, 64, 1)), r"k must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 9, 64)), r"k must have q's batch, heads and head dim \(1, 2, Lk, 64\)"),
    (dict(k=torch.randn(1, 3, 9, 64)), r"k must have q's batch, heads and head dim"),
    (dict(k=torch.randn(1, 2, 9, 32)), r"k must have q's batch, heads and head dim"),
    (dict(v=torch.randn(1, 2, 10, 64)), r"v must have shape \[1, 2, 9, 64\]"),
    (dict(v=torch.randn(1, 2, 9, 32)), r"v must have shape \[1, 2, 9, 64\]"),
    (dict(k=torch.randn(1, 2, 9, 64).half()), r"k must have the dtype of q"),
    (dict(v=torch.randn(1, 2, 9, 64).half()), r"v must have the dtype of q"),
    (dict(q=torch.randn(1, 2, 8, 128)[..., ::2]), r"q must have a unit stride in its last"),
]


@pytest.mark.parametrize("device", DEVICES)
def test_joint_attention(device):
    _check(ops.joint_attention, {**_attention_good(), "scale": 0.125}, ATTENTION_BAD, device)


@pytest.mark.parametrize("device", DEVICES)
def test_joint_attention_backward(device):
    g = _attention_good()
    good = dict(grad_out=torch.randn(1, 2, 8, 64), **g, out=torch.randn(1, 2, 8, 64), lse=torch.zeros(1, 2, 8),
                grad_lse=torch.zeros(1, 2, 8), scale=0.125, deterministic=True)
    bad = ATTENTION_BAD + [
        (dict(grad_out=torch.randn(1, 2, 7, 64)), r"grad_out must have shape \[1, 2, 8, 64\]"),
        (dict(grad_out=torch.randn(1, 2, 8, 64).half()), r"grad_out must have the dtype of q"),
        (dict(grad_out=torch.randn(1, 2, 64, 8).transpose(-1, -2)), r"grad_out must have a unit stride"),
        (dict(out=torch.randn(1, 2, 8, 32)), r"out must have shape \[1, 2, 8, 64\]"),
        (dict(out=torch.randn(1, 2, 8, 64).half()), r"out must have the dtype of q"),
        (dict(lse=torch.zeros(1, 2, 7)), r"lse must have shape \[1, 2, 8\]"),
        (dict(lse=torch.zeros(1, 2, 8, 1)), r"lse must have shape \[1, 2, 8\]"),
        (dict(grad_lse=torch.zeros(1, 2, 9)), r"grad_lse must have shape \[1, 2, 8\]"),
    ]
    _check(ops.joint_attention_backward, good, bad, device)


@pytest.mark.cuda
def test_joint_attention_device_mismatch():
    g = {k: v.cuda() for k, v in _attention_good().items()}
    with pytest.raises(RuntimeError, match="v must be on the device of q"):
        ops.joint_attention(g["q"], g["k"], g["v"].cpu(), 0.125)
    out, lse = ops.joint_attention(g["q"], g["k"], g["v"], 0.125)
    with pytest.raises(RuntimeError, match="lse must be on the device of q"):
        ops.joint_attention_backward(torch.randn_like(out), g["q"], g["k"], g["v"], out, lse.cpu(), None, 0.125, True)
