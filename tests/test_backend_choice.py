"""Device-aware backend choice without a GPU: the device's properties and the build's archs are
monkeypatched, the choice (and its warnings and errors) checked for the GPUs users have: sm_86/89
(99 KB of shared memory per block), sm_80/90, and Blackwell (sm_120) with and without PTX."""
import re
import warnings

import pytest
import torch

from cogvx_kernels import _device, _extension, _registry
from parity import TOLERANCES

CUDA = torch.device("cuda")
RTX_4090 = _device.Device("NVIDIA GeForce RTX 4090", (8, 9), 101_376)
A10 = _device.Device("NVIDIA A10", (8, 6), 101_376)
A100 = _device.Device("NVIDIA A100-SXM4-80GB", (8, 0), 166_912)
H100 = _device.Device("NVIDIA H100 80GB HBM3", (9, 0), 232_448)
RTX_5090 = _device.Device("NVIDIA GeForce RTX 5090", (12, 0), 101_376)
# what csrc/cuda/joint_attention.h's tile configurations need (checked against the build below)
SMEM = {"joint_attention": {
    64: {"forward": 55_296, "backward dK/dV": 109_568, "backward dQ": 73_728},
    128: {"forward": 69_632, "backward dK/dV": 123_904, "backward dQ": 139_264}}}


@pytest.fixture
def gpu(monkeypatch):
    """Plays a CUDA device: `gpu(Device, arch_list)`; the extension counts as built with CUDA kernels
    and triton as installed (whatever this machine has)."""
    monkeypatch.setattr(_registry, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_registry, "TRITON_IMPORT_ERROR", None)
    monkeypatch.setattr(_extension, "CUDA_SMEM", SMEM)
    monkeypatch.delenv("COGVX_BACKEND", raising=False)
    _registry.warn_once.cache_clear()

    def play(device: _device.Device, arch_list: str = "8.0,9.0+PTX"):
        monkeypatch.setattr(_device, "properties", lambda d: device if torch.device(d).type == "cuda" else None)
        monkeypatch.setattr(_extension, "CUDA_ARCH_LIST", arch_list)
    yield play
    _registry.warn_once.cache_clear()


def qkv(D=64, dtype=torch.bfloat16, grad=False):
    # CPU tensors stand in for the CUDA ones: the checks read shapes, dtypes and requires_grad only
    return tuple(torch.zeros(1, 2, 37, D, dtype=dtype, requires_grad=grad) for _ in range(3))


def choose(op, dtype, inputs=(), backend=None):
    return _registry.select(op, backend, CUDA, dtype, inputs=inputs).backend


def no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# ---- shared memory -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", [RTX_4090, A10], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_99kb_device_trains_attention_on_triton_with_one_warning(gpu, device, D):
    """sm_86/89 allow 101,376 bytes per block: the backward kernels need more, so a forward that
    autograd will differentiate goes to Triton, saying which kernel needs what."""
    gpu(device)
    kernel, need = next((k, v) for k, v in SMEM["joint_attention"][D].items() if v > 101_376)  # the first named
    with pytest.warns(RuntimeWarning) as record:
        assert choose("joint_attention", torch.bfloat16, qkv(D, grad=True)) == "triton"
    messages = [str(w.message) for w in record]
    assert messages == [f"cogvx: joint_attention uses the triton backend, not cuda: its {kernel} kernel needs "
                        f"{need:,} bytes of shared memory per block here; {device} allows 101,376"]


@pytest.mark.parametrize("D", [64, 128])
def test_99kb_device_keeps_the_cuda_forward_for_inference(gpu, D):
    gpu(RTX_4090)
    assert no_warnings(lambda: choose("joint_attention", torch.float16, qkv(D, torch.float16))) == "cuda"
    with torch.no_grad():  # inputs requiring grad, but no graph is recorded: the forward only
        assert no_warnings(lambda: choose("joint_attention", torch.bfloat16, qkv(D, grad=True))) == "cuda"


def test_named_cuda_backend_on_a_99kb_device_raises_with_the_limit(gpu):
    gpu(A10)
    with pytest.raises(ValueError, match=re.escape(
            "backend 'cuda' is not available for joint_attention on cuda: its backward dK/dV kernel needs "
            "109,568 bytes of shared memory per block here; NVIDIA A10 (sm_86) allows 101,376. Available: ")):
        choose("joint_attention", torch.bfloat16, qkv(64, grad=True), backend="cuda")


