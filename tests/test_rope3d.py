"""rope3d and qk_norm_rope3d: every backend against diffusers' formula (get_3d_rotary_pos_embed +
apply_rotary_emb + LayerNorm), forward and backward; custom-op checks, compile, bad input.

Where diffusers is not installed (the GPU machine), the formula comes from our reference, which
`test_reference_is_diffusers` proves identical to diffusers wherever diffusers is present."""
import pytest
import torch

import cogvx_kernels
from cogvx_kernels.nn.rope3d import resize_crop_region
from cogvx_kernels.ops.rope3d import qk_norm_rope3d_token_tables
from cogvx_kernels.reference import rope3d as reference
from parity import assert_close, backend_params, implementation, tolerance

try:
    from diffusers.models import embeddings
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
except ImportError:
    embeddings = None

# (B, heads, D, text_len, T, H, W, positions)
CASES = [
    (2, 2, 64, 16, 3, 6, 9, "crop"),        # crop of the 5B grid at low scale, fractional positions
    (2, 2, 64, 0, 5, 4, 6, "crop"),         # no text, odd T
    (1, 3, 128, 16, 3, 6, 9, "arange"),     # D=128, axes (32, 48, 48)
    (1, 1, 64, 226, 2, 3, 5, "arange"),     # the real text length
    (2, 1, 64, 226, 13, 30, 45, "crop"),    # the 5B grid (13×30×45 after the 2×2 patch)
]
INTERPRETED_CASES = [0, 1, 2, 3]  # the Triton interpreter is slow: the 5B grid runs on compiled backends


def positions(T, H, W, kind, device):
    """Positions as the CogVideoX pipeline builds them: the crop-region linspace grid (1.0 away
    from its base size; here base 30×45) or plain aranges (1.5's slice grid)."""
    if kind == "arange":
        crops = None
        pos = (torch.arange(T).float(), torch.arange(H).float(), torch.arange(W).float())
    else:
        crops = (get_resize_crop_region_for_grid((H, W), 45, 30) if embeddings is not None
                 else resize_crop_region(H, W, 30, 45))
        (top, left), (bottom, right) = crops
        pos = (torch.linspace(0, T * (T - 1) / T, T),
               torch.linspace(top, bottom * (H - 1) / H, H),
               torch.linspace(left, right * (W - 1) / W, W))
    return crops, tuple(p.to(device) for p in pos)


def diffusers_tables(D, T, H, W, kind, device):
    crops, pos = positions(T, H, W, kind, device)
    if embeddings is None:
        cos, sin = reference.token_cos_sin(*pos, axes_for(D), 10000.0)
    elif kind == "arange":
        cos, sin = embeddings.get_3d_rotary_pos_embed(D, None, (H, W), T, grid_type="slice", max_size=(H, W))
    else:
        cos, sin = embeddings.get_3d_rotary_pos_embed(D, crops, (H, W), T)
    return pos, cos.to(device), sin.to(device)


def diffusers_rope(x, text_len, cos, sin):
    video = (embeddings.apply_rotary_emb(x[:, :, text_len:], (cos, sin)) if embeddings is not None
             else reference.rotate(x[:, :, text_len:], cos, sin).to(x.dtype))
    return torch.cat([x[:, :, :text_len], video], dim=2)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_is_diffusers(case):
    """Our reference formula equals diffusers' exactly (the GPU machine's tests rely on it)."""
    if embeddings is None:
        pytest.skip("diffusers is not installed")
    B, heads, D, text_len, T, H, W, kind = CASES[case]
    pos, cos, sin = diffusers_tables(D, T, H, W, kind, "cpu")
    ref_cos, ref_sin = reference.token_cos_sin(*pos, axes_for(D), 10000.0)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    x = make_x(B, heads, D, text_len + T * H * W, torch.float32, "cpu")
    assert torch.equal(diffusers_rope(x, text_len, cos, sin),
                       reference.rope3d(x, text_len, *pos, axes_dim=axes_for(D)))


