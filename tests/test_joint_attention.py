"""joint_attention: every registered backend against fp64 SDPA (math backend) forward and backward,
the LSE against torch.logsumexp (and its gradient), huge fp16 logits, determinism, custom-op checks,
torch.compile, head-dim fallback and bad input."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cogvx_kernels
from cogvx_kernels import _registry
from parity import assert_close, backend_params, implementation, tolerance

OP = "joint_attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, heads, Lq, Lk, D): L ∈ {1, 17, 64, 65, 200, 226+3·4·6 = 298}, Lq ≠ Lk both ways, D ∈ {64, 128}
CASES = [
    (1, 1, 1, 1, 64),
    (2, 3, 17, 17, 64),
    (1, 3, 64, 64, 128),
    (2, 1, 65, 65, 64),
    (1, 3, 200, 200, 64),
    (2, 3, 298, 298, 64),
    (1, 3, 37, 90, 64),
    (2, 1, 90, 37, 128),
    (1, 2, 200, 65, 128),
    (2, 3, 1, 64, 64),
    (1, 1, 298, 298, 128),
]
# Triton under the interpreter is slow: the cases it runs (CPU kernels and GPUs run all)
INTERPRETED_CASES = (0, 1, 2, 3, 6, 7, 8, 9, 10)


def make_inputs(case, dtype, device, *, strided=True, logit_scale=1.0, seed=0):
    """q, k, v in the head-split layout the model produces ((B, L, heads, D) memory viewed as
    (B, heads, L, D)) when `strided`, else contiguous."""
    B, H, Lq, Lk, D = case
    g = torch.Generator().manual_seed(seed)

    def rand(L, scale=1.0):
        t = torch.randn(B, L, H, D, generator=g) * scale
        t = t.transpose(1, 2) if strided else t.transpose(1, 2).contiguous()
        return t.to(device=device, dtype=dtype)

    return rand(Lq, logit_scale), rand(Lk), rand(Lk)


def sdpa_fp64(q, k, v, scale):
    """Ground truth: SDPA's math backend in fp64 on the same (rounded) inputs, and its LSE."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return q, k, v, out, lse


def grad_tol(tol, dtype):
    atol, rtol = tol
    return (max(2 * atol, 2e-5), max(2 * rtol, 2e-5)) if dtype == torch.float32 else (2 * atol, 2 * rtol)


def _skip_slow_interpreted(backend, device, case):
    if backend == "triton" and device == "cpu" and case not in INTERPRETED_CASES:
        pytest.skip("interpreted Triton runs the cases in INTERPRETED_CASES (all run on a GPU)")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend,device,dtype", backend_params(OP, DTYPES))
