"""Benchmark of the model layer's transformer: one expert block and a whole forward, cogvx vs diffusers
(`CogVideoXTransformer3DModel` / `CogVideoXBlock` with its default SDPA attention) in the same run,
at the real widths (2B: 30 heads × 64, sin-cos positions; 5B: 48 heads × 64, 3D-RoPE), inference
(no autograd) unless --backward.

Not a registry op: the module names its own contenders (`contenders()`, the baseline first) and
run.py times them like backends. Models load lazily inside the first call, so the CPU memory child
(a fresh process per contender) measures a process that loads and runs the model: "peak MiB" is
load + first forward; "warm MiB" a second forward. On the CPU the whole-model entries load from a
diffusers-format folder (random weights, saved once under $COGVX_BENCH_CACHE, default
~/.cache/cogvx-bench); blocks load their weights from one safetensors file; on the GPU models are
built with random weights on the device (a 5B checkpoint on disk would take minutes to write).
Interface: benchmarks/_interface.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

import cogvx
from cogvx.models.transformer import ExpertBlock, TransformerConfig

from ._checkpoints import cached_folder, diffusers_contenders, save_module

OP = "transformer"
TEXT_LEN, TEXT_DIM, TIME_DIM = 226, 4096, 512
WIDTHS = {"2B": dict(num_attention_heads=30, attention_head_dim=64, use_rotary_positional_embeddings=False),
          "5B": dict(num_attention_heads=48, attention_head_dim=64, use_rotary_positional_embeddings=True)}
LAYERS = {"2B": 30, "5B": 42}

# GPU: the real sequence, 49 frames at 480×720 → 13 × 60 × 90 latents: 226 + 13·30·45 = 17,776 tokens, CFG batch 2
_GPU = [dict(kind="block", model="2B", B=2, F=13, H=60, W=90), dict(kind="block", model="5B", B=2, F=13, H=60, W=90),
        dict(kind="forward", model="2B", B=2, F=13, H=60, W=90, layers=30),
        dict(kind="forward", model="5B", B=2, F=13, H=60, W=90, layers=42)]
# CPU: real widths, a reduced sequence (226 + 2·12·18 = 658 tokens) and 2 layers. NOT the model's shape.
_CPU = [dict(kind="block", model="2B", B=1, F=2, H=24, W=36), dict(kind="block", model="5B", B=1, F=2, H=24, W=36),
        dict(kind="forward", model="2B", B=1, F=2, H=24, W=36, layers=2),
        dict(kind="forward", model="5B", B=1, F=2, H=24, W=36, layers=2)]
_TINY = [dict(kind="block", model="tiny", B=1, F=2, H=8, W=12), dict(kind="forward", model="tiny", B=1, F=2, H=8,
                                                                      W=12, layers=1)]


def contenders(device, dtype) -> list[str]:
    return diffusers_contenders("transformer", _diffusers_classes)


def shapes(device, quick: bool, tiny: bool = False) -> list[dict]:
    if tiny:
        return list(_TINY)
    chosen = _GPU if torch.device(device).type == "cuda" else _CPU
    return [chosen[1], chosen[3]] if quick else list(chosen)  # quick: the 5B block and forward


SHAPE_SETS = {
    "cuda": ("real CogVideoX shapes: B 2 (CFG), 226 + 13x30x45 = 17,776 tokens; one block and the whole model "
             "(2B 30 layers x 30 heads, 5B 42 layers x 48 heads, head dim 64), random weights"),
    "cpu": ("scaled-down CPU set, NOT the model's shape: real widths (2B 1920, 5B 3072), B 1, "
            "226 + 2x12x18 = 658 tokens; one block, and a 2-layer model loaded from a diffusers folder"),
}


def label(shape: dict) -> str:
    s = shape
    what = "block" if s["kind"] == "block" else f"{s['layers']}-layer fwd"
    return f"{s['model']} {what} B{s['B']} L{_tokens(s)}"


def _tokens(s: dict) -> int:
    return _text_len(s) + s["F"] * (s["H"] // 2) * (s["W"] // 2)


def _text_len(s: dict) -> int:
    return 7 if s["model"] == "tiny" else TEXT_LEN


def config(shape: dict) -> dict:
    s = shape
    if s["model"] == "tiny":
        width = dict(num_attention_heads=2, attention_head_dim=64, use_rotary_positional_embeddings=True)
        dims = dict(text_embed_dim=16, time_embed_dim=32, max_text_seq_length=7, sample_height=8, sample_width=12,
                    sample_frames=9)
    else:
        width = WIDTHS[s["model"]]
        dims = dict(text_embed_dim=TEXT_DIM, time_embed_dim=TIME_DIM, max_text_seq_length=TEXT_LEN,
                    sample_height=60, sample_width=90, sample_frames=49)
    return dict(**width, **dims, in_channels=16, out_channels=16, num_layers=s.get("layers", 1))


# ---- inputs and models ----------------------------------------------------------------------------

def make_inputs(shape: dict, device, dtype: torch.dtype, backward: bool, seed: int = 0) -> dict:
    s, cfg = shape, config(shape)
    gen = torch.Generator().manual_seed(seed)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    text_len, video_len = _text_len(s), s["F"] * (s["H"] // 2) * (s["W"] // 2)
    try:
        _diffusers_classes()  # imported here, so that no contender's measured call pays for the import
    except ImportError:
        pass
    rand = lambda *size: torch.randn(*size, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    inputs = dict(shape=s, config=cfg, device=torch.device(device), dtype=dtype, backward=backward, models={},
                  rotary=_diffusers_rotary(cfg, s, device))
    if s["kind"] == "block":
        inputs.update(video=rand(s["B"], video_len, dim), text=rand(s["B"], text_len, dim),
                      temb=rand(s["B"], cfg["time_embed_dim"]))
    else:
        inputs.update(latents=rand(s["B"], s["F"], cfg["in_channels"], s["H"], s["W"]),
                      text=rand(s["B"], text_len, cfg["text_embed_dim"]),
                      timestep=torch.randint(0, 1000, (s["B"],), generator=gen).to(device))
    if backward:
        out_shape = (s["B"], text_len + video_len, dim) if s["kind"] == "block" else inputs["latents"].shape
        inputs["grad_out"] = rand(*out_shape)
    if torch.device(device).type == "cpu":
        _checkpoint(s, cfg)
    return inputs


def _diffusers_rotary(cfg: dict, s: dict, device):
    """The (cos, sin) tables CogVideoXPipeline hands diffusers' model (we compute positions inside)."""
    if not cfg["use_rotary_positional_embeddings"]:
        return None
    from cogvx_kernels.nn import Rope3D
    from cogvx_kernels.reference.rope3d import token_cos_sin

    rope = Rope3D.from_config({**cfg, "patch_size": 2, "patch_size_t": None})
    return tuple(t.to(device) for t in token_cos_sin(*rope.positions(s["F"], s["H"], s["W"]), rope.axes_dim,
                                                     rope.theta))