@pytest.mark.parametrize("device", [A100, H100], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_sm80_and_sm90_train_on_cuda(gpu, device, D):
    gpu(device)
    assert no_warnings(lambda: choose("joint_attention", torch.bfloat16, qkv(D, grad=True))) == "cuda"


# ---- architectures ------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["causal_conv3d", "rope3d", "qk_norm_rope3d", "joint_attention"])
def test_blackwell_without_ptx_falls_back_to_triton(gpu, op):
    """A build with sm_80 and sm_90 cubins only has nothing sm_120 can run: every op goes to Triton,
    warning once with the archs; with sm_90 PTX the CUDA kernels run (JIT-compiled by the driver)."""
    inputs = qkv(64) if op == "joint_attention" else ()
    gpu(RTX_5090, "8.0,9.0")
    with pytest.warns(RuntimeWarning, match=re.escape(
            f"cogvx: {op} uses the triton backend, not cuda: the extension's CUDA kernels were built for 8.0, 9.0, "
            "with no kernel image or PTX for sm_120 (rebuild with TORCH_CUDA_ARCH_LIST including 12.0")):
        assert choose(op, torch.bfloat16, inputs) == "triton"
    with pytest.raises(ValueError, match="no kernel image or PTX for sm_120"):
        choose(op, torch.bfloat16, inputs, backend="cuda")
    gpu(RTX_5090, "8.0,9.0+PTX")
    assert no_warnings(lambda: choose(op, torch.bfloat16, inputs)) == "cuda"


def test_sm80_cubins_run_on_every_sm8x(gpu):
    gpu(RTX_4090, "8.0")
    assert no_warnings(lambda: choose("causal_conv3d", torch.bfloat16)) == "cuda"
    gpu(H100, "8.0")  # sm_80 code does not run on sm_90 (no PTX)
    with pytest.warns(RuntimeWarning, match="no kernel image or PTX for sm_90"):
        assert choose("causal_conv3d", torch.bfloat16) == "triton"


def test_a_build_that_does_not_record_its_archs_is_not_trusted(gpu, monkeypatch):
    gpu(H100)
    monkeypatch.setattr(_extension, "CUDA_ARCH_LIST", None)
    with pytest.warns(RuntimeWarning, match=r"does not record the archs it was built for .*rebuild it"):
        assert choose("rope3d", torch.bfloat16) == "triton"


@pytest.mark.parametrize("arch_list,capability,runs", [
    ("8.0;9.0", (8, 0), True), ("8.0;9.0", (8, 6), True), ("8.0;9.0", (8, 9), True), ("8.0;9.0", (9, 0), True),
    ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False), ("8.0;9.0", (7, 5), False),
    ("8.0;9.0+PTX", (12, 0), True), ("8.0;9.0+PTX", (10, 0), True), ("8.0+PTX", (9, 0), True),
    ("8.6", (8, 0), False), ("9.0a", (9, 0), True), ("9.0a+PTX", (10, 0), False), ("10.0f", (10, 3), True),
    ("Ampere", (8, 9), True), ("Hopper", (12, 0), True), ("8.0 9.0", (9, 0), True), ("8.0,9.0+PTX", (12, 0), True),
])
def test_arch_compatibility(arch_list, capability, runs):
    assert (_device.arch_refusal(arch_list, capability) is None) == runs


def test_bad_arch_list_entries_are_named():
    with pytest.raises(ValueError, match=r"unrecognised CUDA arch list entries \['sm_90'\]"):
        _device.parse_arch_list("8.0;sm_90")


def test_the_build_records_its_archs_and_shared_memory():
    """The extension reports what backend choice checks: its TORCH_CUDA_ARCH_LIST (sm_90 PTX by
    default, so that newer GPUs run it) and the attention kernels' shared memory per block."""
    if _extension.load_error() is not None:
        pytest.skip(f"cogvx_kernels._C does not load: {_extension.load_error()}")
    if not _registry.has_kernel("joint_attention", "CUDA"):
        assert _extension.CUDA_ARCH_LIST == "" and _extension.CUDA_SMEM == {}
        return
    assert _device.parse_arch_list(_extension.CUDA_ARCH_LIST)  # parses
    assert _extension.CUDA_SMEM == SMEM


# ---- dtypes ---------------------------------------------------------------------------------------

