"""causal_conv3d: every backend against the reference (forward and backward, fp32/bf16/fp16),
causality, strided inputs, custom-op checks, torch.compile, backend choice and bad input."""
import os
import re
import subprocess
import sys

import pytest
import torch

import cogvx_kernels
from cogvx_kernels import _registry
from cogvx_kernels.reference.causal_conv3d import causal_conv3d as reference
from parity import assert_close, backend_params, implementation, tolerance

OP = "causal_conv3d"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, C_in, C_out, T, H, W, kernel, padding, halo, layout)
CASES = [
    (2, 5, 6, 4, 7, 9, (3, 3, 3), None, False, "contiguous"),
    (2, 5, 6, 4, 7, 9, (3, 3, 3), None, True, "contiguous"),
    (1, 3, 4, 1, 5, 5, (3, 3, 3), None, False, "contiguous"),   # T=1
    (1, 3, 4, 1, 5, 5, (3, 3, 3), None, True, "contiguous"),    # T < kt-1
    (1, 5, 6, 4, 7, 9, (3, 3, 3), None, True, "channels_last"),
    (1, 5, 6, 3, 7, 9, (3, 3, 3), None, False, "time_slice"),
    (1, 8, 8, 3, 6, 10, (1, 1, 1), None, False, "contiguous"),
    (2, 4, 3, 5, 6, 5, (3, 1, 1), None, True, "contiguous"),
    (1, 6, 5, 3, 5, 7, (1, 3, 3), None, False, "contiguous"),
    (1, 4, 4, 3, 5, 6, (2, 3, 3), None, True, "contiguous"),
    (1, 3, 4, 2, 6, 6, (3, 3, 3), (0, 0), True, "contiguous"),  # valid spatial conv
    (1, 2, 3, 2, 5, 8, (3, 5, 3), (2, 1), False, "contiguous"),
    (1, 16, 24, 3, 12, 20, (3, 3, 3), None, True, "contiguous"),
    (1, 32, 48, 2, 13, 30, (3, 3, 3), None, True, "contiguous"),
    # few pixels for many channels: the CPU kernel's direct path (not Winograd) with its brgemm
    # products (not the small-product loop)
    (1, 128, 96, 1, 6, 9, (3, 3, 3), None, False, "contiguous"),
    (1, 64, 48, 2, 16, 24, (2, 1, 1), None, True, "contiguous"),  # 1×1 spatial
    # the CPU forward's Winograd path (3×3 spatial, ≥ 16 channels, B·T·H·W ≥ 2·channels): first
    # frames without a halo
    # (summed tap transforms), odd extents ending mid-tile, two tile-column blocks, kt 1 and 2,
    # uneven padding, strided layouts
    (2, 16, 16, 2, 9, 11, (3, 3, 3), None, False, "contiguous"),
    (1, 16, 20, 1, 5, 9, (3, 3, 3), None, False, "contiguous"),
    (1, 16, 17, 3, 7, 133, (3, 3, 3), None, True, "channels_last"),
    (1, 20, 16, 3, 8, 9, (1, 3, 3), None, False, "time_slice"),
    (1, 16, 16, 4, 6, 7, (2, 3, 3), (0, 2), True, "contiguous"),
    # the CPU forward's oneDNN route (fp32): many channels on few pixels, the RGB stem, and narrow
    # layers (≤ 32 channels; (2, 16, 16, ...) above without a halo, this one with)
    (1, 512, 256, 2, 4, 5, (3, 3, 3), None, True, "time_slice"),
    (1, 3, 64, 3, 6, 7, (3, 3, 3), None, False, "channels_last"),
    (2, 32, 24, 3, 6, 7, (3, 3, 3), None, True, "channels_last"),
    # one clip that ATen would run on its im2col path in the (T, H, W) order (C·(T + 2)·H ≤ 20480):
    # the oneDNN route runs it over reordered axes (W, H, T here), forward and backward
    (1, 16, 8, 2, 36, 44, (3, 3, 3), None, True, "channels_last"),
    (1, 16, 16, 3, 40, 40, (3, 3, 3), None, False, "contiguous"),
]
# The Triton interpreter is slow: a subset still covering halo, T<kt-1, strides and odd sizes.
INTERPRETED_CASES = [0, 1, 3, 4, 5, 9]