def test_parity_forward_backward(backend, device, case, dtype):
    _skip_slow_interpreted(backend, device, case)
    impl = implementation(OP, backend, device)
    q, k, v = (t.requires_grad_() for t in make_inputs(CASES[case], dtype, device))
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = cogvx_kernels.joint_attention(q, k, v, return_lse=True, backend=backend)
    rq, rk, rv, ref_out, ref_lse = sdpa_fp64(q, k, v, scale)

    tol = tolerance(OP, backend, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == q.shape[:3]
    assert_close(out.cpu(), ref_out.detach(), tol, f"{backend} out")
    assert_close(lse.cpu(), ref_lse.detach(), (1e-5, 1e-5), f"{backend} lse")

    # a loss that uses both outputs: the LSE gradient enters the backward as delta - grad_lse
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    grad_lse = torch.randn(lse.shape, generator=g).to(device)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    torch.autograd.backward((ref_out, ref_lse), (grad_out.cpu().double(), grad_lse.cpu().double()))
    for name, t, r in (("dq", q, rq), ("dk", k, rk), ("dv", v, rv)):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_close(t.grad.cpu(), r.grad, grad_tol(tol, dtype), f"{backend} {name}")


@pytest.mark.parametrize("backend,device,dtype", backend_params(OP, (torch.float16, torch.bfloat16)))
def test_large_logits_stay_finite(backend, device, dtype):
    """CogVideoX-5B in fp16 overflows eager attention; scores ×30 must stay finite and correct."""
    implementation(OP, backend, device)
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 2, 65, 90, 64), dtype, device, logit_scale=30.0))
    out = cogvx_kernels.joint_attention(q, k, v, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{backend} {name} has NaN/inf with ×30 logits in {dtype}"
    rq, rk, rv, ref_out, _ = sdpa_fp64(q, k, v, 1 / 8)
    ref_out.backward(grad_out.cpu().double())
    assert_close(out.detach().cpu(), ref_out.detach(), tolerance(OP, backend, dtype), f"{backend} out ×30")
    # near one-hot softmax: dq/dk are sums of large, nearly cancelling terms; scale-relative check
    for name, t, r in (("dv", v, rv), ("dq", q, rq), ("dk", k, rk)):
        assert_close(t.grad.cpu(), r.grad, grad_tol(tolerance(OP, backend, dtype), dtype), f"{backend} {name} ×30")


def test_eager_fp16_attention_overflows_where_ours_does_not():
    """The failure the kernels avoid: fp16 scores materialised in fp16 overflow to inf."""
    q, k, v = make_inputs((1, 1, 17, 17, 64), torch.float16, "cpu", logit_scale=10000.0)
    eager = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8, dim=-1) @ v
    assert not torch.isfinite(eager).all()
    assert torch.isfinite(cogvx_kernels.joint_attention(q, k, v, backend="cpu")).all()


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_output_and_grad_layout(backend, device):
    """out and the grads are laid out (B, L, heads, D): the output projection reads them without a copy."""
    implementation(OP, backend, device)
    q, k, v = (t.requires_grad_() for t in make_inputs((2, 3, 17, 9, 64), torch.float32, device, strided=False))
    out = cogvx_kernels.joint_attention(q, k, v, backend=backend)
    assert out.transpose(1, 2).is_contiguous()
    for grad in torch.autograd.grad(out.sum(), (q, k, v)):  # (leaves' .grad would be re-laid out)
        assert grad.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_deterministic_backward_is_bit_identical(backend, device):
    impl = implementation(OP, backend, device)
    dtype = torch.bfloat16 if torch.bfloat16 in impl.all_dtypes else impl.dtypes[0]
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 2, 65, 65, 64), dtype, device))
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            out = cogvx_kernels.joint_attention(q, k, v, backend=backend)
            grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_split_keys_merge_exactly_with_lse():
    """Attention over two key blocks merged with their LSEs equals attention over all keys (what
    ring attention relies on)."""
    q, k, v = make_inputs((1, 2, 40, 100, 64), torch.float32, "cpu")
    full = cogvx_kernels.joint_attention(q, k, v, backend="cpu")
    parts = [cogvx_kernels.joint_attention(q, k[:, :, s], v[:, :, s], return_lse=True, backend="cpu")
             for s in (slice(0, 37), slice(37, 100))]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    merged = sum(o * torch.exp(l - lse).unsqueeze(-1) for o, l in parts)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)


# ---- custom-op checks and compile ---------------------------------------------------------------

def _opcheck_args(device, dtype=torch.float32):
    q, k, v = make_inputs((1, 2, 17, 21, 64), dtype, device)
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 0.125]


def test_opcheck_native_cpu():
    args = _opcheck_args("cpu")
    torch.library.opcheck(torch.ops.cogvx.joint_attention.default, args)
    q, k, v, scale = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.cogvx.joint_attention(q, k, v, scale)
    for grad_lse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.cogvx.joint_attention_backward.default,
                              [torch.randn_like(out), q, k, v, out, lse, grad_lse, scale, True])