def _diffusers_classes():
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel, CogVideoXBlock


def _diffusers_module(s: dict, cfg: dict):
    model_class, block_class = _diffusers_classes()
    if s["kind"] == "block":
        return block_class(dim=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                              num_attention_heads=cfg["num_attention_heads"],
                              attention_head_dim=cfg["attention_head_dim"], time_embed_dim=cfg["time_embed_dim"],
                              attention_bias=True)
    return model_class(**cfg)


def _checkpoint(s: dict, cfg: dict) -> Path:
    """Random weights (seed 0) in diffusers' format: a model folder, or weights.safetensors for a block."""
    return cached_folder(f"transformer-{s['kind']}-{s['model']}", [s["kind"], cfg],
                         lambda folder: save_module(_diffusers_module(s, cfg), folder))


def _load(backend: str, inputs: dict):
    """The contender's model, loaded on first use (the cold memory measurement includes it)."""
    if backend in inputs["models"]:
        return inputs["models"][backend]
    s, cfg, device, dtype = inputs["shape"], inputs["config"], inputs["device"], inputs["dtype"]
    if device.type == "cuda":  # random weights (seed 0) built on the device by us; diffusers takes the same
        torch.manual_seed(0)
        with torch.device(device):
            model = (ExpertBlock(TransformerConfig.from_dict(cfg)) if s["kind"] == "block"
                     else cogvx.Transformer3D(cfg)).to(dtype)
        if backend == "diffusers":  # built for real: its sin-cos table is a non-persistent buffer
            with torch.device(device):
                theirs = _diffusers_module(s, cfg).to(dtype)
            theirs.load_state_dict(model.state_dict())
            model = theirs
    elif s["kind"] == "block":
        from safetensors.torch import load_file

        with torch.device("meta"):
            model = (_diffusers_module(s, cfg) if backend == "diffusers"
                     else ExpertBlock(TransformerConfig.from_dict(cfg)))
        state = load_file(_checkpoint(s, cfg) / "weights.safetensors")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    elif backend == "diffusers":
        model = _diffusers_classes()[0].from_pretrained(_checkpoint(s, cfg), torch_dtype=dtype)
    else:
        model = cogvx.Transformer3D.from_pretrained(_checkpoint(s, cfg), dtype=dtype)
    model.eval().requires_grad_(inputs["backward"])
    inputs["models"][backend] = model
    return model