def make_inputs(case, dtype, device, seed=0):
    B, C_in, C_out, T, H, W, k, padding, halo, layout = case
    g = torch.Generator().manual_seed(seed)
    t_total = T + 2 if layout == "time_slice" else T
    x = torch.randn(B, C_in, t_total, H, W, generator=g)
    w = torch.randn(C_out, C_in, *k, generator=g) / (C_in * k[0] * k[1] * k[2]) ** 0.5
    b = torch.randn(C_out, generator=g)
    h = torch.randn(B, C_in, k[0] - 1, H, W, generator=g) if halo else None
    x, w, b = (t.to(device=device, dtype=dtype) for t in (x, w, b))
    h = h.to(device=device, dtype=dtype) if h is not None else None
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "time_slice":
        x = x[:, :, 1:1 + T]
    return x, w, b, h, padding


def grads(y, inputs, grad_out):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(y, wanted, grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_parity_with_reference(backend, device, case, dtype):
    impl = implementation(OP, backend, device)
    if backend == "triton" and device == "cpu" and case not in INTERPRETED_CASES:
        pytest.skip("interpreted Triton runs a subset of the shape matrix (it is slow on CPU)")
    x, w, b, h, padding = make_inputs(CASES[case], dtype, device)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, h)]
    y = cogvx_kernels.causal_conv3d(*leaves, padding=padding, backend=backend)
    assert y.dtype == dtype and y.device.type == device

    # the reference in fp32 on the same (rounded) inputs
    ref_leaves = [t.detach().float().requires_grad_() if t is not None else None for t in (x, w, b, h)]
    pad = padding or (w.shape[3] // 2, w.shape[4] // 2)
    y_ref = reference(*ref_leaves, *pad)
    tol = tolerance(OP, backend, dtype)
    assert_close(y, y_ref, tol, f"{backend} forward")

    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    got = grads(y, leaves, grad_out)
    want = grads(y_ref, ref_leaves, grad_out.float())
    for name, a, e in zip(["x", "weight", "bias", "halo"], got, want):
        assert a.dtype == dtype
        assert_close(a, e, tol, f"{backend} grad {name}")


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_causality(backend, device):
    """Perturbing input frame s changes no output frame t < s."""
    implementation(OP, backend, device)
    x, w, b, _, _ = make_inputs(CASES[0], torch.float32, device)
    y = cogvx_kernels.causal_conv3d(x, w, b, backend=backend)
    for s in range(1, x.shape[2]):
        x2 = x.clone()
        x2[:, :, s] += 10.0
        y2 = cogvx_kernels.causal_conv3d(x2, w, b, backend=backend)
        assert torch.equal(y2[:, :, :s], y[:, :, :s]), f"frame {s} leaked into earlier outputs"
        assert not torch.equal(y2[:, :, s], y[:, :, s])


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_halo_equals_whole_video(backend, device):
    """Convolving the second half with the last kt-1 frames of the first as halo equals the whole."""
    implementation(OP, backend, device)
    x, w, b, _, _ = make_inputs(CASES[0], torch.float32, device)
    whole = cogvx_kernels.causal_conv3d(x, w, b, backend=backend)
    first = cogvx_kernels.causal_conv3d(x[:, :, :2], w, b, backend=backend)
    second = cogvx_kernels.causal_conv3d(x[:, :, 2:], w, b, halo=x[:, :, :2], backend=backend)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, atol=1e-5, rtol=1e-5)


def test_input_not_modified_and_output_contiguous():
    x, w, b, h, _ = make_inputs(CASES[1], torch.float32, "cpu")
    x0, h0 = x.clone(), h.clone()
    y = cogvx_kernels.causal_conv3d(x, w, b, h, backend="cpu")
    assert torch.equal(x, x0) and torch.equal(h, h0)
    assert y.is_contiguous()


# ---- custom-op machinery ----------------------------------------------------------------------