def test_opcheck_triton_interpreted():
    if not _registry.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.cogvx.joint_attention_triton.default, _opcheck_args("cpu"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_static"))


@pytest.mark.cuda
def test_opcheck_cuda():
    for dtype in (torch.bfloat16, torch.float32):
        args = _opcheck_args("cuda", dtype)
        torch.library.opcheck(torch.ops.cogvx.joint_attention.default, args)
        torch.library.opcheck(torch.ops.cogvx.joint_attention_triton.default, args)


def test_torch_compile_fullgraph():
    """The op traces under torch.compile without graph breaks, forward and backward, LSE included."""
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 2, 17, 17, 64), torch.float32, "cpu"))

    def step(q, k, v):
        out, lse = cogvx_kernels.joint_attention(q, k, v, return_lse=True)
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = step(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ---- backend choice and head dims ---------------------------------------------------------------

def test_automatic_choice_on_cpu_is_the_cpp_kernel():
    q, k, v = make_inputs(CASES[1], torch.float32, "cpu")
    assert _registry.select(OP, None, q.device, q.dtype, inputs=(q, k, v)).backend == "cpu"


def test_unsupported_head_dim_falls_back_to_reference_with_a_warning(monkeypatch):
    """A GPU backend that lacks the head dim is skipped (warned once) rather than failing."""
    q, k, v = make_inputs((1, 1, 9, 9, 48), torch.bfloat16, "cpu")
    triton_impl = {i.backend: i for i in _registry.implementations(OP)}["triton"]
    assert "D=48" in triton_impl.accepts(q, k, v)
    _registry.warn_once.cache_clear()
    monkeypatch.setattr(_registry, "_REGISTRY", {OP: {b: i for b, i in _registry._REGISTRY[OP].items()
                                                       if b in ("triton", "reference")}})
    monkeypatch.setattr(_registry, "triton_interpreted", lambda: False)
    with pytest.warns(RuntimeWarning, match="falls back to the slow reference"):
        out = cogvx_kernels.joint_attention(q, k, v)
    torch.testing.assert_close(out, cogvx_kernels.reference.joint_attention(q, k, v, 48 ** -0.5)[0])


def test_named_backend_without_the_head_dim_raises():
    if not _registry.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    q, k, v = make_inputs((1, 1, 9, 9, 48), torch.float16, "cpu")
    with pytest.raises(ValueError, match="head dim D=48 is not supported"):
        cogvx_kernels.joint_attention(q, k, v, backend="triton")


def test_cpu_kernel_takes_odd_head_dims():
    q, k, v = make_inputs((1, 2, 30, 41, 40), torch.float32, "cpu")
    out, lse = cogvx_kernels.joint_attention(q, k, v, return_lse=True, backend="cpu")
    ref_out, ref_lse = cogvx_kernels.reference.joint_attention(q, k, v, 40 ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_custom_scale():
    q, k, v = make_inputs((1, 2, 30, 41, 64), torch.float32, "cpu")
    out = cogvx_kernels.joint_attention(q, k, v, scale=0.3)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    return dict(zip("qkv", make_inputs((1, 2, 8, 9, 64), torch.float32, "cpu")))


BAD_INPUTS = [
    ("q 3-D", dict(q=torch.randn(2, 8, 64)), ValueError, "q must have 4 dimensions"),
    ("k heads", dict(k=torch.randn(1, 3, 9, 64)), ValueError, "k must have q's batch, heads and head dim"),
    ("k batch", dict(k=torch.randn(2, 2, 9, 64)), ValueError, "k must have q's batch"),
    ("k head dim", dict(k=torch.randn(1, 2, 9, 32)), ValueError, "k must have q's batch, heads and head dim"),
    ("v length", dict(v=torch.randn(1, 2, 10, 64)), ValueError, "v must have the shape of k"),
    ("k dtype", dict(k=torch.randn(1, 2, 9, 64, dtype=torch.float16)), TypeError, "k must have the dtype of q"),
    ("int q", dict(q=torch.ones(1, 2, 8, 64, dtype=torch.int32)), TypeError, "q must be a floating tensor"),
    ("not a tensor", dict(v=[1.0]), TypeError, "v must be a torch.Tensor"),
    ("L=0 q", dict(q=torch.randn(1, 2, 0, 64)), ValueError, "at least one token"),
    ("L=0 kv", dict(k=torch.randn(1, 2, 0, 64), v=torch.randn(1, 2, 0, 64)), ValueError, "at least one token"),
    ("q last dim strided", dict(q=torch.randn(1, 2, 8, 128)[..., ::2]), ValueError,
     "q must have a contiguous last"),
    ("v last dim strided", dict(v=torch.randn(1, 2, 64, 9).transpose(-1, -2)), ValueError,
     "v must have a contiguous last"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, override, exc, match):
    args = {**_good(), **override}
    with pytest.raises(exc, match=match):
        cogvx_kernels.joint_attention(args["q"], args["k"], args["v"])


# the kernels multiply the logits by scale·log2(e) in fp32: it must be a normal positive fp32
# (1e300 passed the old finiteness check, became inf in fp32 and returned NaN)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.1", True, 1e300, 2.4e38, 1e-300, 8e-39],
                         ids=str)
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be a positive finite float in \[8.15e-39, 2.36e\+38\] "
                                         r"\(the kernels fold scale·log2\(e\) into fp32"):
        cogvx_kernels.joint_attention(**_good(), scale=scale)


@pytest.mark.parametrize("scale", [8.2e-39, 2.35e38], ids=str)
@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + backend_params(OP))
def test_scale_bounds_give_finite_results(backend, device, scale):
    """The accepted range is not too wide: at its ends the output and lse stay finite (logits of
    |q·k| <= 1 here: beyond the bound, scale·log2(e) itself is inf or 0 in fp32)."""
    implementation(OP, backend, device)
    q, k, v = (torch.rand(1, 2, 16, 64, generator=torch.Generator().manual_seed(i)).to(device) / 8 for i in range(3))
    out, lse = cogvx_kernels.joint_attention(q, k, v, scale=scale, return_lse=True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_device_mismatch():
    args = _good()
    args["k"] = args["k"].to("meta")
    with pytest.raises(ValueError, match="k must be on the device of q"):
        cogvx_kernels.joint_attention(**args)


@pytest.mark.parametrize("backend", ["cuda", "magic"], ids=["gpu-backend-for-cpu-tensors", "unknown-name"])
def test_unavailable_backend(backend):
    with pytest.raises(ValueError, match="backend"):
        cogvx_kernels.joint_attention(**_good(), backend=backend)


def test_no_warnings_on_the_normal_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cogvx_kernels.joint_attention(**_good())