def _run(backend: str, inputs: dict) -> torch.Tensor:
    model, s = _load(backend, inputs), inputs["shape"]
    if s["kind"] == "block":
        video, text, temb = inputs["video"], inputs["text"], inputs["temb"]
        if backend == "diffusers":
            v, t = model(video, text, temb, image_rotary_emb=inputs["rotary"])
            return torch.cat([t, v], dim=1)
        positions = None
        if inputs["rotary"] is not None:
            from cogvx_kernels.nn import Rope3D
            positions = Rope3D.from_config({**inputs["config"], "patch_size": 2, "patch_size_t": None}).positions(
                s["F"], s["H"], s["W"], video.device)
        # our block works in place on the joint sequence when no autograd runs: give it its own copy
        return model(torch.cat([text, video], dim=1), text.shape[1], temb, positions)
    if backend == "diffusers":
        return model(inputs["latents"], inputs["text"], inputs["timestep"], image_rotary_emb=inputs["rotary"],
                     return_dict=False)[0]
    return model(inputs["latents"], inputs["text"], inputs["timestep"])


def forward(backend: str, inputs: dict):
    with torch.no_grad():
        return _run(backend, inputs)


def forward_backward(backend: str, inputs: dict):
    """A training step's gradients: d(out · grad_out) / d(parameters)."""
    out = _run(backend, inputs)
    params = [p for p in inputs["models"][backend].parameters() if p.requires_grad]
    return torch.autograd.grad(out, params, inputs["grad_out"])


# ---- work ------------------------------------------------------------------------------------------

def _block_flops(cfg: dict, batch: int, tokens: int) -> int:
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    linear = 2 * batch * tokens * dim * (4 * dim + 8 * dim)             # q, k, v, out; FFN dim -> 4 dim -> dim
    attention = 4 * batch * cfg["num_attention_heads"] * tokens ** 2 * cfg["attention_head_dim"]
    return linear + attention


def flops(shape: dict, backward: bool) -> int:
    s, cfg = shape, config(shape)
    total = _block_flops(cfg, s["B"], _tokens(s)) * (1 if s["kind"] == "block" else cfg["num_layers"])
    if s["kind"] == "forward":
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        total += 2 * s["B"] * _text_len(s) * cfg["text_embed_dim"] * dim  # the text projection
    return total * 3 if backward else total


def bytes_moved(shape: dict, dtype: torch.dtype, backward: bool) -> int:
    """Weights read once plus the sequence read and written once per block (a lower bound)."""
    s, cfg = shape, config(shape)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = 1 if s["kind"] == "block" else cfg["num_layers"]
    weights = layers * (12 * dim * dim + 12 * dim * cfg["time_embed_dim"])
    size = torch.empty((), dtype=dtype).element_size()
    return (weights + 2 * layers * s["B"] * _tokens(s) * dim) * size * (3 if backward else 1)