def axes_for(D):
    return (D // 4, D // 8 * 3, D // 8 * 3)


def make_x(B, heads, D, L, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the head-split view (B, L, heads, D).transpose(1, 2): strided, as attention produces it
    return (torch.randn(B, L, heads, D, generator=g) * 2 + 0.5).to(device=device, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend,device", backend_params("rope3d"))
def test_rope3d_matches_diffusers(backend, device, case, dtype):
    implementation("rope3d", backend, device)
    if backend == "triton" and device == "cpu" and case not in INTERPRETED_CASES:
        pytest.skip("interpreted Triton runs the small grids only (the 5B grid runs on compiled backends)")
    B, heads, D, text_len, T, H, W, kind = CASES[case]
    pos, cos, sin = diffusers_tables(D, T, H, W, kind, device)
    x = make_x(B, heads, D, text_len + T * H * W, dtype, device).requires_grad_()
    x0 = x.detach().clone()
    y = cogvx_kernels.rope3d(x, text_len=text_len, pos_t=pos[0], pos_h=pos[1], pos_w=pos[2], axes_dim=axes_for(D),
                             backend=backend)
    assert torch.equal(x.detach(), x0), "x must not be modified"
    assert y.dtype == dtype and y.shape == x.shape
    x_ref = x.detach().float().requires_grad_()
    y_ref = diffusers_rope(x_ref, text_len, cos, sin)
    tol = tolerance("rope3d", backend, dtype)
    assert_close(y, y_ref, tol, f"{backend} rope3d")
    assert torch.equal(y[:, :, :text_len], x0[:, :, :text_len]), "text tokens must pass through"

    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad.float())
    assert_close(gx, gx_ref, tol, f"{backend} rope3d backward")


@pytest.mark.parametrize("backend,device", backend_params("rope3d"))
def test_rope3d_inplace(backend, device):
    implementation("rope3d", backend, device)
    B, heads, D, text_len, T, H, W, kind = CASES[0]
    pos, cos, sin = diffusers_tables(D, T, H, W, kind, device)
    x = make_x(B, heads, D, text_len + T * H * W, torch.float32, device)
    expected = diffusers_rope(x, text_len, cos, sin)
    out = cogvx_kernels.rope3d(x, text_len=text_len, pos_t=pos[0], pos_h=pos[1], pos_w=pos[2], inplace=True,
                               backend=backend)
    assert out is x
    assert_close(x, expected, (1e-5, 1e-5), f"{backend} in place")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend,device", backend_params("qk_norm_rope3d"))
def test_qk_norm_rope3d_matches_diffusers(backend, device, case, affine, dtype):
    implementation("qk_norm_rope3d", backend, device)
    if backend == "triton" and device == "cpu" and (case not in INTERPRETED_CASES or dtype == torch.float16):
        pytest.skip("interpreted Triton runs the small grids in fp32/bf16 only (it is slow on CPU)")
    if case == 4 and dtype != torch.bfloat16:
        pytest.skip("the 5B grid runs in bf16 (its production dtype); smaller grids cover fp32/fp16")
    B, heads, D, text_len, T, H, W, kind = CASES[case]
    pos, cos, sin = diffusers_tables(D, T, H, W, kind, device)
    L = text_len + T * H * W
    q = make_x(B, heads, D, L, dtype, device, seed=0).requires_grad_()
    k = make_x(B, heads, D, L, dtype, device, seed=1).requires_grad_()
    norms = [torch.nn.LayerNorm(D, eps=1e-6, elementwise_affine=affine).to(device) for _ in range(2)]
    if affine:
        with torch.no_grad():
            for n in norms:
                n.weight.normal_(1.0, 0.3)
                n.bias.normal_(0.0, 0.3)
    params = [n.weight if affine else None for n in norms], [n.bias if affine else None for n in norms]
    q_out, k_out = cogvx_kernels.qk_norm_rope3d(
        q, k, params[0][0], params[1][0], params[0][1], params[1][1], eps=1e-6, text_len=text_len,
        pos_t=pos[0], pos_h=pos[1], pos_w=pos[2], axes_dim=axes_for(D), backend=backend)

    # diffusers: LayerNorm then apply_rotary_emb, here in fp32 on the same rounded inputs
    q_ref_in, k_ref_in = (t.detach().float().requires_grad_() for t in (q, k))
    q_ref = diffusers_rope(norms[0](q_ref_in), text_len, cos, sin)
    k_ref = diffusers_rope(norms[1](k_ref_in), text_len, cos, sin)
    tol = tolerance("qk_norm_rope3d", backend, dtype)
    assert_close(q_out, q_ref, tol, f"{backend} q")
    assert_close(k_out, k_ref, tol, f"{backend} k")

    grad_q = torch.randn(q_out.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    grad_k = torch.randn(k_out.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    wanted = [q, k] + ([norms[0].weight, norms[0].bias, norms[1].weight, norms[1].bias] if affine else [])
    got = torch.autograd.grad([q_out, k_out], wanted, [grad_q, grad_k])
    wanted_ref = [q_ref_in, k_ref_in] + ([norms[0].weight, norms[0].bias, norms[1].weight, norms[1].bias] if affine else [])
    want = torch.autograd.grad([q_ref, k_ref], wanted_ref, [grad_q.float(), grad_k.float()])
    # gradients of the affine parameters sum over every row: compare relative to their magnitude
    for name, a, e in zip(["q", "k", "wq", "bq", "wk", "bk"], got, want):
        assert_close(a, e, (tol[0], max(tol[1], 1e-4)), f"{backend} grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [0, 2])
@pytest.mark.parametrize("backend,device", backend_params("qk_norm_rope3d"))
def test_token_tables_equal_positions(backend, device, case, dtype):
    """diffusers' per-token (cos, sin) tables, read as a one-axis grid, give exactly what the
    per-axis positions give (forward and backward): the attention processor relies on it."""
    implementation("qk_norm_rope3d", backend, device)
    B, heads, D, text_len, T, H, W, kind = CASES[case]
    pos, cos, sin = diffusers_tables(D, T, H, W, kind, device)
    L = text_len + T * H * W
    q = make_x(B, heads, D, L, dtype, device, seed=0).requires_grad_()
    k = make_x(B, heads, D, L, dtype, device, seed=1).requires_grad_()
    w, b = torch.randn(D, device=device, dtype=dtype), torch.randn(D, device=device, dtype=dtype)
    by_positions = cogvx_kernels.qk_norm_rope3d(q, k, w, b, w, b, text_len=text_len, pos_t=pos[0], pos_h=pos[1],
                                                pos_w=pos[2], axes_dim=axes_for(D), backend=backend)
    by_tables = qk_norm_rope3d_token_tables(q, k, w, b, w, b, text_len=text_len, cos=cos, sin=sin, backend=backend)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (0.0, 1e-2)  # tables from float64 positions vs fp32
    for a, e, what in zip(by_tables, by_positions, "qk"):
        assert_close(a, e, tol, f"{backend} {what}")
    g = torch.randn(by_tables[0].shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    got = torch.autograd.grad(by_tables, (q, k), (g, g))
    want = torch.autograd.grad(by_positions, (q, k), (g, g))
    for a, e, what in zip(got, want, "qk"):
        assert_close(a, e, tol, f"{backend} grad {what}")


@pytest.mark.parametrize("override,match", [
    (dict(cos=torch.ones(11, 64)), r"cos must have shape \(L - text_len, D\) = \(12, 64\)"),
    (dict(sin=torch.ones(12, 32)), r"sin must have shape"),
    (dict(text_len=16), r"text_len must be an int in \[0, L=16\)"),
    (dict(text_len=-1), r"text_len must be an int"),
])
def test_token_tables_bad_input(override, match):
    q = torch.randn(1, 2, 16, 64)
    args = dict(text_len=4, cos=torch.ones(12, 64), sin=torch.zeros(12, 64), **{})
    args.update(override)
    with pytest.raises(ValueError, match=match):
        qk_norm_rope3d_token_tables(q, q, **args)


def test_never_builds_a_per_token_table():
    """The kernels get the per-axis (2, T+H+W, D/2) tables, a few KiB, not an (L, D) table."""
    from cogvx_kernels.reference.rope3d import axis_tables
    tables = axis_tables(torch.arange(13.0), torch.arange(30.0), torch.arange(45.0), (16, 24, 24), 10000.0)
    assert tables.shape == (2, 13 + 30 + 45, 32)


# ---- custom-op machinery ------------------------------------------------------------------------

def _op_args(device="cpu"):
    from cogvx_kernels.reference.rope3d import axis_tables
    x = make_x(2, 2, 64, 4 + 2 * 3 * 4, torch.float32, device).requires_grad_()
    tables = axis_tables(torch.arange(2.0), torch.arange(3.0) * 0.5, torch.arange(4.0), (16, 24, 24), 10000.0)
    return x, tables.to(device), [4, 2, 3, 4, [16, 24, 24]]


def test_opcheck_native():
    x, tables, grid = _op_args()
    torch.library.opcheck(torch.ops.cogvx.rope3d.default, [x, tables, *grid, False])
    torch.library.opcheck(torch.ops.cogvx.rope3d_.default, [x.detach().clone(), tables, *grid, False])
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    torch.library.opcheck(torch.ops.cogvx.qk_norm_rope3d.default, [x, w, b, tables, *grid, 1e-6])
    torch.library.opcheck(torch.ops.cogvx.qk_norm_rope3d.default, [x, None, None, tables, *grid, 1e-6])


def test_opcheck_triton_interpreted():
    from cogvx_kernels import _registry
    if not _registry.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    x, tables, grid = _op_args()
    static = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.cogvx.rope3d_triton.default, [x, tables, *grid, False], test_utils=static)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    torch.library.opcheck(torch.ops.cogvx.qk_norm_rope3d_triton.default, [x, w, b, tables, *grid, 1e-6],
                          test_utils=static)


@pytest.mark.cuda
def test_opcheck_cuda():
    x, tables, grid = _op_args("cuda")
    torch.library.opcheck(torch.ops.cogvx.rope3d.default, [x, tables, *grid, False])
    w, b = torch.randn(64, device="cuda", requires_grad=True), torch.randn(64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.cogvx.qk_norm_rope3d.default, [x, w, b, tables, *grid, 1e-6])


def test_torch_compile_fullgraph():
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)

    def attention_inputs(q, k):
        q, k = cogvx_kernels.qk_norm_rope3d(q, k, w, b, w, b, text_len=4, pos_t=2, pos_h=3, pos_w=4, backend="cpu")
        return cogvx_kernels.rope3d(q, text_len=4, pos_t=2, pos_h=3, pos_w=4, backend="cpu").sum() + k.sum()

    q = make_x(1, 2, 64, 28, torch.float32, "cpu").requires_grad_()
    k = make_x(1, 2, 64, 28, torch.float32, "cpu", seed=1).requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")(q, k)
    grads = torch.autograd.grad(out, [q, k, w])
    ref = attention_inputs(q, k)
    ref_grads = torch.autograd.grad(ref, [q, k, w])
    torch.testing.assert_close(out, ref)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


# ---- bad input ----------------------------------------------------------------------------------

def _call(**override):
    args = dict(x=torch.randn(1, 2, 4 + 24, 64), text_len=4, pos_t=2, pos_h=3, pos_w=4, axes_dim=(16, 24, 24))
    args.update(override)
    x = args.pop("x")
    return cogvx_kernels.rope3d(x, **args)


BAD = [
    ("axes sum", dict(axes_dim=(16, 16, 16)), ValueError, r"sum\(axes_dim\) must equal the head dim D=64"),
    ("odd axis", dict(axes_dim=(15, 25, 24)), ValueError, r"must all be even"),
    ("D=128 with default axes", dict(x=torch.randn(1, 2, 28, 128), axes_dim=(16, 24, 24)), ValueError, r"D=128"),
    ("token count", dict(pos_w=5), ValueError, r"L=28 tokens but text_len \+ len\(pos_t\)·len\(pos_h\)·len\(pos_w\)"),
    ("text_len", dict(text_len=-1), ValueError, r"text_len must be a non-negative int"),
    ("position dtype", dict(pos_t=torch.arange(2)), TypeError, r"pos_t must be a floating tensor"),
    ("position rank", dict(pos_h=torch.zeros(3, 1)), ValueError, r"pos_h must be a non-empty 1-D tensor"),
    ("position type", dict(pos_w=[0.0, 1.0, 2.0, 3.0]), TypeError, r"pos_w must be a 1-D float tensor"),
    ("integer x", dict(x=torch.ones(1, 2, 28, 64, dtype=torch.int32)), TypeError, r"x must be a floating tensor"),
    ("x rank", dict(x=torch.randn(2, 28, 64)), ValueError, r"x must have 4 dimensions"),
    ("theta", dict(theta=0.0), ValueError, r"theta must be a positive finite float"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, override, exc, match):
    with pytest.raises(exc, match=match):
        _call(**override)


@pytest.mark.cuda
def test_position_device_mismatch():
    with pytest.raises(ValueError, match="pos_t must be on x's device"):
        _call(x=torch.randn(1, 2, 28, 64, device="cuda"), pos_t=torch.arange(2.0))


def test_qk_norm_bad_input():
    q = torch.randn(1, 2, 28, 64)
    kw = dict(text_len=4, pos_t=2, pos_h=3, pos_w=4)
    with pytest.raises(ValueError, match=r"norm_q_weight must have shape \(64,\)"):
        cogvx_kernels.qk_norm_rope3d(q, q, torch.ones(32), None, None, None, **kw)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        cogvx_kernels.qk_norm_rope3d(q, q.half(), **kw)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        cogvx_kernels.qk_norm_rope3d(q, q, eps=0.0, **kw)
    with pytest.raises(TypeError, match=r"norm_k_bias must have q's dtype \(torch.float32\) or float32"):
        cogvx_kernels.qk_norm_rope3d(q, q, None, None, None, torch.zeros(64, dtype=torch.float64), **kw)


def test_inplace_refuses_autograd():
    x = torch.randn(1, 2, 28, 64, requires_grad=True)
    with pytest.raises(ValueError, match="inplace=True"):
        cogvx_kernels.rope3d(x, text_len=4, pos_t=2, pos_h=3, pos_w=4, inplace=True)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + backend_params("rope3d"))
def test_inplace_refuses_overlapping_memory(backend, device):
    """An expanded x (stride 0 over heads: every head is one memory row) cannot be rotated in place:
    each head would rotate the same memory again. Refused like torch's own in-place ops, x untouched."""
    implementation("rope3d", backend, device)
    base = torch.randn(1, 1, 28, 64, device=device)
    before = base.clone()
    with pytest.raises(RuntimeError, match=r"x is written in place but has overlapping memory.*more than one "
                                           r"element of the written-to tensor refers to a single memory location"):
        cogvx_kernels.rope3d(base.expand(1, 2, 28, 64), text_len=4, pos_t=2, pos_h=3, pos_w=4, inplace=True,
                             backend=backend)
    assert torch.equal(base, before)
    # out of place, an expanded x is only read: fine
    out = cogvx_kernels.rope3d(base.expand(1, 2, 28, 64), text_len=4, pos_t=2, pos_h=3, pos_w=4, backend=backend)
    expected = cogvx_kernels.rope3d(base, text_len=4, pos_t=2, pos_h=3, pos_w=4, backend="reference")
    torch.testing.assert_close(out, expected.expand(1, 2, 28, 64))


FP32 = torch.finfo(torch.float32)
# the tables are fp32 θ^(−2i/d): θ must be a normal fp32 (below, θ^(−2i/d) overflows; above, θ itself)
BAD_THETA = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, -10000.0, 1e-40, 1e39, 1e300, True, "10000"]


@pytest.mark.parametrize("theta", BAD_THETA, ids=str)
def test_bad_theta(theta):
    q = torch.randn(1, 2, 28, 64)
    kw = dict(text_len=4, pos_t=2, pos_h=3, pos_w=4, theta=theta)
    with pytest.raises(ValueError, match=r"theta must be a positive finite float in \[1.18e-38, 3.4e\+38\]"):
        cogvx_kernels.rope3d(q, **kw)
    with pytest.raises(ValueError, match=r"theta must be a positive finite float"):
        cogvx_kernels.qk_norm_rope3d(q, q, **kw)


@pytest.mark.parametrize("theta", [FP32.tiny, 1e-30, 1.0, 10000, FP32.max], ids=str)
def test_theta_bounds_give_finite_tables(theta):
    """The accepted range is not too wide: its ends still give finite rotations."""
    q = torch.randn(1, 2, 28, 64)
    kw = dict(text_len=4, pos_t=2, pos_h=3, pos_w=4, theta=theta)
    assert torch.isfinite(cogvx_kernels.rope3d(q, **kw)).all()
    assert all(torch.isfinite(t).all() for t in cogvx_kernels.qk_norm_rope3d(q, q, **kw))


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), 0.0, -1e-6, 1e-50, 1e39, True, "1e-6"], ids=str)
def test_bad_eps(eps):
    q = torch.randn(1, 2, 28, 64)
    with pytest.raises(ValueError, match=r"eps must be a positive finite float in \[1.18e-38, 3.4e\+38\]"):
        cogvx_kernels.qk_norm_rope3d(q, q, eps=eps, text_len=4, pos_t=2, pos_h=3, pos_w=4)


@pytest.mark.parametrize("backend,device", backend_params("qk_norm_rope3d"))
def test_smallest_eps_keeps_constant_rows_finite(backend, device):
    """A constant row has variance 0: the smallest accepted eps still gives a finite 1/sqrt(var + eps)
    in fp32 (1e-50, accepted before, became 0 in fp32 and gave NaN)."""
    implementation("qk_norm_rope3d", backend, device)
    q = torch.ones(1, 2, 28, 64, device=device)
    out_q, out_k = cogvx_kernels.qk_norm_rope3d(q, q, eps=FP32.tiny, text_len=4, pos_t=2, pos_h=3, pos_w=4,
                                                backend=backend)
    assert torch.isfinite(out_q).all() and torch.isfinite(out_k).all()
