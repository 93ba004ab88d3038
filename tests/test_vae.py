"""cogvx.CausalVAE against diffusers' AutoencoderKLCogVideoX on tiny random VAEs saved by diffusers:
encode (mean, logvar, sample) and decode with diffusers' chunking and whole-video chunking,
causality across chunks, save round trip, bad input."""
import pytest
import torch

from cogvx.models.vae import SLICE_ELEMENTS, CausalVAE, FrameContext, frame_chunks
from parity import assert_close

diffusers = pytest.importorskip("diffusers")

FP32 = (0.0, 1e-4)  # max |ours - diffusers| <= 1e-4 · max |diffusers|


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(32, 32, 64, 64), latent_channels=4, layers_per_block=1,
                                           norm_num_groups=8, sample_height=32, sample_width=48)
    with torch.no_grad():  # random GroupNorm affines: left at ones/zeros they would hide mistakes
        for name, p in vae.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return vae.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_vae()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return ref, CausalVAE.from_pretrained(folder)


def test_frame_chunks_follow_diffusers():
    assert frame_chunks(17, 8) == [(0, 9), (9, 17)]
    assert frame_chunks(5, 2) == [(0, 3), (3, 5)]
    assert frame_chunks(1, 2) == [(0, 1)]
    assert frame_chunks(13, 2) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]


@pytest.fixture(params=[SLICE_ELEMENTS, 1], ids=["default-slices", "frame-slices"])
def slice_elements(request, pair):
    """Layers run in the default frame slices (one slice per chunk at these sizes) or a frame at a time."""
    pair[1].set_chunking("diffusers", slice_elements=request.param)
    yield request.param
    pair[1].set_chunking("diffusers")


def test_frame_slices_bound_the_elements_per_slice():
    x = torch.zeros(1, 32, 9, 16, 24)
    frame = 32 * 16 * 24
    with torch.no_grad():
        assert FrameContext(2 * frame + 5).slices(x) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
        assert FrameContext(1).slices(x) == [(t, t + 1) for t in range(9)]
        assert FrameContext(100 * frame).slices(x) == [(0, 9)]
    assert FrameContext(1).slices(x) == [(0, 9)]  # autograd: the whole chunk at once


@pytest.mark.parametrize("recompute", [True, False], ids=["recomputed-norms", "kept-norms"])
def test_gradients_match_diffusers(pair, recompute, monkeypatch):
    """Training path (autograd, whole-chunk layers): decode and encode gradients of every parameter
    and of the input within 1e-4 of diffusers' (relative to each gradient's scale), with each
    norm → SiLU recomputed in backward (as on activations of RECOMPUTE_MIN_BYTES and more) and kept."""
    from cogvx.models import vae_execution
    calls = []
    recomputed = vae_execution._recomputed
    monkeypatch.setattr(vae_execution, "RECOMPUTE_MIN_BYTES", 0 if recompute else 1 << 62)
    monkeypatch.setattr(vae_execution, "_recomputed", lambda *args: calls.append(1) or recomputed(*args))
    ref, ours = pair
    g = torch.Generator().manual_seed(8)
    latents, video = torch.randn(1, 4, 3, 2, 3, generator=g), torch.randn(1, 3, 5, 16, 16, generator=g)
    weight = torch.randn(1, 3, 9, 16, 24, generator=g)
    for model, run in ((ref, lambda x: ref.decode(x).sample), (ours, ours.decode)):
        x = latents.clone().requires_grad_()
        (run(x) * weight).sum().backward()
        model.latents_grad = x.grad
    for model, run in ((ref, lambda v: ref.encode(v).latent_dist.mean), (ours, lambda v: ours.encode(v).mean)):
        v = video.clone().requires_grad_()
        (run(v) ** 2).sum().backward()
        model.video_grad = v.grad
    try:
        assert bool(calls) == recompute
        assert_close(ours.latents_grad, ref.latents_grad, FP32, "d decode / d latents")
        assert_close(ours.video_grad, ref.video_grad, FP32, "d encode / d video")
        theirs = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            assert_close(p.grad, theirs[name].grad, FP32, f"grad of {name}")
    finally:
        for model in pair:
            model.zero_grad(set_to_none=True)
            del model.latents_grad, model.video_grad