def test_fp32_attention_on_cuda_goes_to_sdpa_silently(gpu):
    """fp32 on CUDA: torch's 3xTF32 tensor-core kernel (sdpa), never the one-warp-per-row CUDA test
    path, which runs only when named."""
    gpu(H100)
    inputs = qkv(64, torch.float32, grad=True)
    assert no_warnings(lambda: choose("joint_attention", torch.float32, inputs)) == "sdpa"
    assert choose("joint_attention", torch.float32, inputs, backend="cuda") == "cuda"
    assert choose("joint_attention", torch.float32, inputs, backend="triton") == "triton"
    cuda = {i.backend: i for i in _registry.implementations("joint_attention")}["cuda"]
    assert torch.float32 not in cuda.dtypes and torch.float32 in cuda.dtypes_on_request


def test_no_automatic_choice_takes_a_test_only_path(gpu):
    gpu(H100)
    for op in _registry.ops():
        for impl in _registry.implementations(op):
            for dtype in impl.dtypes_on_request:
                if dtype in impl.dtypes:
                    continue
                chosen = choose(op, dtype, qkv(64, dtype) if op == "joint_attention" else ())
                assert chosen != impl.backend, f"{op} {dtype}: automatic choice took {impl.backend}'s test path"


def test_named_backend_without_the_dtype_raises(gpu):
    gpu(H100)
    with pytest.raises(ValueError, match=r"backend 'sdpa' is not available for joint_attention on cuda: it does "
                                         r"not support torch.bfloat16"):
        choose("joint_attention", torch.bfloat16, qkv(64), backend="sdpa")


def test_every_declared_dtype_has_a_parity_tolerance_and_no_other():
    for op in _registry.ops():
        for impl in _registry.implementations(op):
            assert set(TOLERANCES[op][impl.backend]) == set(impl.all_dtypes), f"{op} {impl.backend}"


def test_float64_runs_on_the_reference_only():
    """No kernel of ours takes fp64 (the CUDA fp64 paths are gone): the reference is its backend."""
    for op in _registry.ops():
        for impl in _registry.implementations(op):
            assert impl.backend == "reference" or torch.float64 not in impl.all_dtypes, f"{op} {impl.backend}"


# ---- determinism ----------------------------------------------------------------------------------

def test_deterministic_declarations():
    declared = {(op, i.backend): i.deterministic for op in _registry.ops() for i in _registry.implementations(op)}
    assert declared[("joint_attention", "cuda")] == "on request"  # atomic dQ unless deterministic mode is on
    assert declared[("joint_attention", "sdpa")] == "on request"  # num_splits_key=1 when asked
    assert all(v == "always" for (op, b), v in declared.items() if op != "joint_attention" or b not in ("cuda", "sdpa"))
    with pytest.raises(ValueError, match="deterministic must be one of"):
        _registry.Implementation("rope3d", "cpu", lambda: None, dtypes=(), deterministic="sometimes")


def test_a_nondeterministic_backward_is_refused_in_deterministic_mode(monkeypatch):
    """Every backend honours torch.use_deterministic_algorithms(True); one that could not (declared
    "no") is skipped by automatic choice while it is on, and raises when named."""
    impls = dict(_registry._REGISTRY["joint_attention"])
    impls["cpu"] = _registry.Implementation("joint_attention", "cpu", impls["cpu"].fn, dtypes=impls["cpu"].dtypes,
                                            native_op="joint_attention", deterministic="no")
    monkeypatch.setattr(_registry, "_REGISTRY", {**_registry._REGISTRY, "joint_attention": impls})
    _registry.warn_once.cache_clear()
    grads = qkv(64, torch.float32, grad=True)
    cpu = torch.device("cpu")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.warns(RuntimeWarning, match="uses the sdpa backend, not cpu: its backward is not deterministic"):
            assert _registry.select("joint_attention", None, cpu, torch.float32, grads).backend == "sdpa"
        with pytest.raises(ValueError, match="its backward is not deterministic"):
            _registry.select("joint_attention", "cpu", cpu, torch.float32, grads)
        with torch.no_grad():  # no backward: nothing to refuse
            assert _registry.select("joint_attention", None, cpu, torch.float32, grads).backend == "cpu"
        torch.use_deterministic_algorithms(False)
        assert _registry.select("joint_attention", None, cpu, torch.float32, grads).backend == "cpu"
    finally:
        torch.use_deterministic_algorithms(before)
        _registry.warn_once.cache_clear()