def opcheck_samples(device, dtype=torch.float32):
    for case in (0, 1, 9):
        x, w, b, h, padding = make_inputs(CASES[case], dtype, device)
        pad = padding or (w.shape[3] // 2, w.shape[4] // 2)
        yield [t.requires_grad_() if t is not None else None for t in (x, w, b, h)] + list(pad)


def test_opcheck_native_cpu():
    for args in opcheck_samples("cpu"):
        torch.library.opcheck(torch.ops.cogvx.causal_conv3d.default, args)
        y = torch.ops.cogvx.causal_conv3d(*args)
        x, w, b, h, ph, pw = args
        torch.library.opcheck(torch.ops.cogvx.causal_conv3d_backward.default,
                              [torch.randn_like(y), x.detach(), w.detach(), None if h is None else h.detach(),
                               ph, pw, b is not None])


def test_opcheck_triton_interpreted():
    if not _registry.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    args = next(opcheck_samples("cpu"))
    # test_aot_dispatch_dynamic re-traces with dynamic shapes; the interpreter is slow, the static
    # checks (schema, fake tensor, autograd registration, aot dispatch) are what matter here.
    torch.library.opcheck(torch.ops.cogvx.causal_conv3d_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_static"))


@pytest.mark.cuda
def test_opcheck_cuda():
    for args in opcheck_samples("cuda"):
        torch.library.opcheck(torch.ops.cogvx.causal_conv3d.default, args)
        torch.library.opcheck(torch.ops.cogvx.causal_conv3d_triton.default, args)


def test_torch_compile_fullgraph():
    """The op traces under torch.compile without graph breaks, forward and backward."""
    conv = cogvx_kernels.nn.CausalConv3d(4, 6, 3, backend="cpu")
    x = torch.randn(1, 4, 3, 6, 6, requires_grad=True)

    def step(x):
        y, cache = conv(x)
        return torch.nn.functional.silu(y).sum() + cache.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, x)
    ref_out = step(x)
    (ref_gx,) = torch.autograd.grad(ref_out, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)


def test_a_narrow_clip_runs_on_onednn_not_atens_im2col_path():
    """ATen runs a batch-1 conv3d whose C·D·H is at most 20480 on its im2col path (6–11× oneDNN's
    time at a 16-channel 17×64×64 layer; its rule leaves the last extent out). The CPU kernel's fp32
    oneDNN route reorders the spatial axes so that oneDNN takes it, forward and backward: 16·5·40
    in the (T, H, W) order, 16·40·40 in (H, W, T)."""
    x = torch.randn(1, 16, 3, 40, 40, requires_grad=True)
    w = (torch.randn(16, 16, 3, 3, 3) / 20).requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cogvx_kernels.causal_conv3d(x, w, backend="cpu").sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::mkldnn_convolution" in names
    assert not [n for n in names if "slow_conv3d" in n], sorted(names)


# ---- backend choice -----------------------------------------------------------------------------

def test_automatic_choice_on_cpu_is_the_cpp_kernel():
    impl = _registry.select(OP, None, torch.device("cpu"), torch.float32)
    assert impl.backend == "cpu"


def test_unknown_backend_raises():
    x, w, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        cogvx_kernels.causal_conv3d(x, w, backend="magic")


@pytest.mark.parametrize("backend", ["", " cpu", "CPU", 1, ("cpu",)], ids=repr)
def test_backend_must_be_a_backend_name(backend, monkeypatch):
    """An explicit backend="" is not a backend (None asks for the automatic choice), nor a name of
    another spelling or type; the error lists the backends."""
    monkeypatch.delenv("COGVX_BACKEND", raising=False)
    x, w, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    names = ", ".join(_registry.BACKENDS)  # cuda, cpu, sdpa, triton, reference
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of {names} (or None for the automatic "
                                                   f"choice); backend is {backend!r}")):
        cogvx_kernels.causal_conv3d(x, w, backend=backend)