@pytest.mark.parametrize("frames", [1, 5, 9, 13, 17])
def test_encode_and_decode_match_diffusers(pair, frames, slice_elements):
    ref, ours = pair
    video = torch.randn(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        expected = ref.encode(video).latent_dist
        actual = ours.encode(video)
        assert_close(actual.mean, expected.mean, FP32, "posterior mean")
        assert_close(actual.logvar, expected.logvar, FP32, "posterior logvar")
        sample = actual.sample(torch.Generator().manual_seed(3))
        assert_close(sample, expected.sample(torch.Generator().manual_seed(3)), FP32, "posterior sample")
        latents = expected.mean
        assert_close(ours.decode(latents), ref.decode(latents).sample, FP32, "decode")


def test_whole_video_chunking_matches_diffusers_with_one_chunk(pair, slice_elements):
    ref, ours = pair
    video = torch.randn(1, 3, 17, 16, 16, generator=torch.Generator().manual_seed(0))
    ref.num_sample_frames_batch_size, ref.num_latent_frames_batch_size = 1000, 1000
    ours.set_chunking("whole", slice_elements=slice_elements)
    try:
        with torch.no_grad():
            expected = ref.encode(video).latent_dist.mean
            assert_close(ours.encode(video).mean, expected, FP32, "whole encode")
            assert_close(ours.decode(expected), ref.decode(expected).sample, FP32, "whole decode")
    finally:
        ref.num_sample_frames_batch_size, ref.num_latent_frames_batch_size = 8, 2
        ours.set_chunking("diffusers")


def test_decode_is_causal_across_chunks(pair):
    """Changing a latent of a later chunk leaves every frame decoded from earlier chunks bit-identical;
    with chunks of one latent (each decoded to one frame, as diffusers does) the decode is causal
    frame by frame."""
    _, ours = pair
    latents = torch.randn(1, 4, 5, 2, 3, generator=torch.Generator().manual_seed(1))
    changed = latents.clone()
    changed[:, :, 3] += 1.0  # chunks [0:3] [3:5]: the first chunk decodes to 9 frames
    with torch.no_grad():
        a, b = ours.decode(latents), ours.decode(changed)
        assert torch.equal(a[:, :, :9], b[:, :, :9]) and not torch.equal(a[:, :, 9:], b[:, :, 9:])
        ours.set_chunking("diffusers", decode_latents=1)
        try:
            for k in range(1, 5):
                later = latents.clone()
                later[:, :, k:] += 1.0
                x, y = ours.decode(latents), ours.decode(later)
                assert x.shape[2] == 5
                assert torch.equal(x[:, :, :k], y[:, :, :k]), k
                assert not torch.equal(x[:, :, k:], y[:, :, k:]), k
        finally:
            ours.set_chunking("diffusers")


def test_the_last_chunk_frees_each_conv_cache_after_its_last_slice(pair):
    """A chunk followed by another leaves every causal conv's history for it; the last chunk leaves
    none (each is dropped once its conv is done, freeing it before the later layers run)."""
    _, ours = pair
    latents = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for final in (False, True):
            ctx = FrameContext(1)  # a frame per slice: caches carried between slices too
            ctx.final = final
            ours.decoder(latents, ctx)
            assert bool(ctx.caches) != final, final


def test_save_round_trip_through_diffusers(pair, tmp_path):
    ref, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.AutoencoderKLCogVideoX.from_pretrained(tmp_path / "ours").eval()
    latents = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(CausalVAE.from_pretrained(tmp_path / "ours").decode(latents), ours.decode(latents))
        assert_close(theirs.decode(latents).sample, ours.decode(latents), FP32, "diffusers on our save")


@pytest.mark.parametrize("call,arg,message", [
    ("encode", torch.randn(1, 3, 6, 16, 16), r"1 \+ 4·k frames"),
    ("encode", torch.randn(1, 4, 5, 16, 16), "video must have 3 channels"),
    ("encode", torch.randn(1, 3, 5, 12, 16), "multiples of 8"),
    ("encode", torch.randn(1, 3, 5, 16, 16, dtype=torch.float64), "the VAE is torch.float32"),
    ("decode", torch.randn(1, 3, 2, 2, 2), "latents must have 4 channels"),
    ("decode", torch.randn(1, 4, 2, 2), r"latents must be \(batch, channels, frames"),
    ("decode", torch.full((1, 4, 2, 2, 2), float("nan")), "latents contains NaN or infinite values"),
    ("encode", torch.full((1, 3, 5, 16, 16), float("inf")), "video contains NaN or infinite values"),
])
def test_bad_input_raises_clear_errors(pair, call, arg, message):
    _, ours = pair
    with pytest.raises(ValueError, match=message):
        getattr(ours, call)(arg)


def test_bad_chunking_and_tiling_are_refused(pair):
    with pytest.raises(ValueError, match="chunking must be 'diffusers' or 'whole'"):
        pair[1].set_chunking("tiles")
    with pytest.raises(ValueError, match="does not step by whole latents"):
        pair[1].enable_tiling(16, 24)
    assert pair[1].tiling is None


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_tiling_matches_diffusers(pair, kind):
    """Same result as diffusers' tiled processing: tiles of 48×40 video pixels (6×5 latents) with
    diffusers' default overlaps (1/6, 1/5) over an 80×96 frame (2 × 3 tiles)."""
    ref, ours = pair
    g = torch.Generator().manual_seed(5)
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    ours.enable_tiling(48, 40)
    try:
        with torch.no_grad():
            if kind == "decode":
                latents = torch.randn(1, 4, 3, 10, 12, generator=g)
                assert_close(ours.decode(latents), ref.decode(latents).sample, FP32, "tiled decode")
            else:
                video = torch.randn(1, 3, 5, 80, 96, generator=g)
                assert_close(ours.encode(video).mean, ref.encode(video).latent_dist.mean, FP32, "tiled encode")
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


def test_decode_only_loading_never_reads_the_encoder(pair, tmp_path):
    ref, ours = pair
    ref.save_pretrained(tmp_path / "vae")
    decoder_only = CausalVAE.from_pretrained(tmp_path / "vae", parts=("decoder",))
    assert decoder_only.encoder is None
    assert not any(name.startswith("encoder.") for name in decoder_only.state_dict())
    latents = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(decoder_only.decode(latents), ours.decode(latents))
    with pytest.raises(RuntimeError, match="loaded without its encoder"):
        decoder_only.encode(torch.randn(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        CausalVAE.from_pretrained(tmp_path / "vae", parts=("middle",))


def border_jumps(video: torch.Tensor, borders: list[int], dim: int, reach: int = 6):
    """(largest jump between neighbouring pixels across the given borders, largest jump between
    neighbours within `reach` pixels of them but not across them)."""
    jumps = video.diff(dim=dim).abs()                        # jumps[k]: between pixels k and k+1
    at = max(jumps.narrow(dim, b - 1, 1).max().item() for b in borders)
    near = max(jumps.narrow(dim, k, 1).max().item() for b in borders
               for k in range(max(b - 1 - reach, 0), min(b - 1 + reach, jumps.shape[dim] - 1) + 1) if k != b - 1)
    return at, near


def test_tiled_decode_of_a_smooth_input_shows_no_seam(pair):
    """Smooth latents decoded in 48×40-pixel tiles (diffusers' blending): the jumps between
    neighbouring pixels across tile borders are no larger than those next to the borders (no
    seam). Reports how far the tiled decode is from the untiled one in the border bands."""
    _, ours = pair
    t, h, w = torch.meshgrid(torch.linspace(0, 1, 3), torch.linspace(0, 1, 16), torch.linspace(0, 1, 16),
                             indexing="ij")
    latents = torch.stack([torch.sin(2 * t + 3 * h + k) * torch.cos(2 * w - k) for k in range(4)])[None]
    with torch.no_grad():
        whole = ours.decode(latents)
        ours.enable_tiling(48, 40)
        try:
            tiled = ours.decode(latents)
        finally:
            ours.disable_tiling()
    assert tiled.shape == whole.shape
    keep_h, keep_w = 48 - int(48 / 6), 40 - int(40 / 5)       # rows / columns each tile contributes
    rows = list(range(keep_h, whole.shape[3], keep_h))
    cols = list(range(keep_w, whole.shape[4], keep_w))
    for borders, dim in ((rows, 3), (cols, 4)):
        at, near = border_jumps(tiled, borders, dim)
        band = torch.cat([(tiled - whole).narrow(dim, b - 4, 8).abs().flatten() for b in borders])
        print(f"dim {dim}: jump across borders {at:.3g}, next to them {near:.3g}; "
              f"max |tiled - untiled| within 4 px of a border {band.max().item():.3g}")
        assert at <= near, (dim, at, near)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_as_close_as_diffusers(pair, tmp_path, dtype):
    """Decode in bf16/fp16: finite, and no further from the fp32 result than diffusers in the same
    dtype (1.5× its error + 0.5 % of the output scale)."""
    ref, _ = pair
    ref.save_pretrained(tmp_path / "vae")
    ours = CausalVAE.from_pretrained(tmp_path / "vae", dtype=dtype)
    latents = torch.randn(2, 4, 5, 2, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        truth = ref.decode(latents).sample.double()
        theirs = diffusers.AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae", torch_dtype=dtype).eval()
        their_err = (theirs.decode(latents.to(dtype)).sample.double() - truth).abs().max().item()
        actual = ours.decode(latents.to(dtype))
    assert torch.isfinite(actual).all()
    our_err = (actual.double() - truth).abs().max().item()
    assert our_err <= 1.5 * their_err + 5e-3 * truth.abs().max().item(), (our_err, their_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_encode_is_as_close_as_diffusers(pair, tmp_path, dtype):
    """Encode in bf16/fp16 (the temporal downsample's pair mean included): finite, and no further
    from the fp32 posterior mean than diffusers in the same dtype (1.5× its error + 0.5 % of scale)."""
    ref, _ = pair
    ref.save_pretrained(tmp_path / "vae")
    ours = CausalVAE.from_pretrained(tmp_path / "vae", dtype=dtype)
    video = torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        truth = ref.encode(video).latent_dist.mean.double()
        theirs = diffusers.AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae", torch_dtype=dtype).eval()
        their_err = (theirs.encode(video.to(dtype)).latent_dist.mean.double() - truth).abs().max().item()
        actual = ours.encode(video.to(dtype)).mean
    assert torch.isfinite(actual).all()
    our_err = (actual.double() - truth).abs().max().item()
    assert our_err <= 1.5 * their_err + 5e-3 * truth.abs().max().item(), (our_err, their_err)


def test_training_step_under_bf16_autocast(pair):
    """Mixed-precision training (torch.autocast over fp32 weights): encode, sample, decode and
    backward run (every causal conv in bf16, as torch's convs under autocast), the loss within bf16
    precision of the fp32 step's, every parameter gets a finite gradient."""
    _, ours = pair
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(8)) * 2 - 1

    def step():
        ours.zero_grad(set_to_none=True)
        posterior = ours.encode(video)
        reconstruction = ours.decode(posterior.sample(torch.Generator().manual_seed(9)).float())
        loss = (reconstruction.float() - video).pow(2).mean() + 1e-6 * posterior.kl().float().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    full, _ = step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, grads = step()
    assert abs(mixed - full) <= 2e-2 * full, (mixed, full)
    assert all(torch.isfinite(g).all() for g in grads.values())
    ours.zero_grad(set_to_none=True)