@pytest.mark.parametrize("op", ["causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention"])
def test_every_op_resolves_backend_names_alike(op, monkeypatch):
    monkeypatch.delenv("COGVX_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        _registry.select(op, "", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("COGVX_BACKEND", "")  # empty: unset, the automatic choice
    assert _registry.select(op, None, torch.device("cpu"), torch.float32).backend == "cpu"
    monkeypatch.setenv("COGVX_BACKEND", "reference")
    assert _registry.select(op, None, torch.device("cpu"), torch.float32).backend == "reference"
    assert _registry.select(op, "cpu", torch.device("cpu"), torch.float32).backend == "cpu"  # the argument wins


def test_empty_environment_backend_means_automatic(monkeypatch):
    monkeypatch.setenv("COGVX_BACKEND", "")
    x, w, b, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    torch.testing.assert_close(cogvx_kernels.causal_conv3d(x, w, b), reference(x, w, b), atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("COGVX_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of .*; the COGVX_BACKEND environment variable is 'nope'"):
        cogvx_kernels.causal_conv3d(x, w)


def test_unavailable_backend_names_the_available_ones():
    x, w, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available.*Available: .*cpu"):
        cogvx_kernels.causal_conv3d(x, w, backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        cogvx_kernels.causal_conv3d(x, w, backend="triton")


def test_environment_override(monkeypatch):
    x, w, b, *_ = make_inputs(CASES[0], torch.float32, "cpu")
    monkeypatch.setenv("COGVX_BACKEND", "reference")
    assert _registry.select(OP, None, x.device, x.dtype).backend == "reference"
    torch.testing.assert_close(cogvx_kernels.causal_conv3d(x, w, b), reference(x, w, b))
    monkeypatch.setenv("COGVX_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        cogvx_kernels.causal_conv3d(x, w)


def test_import_without_extension_falls_back_to_reference():
    """With `_C` missing the package still imports, runs the reference with a warning and says why."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['cogvx_kernels._C'] = None\n"
        "import cogvx_kernels\n"
        "from cogvx_kernels import info\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = cogvx_kernels.causal_conv3d(torch.randn(1, 2, 2, 4, 4), torch.randn(3, 2, 3, 3, 3))\n"
        "assert y.shape == (1, 3, 2, 4, 4)\n"
        "assert any('reference' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "info.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COGVX_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "not built or does not load" in out.stdout


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "cogvx_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "causal_conv3d" in out.stdout and "extension: loaded" in out.stdout
    assert "torch" in out.stdout and "triton" in out.stdout


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    return dict(x=torch.randn(1, 4, 3, 6, 6), weight=torch.randn(5, 4, 3, 3, 3), bias=torch.randn(5),
                halo=torch.randn(1, 4, 2, 6, 6))


BAD_INPUTS = [
    ("x rank", dict(x=torch.randn(4, 3, 6, 6)), ValueError, r"x must have 5 dimensions"),
    ("weight rank", dict(weight=torch.randn(5, 4, 3, 3)), ValueError, r"weight must have 5 dimensions"),
    ("channels", dict(weight=torch.randn(5, 3, 3, 3, 3)), ValueError, r"weight must have C_in=4"),
    ("dtype mismatch", dict(weight=torch.randn(5, 4, 3, 3, 3, dtype=torch.float16)), TypeError, r"weight must have the dtype of x"),
    ("integer x", dict(x=torch.ones(1, 4, 3, 6, 6, dtype=torch.int64)), TypeError, r"x must be a floating tensor"),
    ("not a tensor", dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    ("bias shape", dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    ("bias dtype", dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, r"bias must have the dtype of x"),
    ("halo frames", dict(halo=torch.randn(1, 4, 1, 6, 6)), ValueError, r"halo must have shape \(1, 4, 2, 6, 6\)"),
    ("halo size", dict(halo=torch.randn(1, 4, 2, 5, 6)), ValueError, r"halo must have shape"),
    ("halo dtype", dict(halo=torch.randn(1, 4, 2, 6, 6, dtype=torch.bfloat16)), TypeError, r"halo must have the dtype of x"),
    ("even kernel", dict(weight=torch.randn(5, 4, 3, 2, 2)), ValueError, r"even spatial extent"),
    ("empty x", dict(x=torch.randn(1, 4, 0, 6, 6), halo=None), ValueError, r"x must not be empty"),
    ("empty weight", dict(weight=torch.randn(0, 4, 3, 3, 3), bias=None), ValueError, r"weight must not be empty"),
    ("kernel larger than frame", dict(x=torch.randn(1, 4, 3, 2, 2), halo=None, padding=(0, 0)),
     ValueError, r"smaller than the kernel"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, override, exc, match):
    args = {**_good(), **override}
    with pytest.raises(exc, match=match):
        cogvx_kernels.causal_conv3d(args["x"], args["weight"], args["bias"], args["halo"],
                                    padding=args.get("padding"))


@pytest.mark.parametrize("padding", [(1,), (1, -1), (1.5, 1), "same", (True, True), (1, False)], ids=str)
def test_bad_padding(padding):
    g = _good()
    with pytest.raises(ValueError, match="padding must be a pair"):
        cogvx_kernels.causal_conv3d(g["x"], g["weight"], padding=padding)


@pytest.mark.cuda
def test_device_mismatch():
    g = _good()
    with pytest.raises(ValueError, match="weight must be on the device of x"):
        cogvx_kernels.causal_conv3d(g["x"].cuda(), g["weight"])
