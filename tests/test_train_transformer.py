"""The transformer trainer (cogvx/train/transformer.py): its config, inputs and loss, checkpoints and
resume, LoRA files diffusers loads, DDP and FSDP2 over gloo ranks, validation videos, `cogvx train`.
A tiny random pipeline (cogvx.tiny, 4 latent channels, 2 layers: the embedded model's old layout)
as model and fixture: 9 frames of 32×32, a few steps each, CPU."""
import atexit
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cogvx import tiny
from cogvx.cli import DEFAULT_MODEL
from cogvx.loading import ConfigError
from cogvx.models import CausalVAE, Transformer3D
from cogvx.schedulers import load_scheduler
from cogvx.text import TextEncoder
from cogvx.train import checkpoint as ckpt
from cogvx.train.config import TransformerTrainConfig, load_transformer_config
from cogvx.train.data import Batches, make_dataset
from cogvx.train.latents import training_inputs
from cogvx.train.loop import ParameterEMA, sample_generator
from cogvx.train.losses import v_prediction_loss
from cogvx.train.transformer import pad_to_temporal_patches, train_transformer
from train_helpers import losses, run_killed_after_step
from test_train_vae import write_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = tiny.build(Path(tempfile.mkdtemp(prefix="cogvx-tiny-")) / "tiny-cogvideox")
atexit.register(shutil.rmtree, TINY.parent, True)
SCALING = 0.7  # the tiny VAE's scaling_factor


def config_dict(**sections) -> dict:
    """A tiny training config (TOML-shaped) on the embedded pipeline; `sections` override keys (a
    None value leaves the key out)."""
    base = {
        "model": {"pretrained": str(TINY), "finetune": "full"},
        "data": {"source": "synthetic:shapes", "frames": 9, "height": 32, "width": 32, "batch_size": 2,
                 "length": 32, "seed": 0},
        "loss": {"text_dropout": 0.5},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"},
        "train": {"steps": 4, "checkpoint_every": 2, "validate_every": 0, "seed": 0, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name] = {k: v for k, v in {**base.get(name, {}), **values}.items() if v is not None}
    return base


def make_config(**sections) -> TransformerTrainConfig:
    return TransformerTrainConfig.from_dict(config_dict(**sections))


def lora(rank=4, alpha=8.0, **more) -> dict:
    return dict(model={"finetune": "lora"}, lora={"rank": rank, "alpha": alpha, **more})


# -- the loss -----------------------------------------------------------------------------------------
def test_v_prediction_loss_by_hand_and_as_diffusers_weighted_x0_loss():
    """Against the formula written out with the scheduler's ᾱ, and against diffusers' CogVideoX
    trainer's loss (x0 from get_velocity, weighted 1/(1 − ᾱ)) on diffusers' own schedule table."""
    import diffusers
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(3, 2, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 500, 999])
    ours = load_scheduler(TINY / "scheduler")
    ab = ours.alphas_cumprod
    assert ab.dtype == torch.float64 and ab[-1] == 0  # zero terminal SNR: x_999 is pure noise
    by_hand = sum(((pred[i] - (ab[t[i]].sqrt() * eps[i] - (1 - ab[t[i]]).sqrt() * x0[i])) ** 2).sum()
                  for i in range(3)) / pred.numel()
    loss = v_prediction_loss(pred, x0, eps, t, ab)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(by_hand.item(), rel=1e-6)

    theirs = diffusers.CogVideoXDPMScheduler.from_pretrained(TINY / "scheduler")
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ab, rtol=1e-6, atol=1e-7)  # the same schedule
    noisy = theirs.add_noise(x0, eps, t)
    x0_pred = theirs.get_velocity(pred, noisy, t)  # sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v_pred
    weights = (1 / (1 - theirs.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    diffusers_loss = (weights * (x0_pred - x0) ** 2).reshape(3, -1).mean(1).mean()
    assert loss.item() == pytest.approx(diffusers_loss.item(), rel=1e-4)
    with pytest.raises(ValueError, match="one per sample"):
        v_prediction_loss(pred, x0, eps, t[:2], ab)


# -- inputs -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen():
    vae = CausalVAE.from_pretrained(TINY / "vae", dtype=torch.float32)
    return vae, TextEncoder.from_pretrained(TINY, dtype=torch.float32)


def test_training_inputs_from_clips_and_from_a_cache(frozen):
    """Clips: the posterior of our VAE sampled with each sample's generator, × scaling_factor, and T5's
    embeddings. A cache's batch of that posterior gives the same latents without VAE or T5. A sample's
    latents depend on its generator, not on its batch-mates."""
    vae, text_encoder = frozen
    batch = next(Batches(make_dataset("synthetic:shapes", frames=9, height=32, width=32, length=8), batch_size=2))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    latents, text = training_inputs(batch, vae=vae, text_encoder=text_encoder, scaling_factor=SCALING,
                                    generator=gens())
    with torch.no_grad():
        posterior = vae.encode(batch["video"])
    noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens()])
    torch.testing.assert_close(latents, (posterior.mean + posterior.std * noise) * SCALING, rtol=0, atol=0)
    assert latents.shape == (2, 4, 3, 4, 4) and text.shape == (2, 226, 32) and text.dtype == torch.float32
    torch.testing.assert_close(text, text_encoder.encode(batch["caption"]), rtol=0, atol=0)
    cached = {"latent_mean": posterior.mean, "latent_std": posterior.std, "text": text, "caption": batch["caption"]}
    again, text2 = training_inputs(cached, scaling_factor=SCALING, generator=gens())
    torch.testing.assert_close(again, latents, rtol=0, atol=0)
    assert torch.equal(text2, text)
    alone, _ = training_inputs({k: v[1:] for k, v in cached.items()}, scaling_factor=SCALING, generator=gens()[1:])
    torch.testing.assert_close(alone[0], latents[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the VAE and the text encoder"):
        training_inputs(batch, scaling_factor=SCALING)
    with pytest.raises(ValueError, match="'video' \\(clips\\) or 'latent_mean'"):
        training_inputs({"text": text}, scaling_factor=SCALING)
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        training_inputs(cached, scaling_factor=SCALING, generator=gens()[:1])


def test_pad_to_temporal_patches():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3, 1)  # (B, C, F'=3, h, w)
    padded = pad_to_temporal_patches(x, 2)
    assert padded.shape == (1, 2, 4, 3, 1) and torch.equal(padded[:, :, 0], x[:, :, 0])
    assert torch.equal(padded[:, :, 1:], x)
    assert pad_to_temporal_patches(x, None) is x and pad_to_temporal_patches(x, 3) is x


def test_parameter_ema_averages_trainable_weights_and_swaps():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    ema = ParameterEMA(model, 0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * start + 0.1 * model[0].weight)
    trained = model[0].weight.detach().clone()
    with ema.swapped(model):
        torch.testing.assert_close(model[0].weight.detach(), 0.9 * start + 0.1 * trained)
    assert torch.equal(model[0].weight, trained)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * start + 0.1 * trained)


# -- the loop -------------------------------------------------------------------------------------------
def test_logged_loss_is_the_v_loss_of_the_steps_inputs(tmp_path, frozen):
    """Step 1's logged loss, recomputed by hand: the pretrained tiny transformer, the first batch, each
    sample's draws from its generator in the documented order (posterior noise, diffusion noise,
    timestep, text dropout), x_t and v from the scheduler's ᾱ. The checkpoint is a diffusers folder."""
    import diffusers
    result = train_transformer(make_config(train={"steps": 1, "checkpoint_every": 1}), tmp_path / "run")
    logged = float(losses(tmp_path / "run")[1]["loss"])
    vae, text_encoder = frozen
    transformer = Transformer3D.from_pretrained(TINY, dtype=torch.float32)
    batch = next(Batches(make_dataset("synthetic:shapes", frames=9, height=32, width=32, length=32), batch_size=2))
    gens = [sample_generator(0, 0, 0, i) for i in range(2)]
    latents, text = training_inputs(batch, vae=vae, text_encoder=text_encoder, scaling_factor=SCALING, generator=gens)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in gens])
    dropped = [torch.rand((), generator=g).item() < 0.5 for g in gens]
    text = torch.stack([text_encoder.encode([""])[0] if d else text[i] for i, d in enumerate(dropped)])
    ab = load_scheduler(TINY / "scheduler").alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    x0, eps = latents.transpose(1, 2), noise.transpose(1, 2)
    with torch.no_grad():
        v_pred = transformer(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, text, t)
    by_hand = ((v_pred - (ab.sqrt() * eps - (1 - ab).sqrt() * x0)) ** 2).mean().item()
    assert logged == pytest.approx(by_hand, rel=1e-5)
    folder = result["checkpoint"] / "transformer"
    theirs = diffusers.CogVideoXTransformer3DModel.from_pretrained(folder)
    trained = Transformer3D.from_pretrained(folder)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in trained.parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(),
                                                            transformer.state_dict().values()))
    assert moved > 1e-5  # a step was taken


def test_the_tiny_15_layout_trains_with_padded_temporal_patches(tmp_path):
    """A new transformer from the 1.5 layout shrunk to the tiny sizes (temporal patches of 2): 9 frames
    give 3 latent frames, padded to 4."""
    tiny = json.loads((TINY / "transformer" / "config.json").read_text())
    keys = {k: v for k, v in tiny.items() if not k.startswith("_")}
    config = make_config(model={"pretrained": None, "layout": "1.5", "pipeline": str(TINY),
                                "transformer": {**keys, "patch_size_t": 2, "patch_bias": False}},
                         train={"steps": 2, "checkpoint_every": 2})
    assert config.model.transformer.patch_size_t == 2 and config.model.transformer.num_layers == 2
    train_transformer(config, tmp_path / "run")
    rows = losses(tmp_path / "run")
    assert list(rows) == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows.values())




@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, deterministic, mode):
    """EMA and gradient accumulation on: an uninterrupted run of 4 steps, and one killed after logging
    step 3 (checkpoint-2 written) then resumed: steps 3-4 log the same numbers, the final weights and
    EMA are the same."""
    from safetensors.torch import load_file
    from cogvx.train import transformer as trainer
    sections = dict(data={"batch_size": 1}, optim={"grad_accumulation": 2}, train={"ema_decay": 0.9})
    if mode == "lora":
        sections.update(lora(dropout=0.1))
    config = make_config(**sections)
    trainer.train_transformer(config, tmp_path / "whole")

    run_killed_after_step(monkeypatch, trainer, lambda: trainer.train_transformer(config, tmp_path / "resumed"), 3)
    assert [s for s, _ in ckpt.checkpoints(tmp_path / "resumed")] == [2]
    trainer.train_transformer(config, tmp_path / "resumed", resume=True)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert list(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "lr", "grad_norm"):
            assert resumed[step][key] == whole[step][key], (step, key)
    names = (["transformer", "transformer_ema"] if mode == "full" else
             ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors"])
    for name in names:
        a, b = (tmp_path / run / "checkpoint-4" / name for run in ("whole", "resumed"))
        if a.is_dir():
            a, b = a / "diffusion_pytorch_model.safetensors", b / "diffusion_pytorch_model.safetensors"
        ta, tb = load_file(str(a)), load_file(str(b))  # (the files' metadata order varies from run to run)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_incompatible_resume_is_a_clear_error(tmp_path, capsys):
    """Through `cogvx train --resume`: another LoRA rank, another kind of run (full vs LoRA), another
    transformer: one line each naming what differs; the checkpoint is left as it was."""
    from cogvx import cli
    run = tmp_path / "run"
    train_transformer(make_config(**lora(), train={"steps": 1, "checkpoint_every": 1}), run)
    folder = run / "checkpoint-1"
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    cases = [(config_dict(**lora(rank=8), train={"steps": 2}), "pytorch_lora_weights tensor"),
             (config_dict(train={"steps": 2}), "missing transformer/config.json (it holds "
                                               "pytorch_lora_weights.safetensors)")]
    for i, (data, says) in enumerate(cases):
        path = write_toml(tmp_path / f"c{i}.toml", data)
        assert cli.main(["train", "--config", str(path), "--out", str(run), "--resume"]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # (after transformers' loading bar)
        assert last.startswith("cogvx: error: ") and says in last, last
    full = tmp_path / "full"
    train_transformer(make_config(train={"steps": 1, "checkpoint_every": 1}), full)
    tiny = json.loads((TINY / "transformer" / "config.json").read_text())
    other = config_dict(model={"pretrained": None, "pipeline": str(TINY),
                               "transformer": {**{k: v for k, v in tiny.items() if not k.startswith("_") and v is not None},
                                               "num_layers": 3}}, train={"steps": 2})  # (TOML has no null)
    path = write_toml(tmp_path / "other.toml", other)
    assert cli.main(["train", "--config", str(path), "--out", str(full), "--resume"]) == 2
    assert "transformer config num_layers: checkpoint 2, now 3" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


# -- LoRA ---------------------------------------------------------------------------------------------------
def test_lora_file_loads_in_diffusers_and_gives_our_output(tmp_path):
    """Two LoRA steps (alpha ≠ rank, so diffusers must read the scale from the file's metadata), then
    diffusers' CogVideoXPipeline on the tiny folder loads the checkpoint with load_lora_weights: its
    transformer's output equals ours with the same adapters (fp32)."""
    import diffusers
    from cogvx.train.lora import LoRAWeights, add_lora
    config = make_config(**lora(rank=4, alpha=16.0), optim={"lr": 5e-2, "warmup_steps": 0},
                         train={"steps": 2, "checkpoint_every": 2})
    saved = train_transformer(config, tmp_path / "run")["checkpoint"]
    assert {p.name for p in saved.iterdir()} == {"pytorch_lora_weights.safetensors", "training_state.pt",
                                                 "train_config.json"}
    ours = Transformer3D.from_pretrained(TINY, dtype=torch.float32)
    plain = Transformer3D.from_pretrained(TINY, dtype=torch.float32)
    lora_config = add_lora(ours, rank=4, alpha=16.0, target_modules=config.lora.target_modules)
    from safetensors.torch import load_file
    weights = load_file(str(saved / "pytorch_lora_weights.safetensors"))
    assert len(weights) == 2 * 2 * 4 and all(k.startswith("transformer.transformer_blocks.") for k in weights)
    LoRAWeights(ours, lora_config).load_state_dict(weights)
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 1e-3  # they trained
    pipe = diffusers.CogVideoXPipeline.from_pretrained(TINY, dtype=torch.float32)
    pipe.load_lora_weights(saved)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 3, 4, 4, 6, generator=g), torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([999, 400])
    rotary = pipe._prepare_rotary_positional_embeddings(32, 48, 3, torch.device("cpu"))
    with torch.no_grad():
        theirs = pipe.transformer(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
        mine, base = ours.eval()(latents, text, t), plain(latents, text, t)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - base).abs().max() > 100 * 1e-4  # the adapters change the output


# -- across ranks -----------------------------------------------------------------------------------------
def _torchrun(tmp_path, config_path: Path, out: Path, *extra, world: int = 2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "cogvx", "train", "--config", str(config_path), "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_training_from_a_latent_cache_equals_training_from_the_clips(tmp_path):
    """Buckets of 9-frame clips and images mixed half and half: three steps from a latent cache
    (`cache_latents` of the same [data]) log the losses of three steps encoding the clips each step
    (the same posteriors and embeddings, each sample's draws from its own generator)."""
    from cogvx.train.cache import cache_latents
    data = {"frames": None, "height": None, "width": None, "buckets": [[9, 32, 32], [1, 32, 32]],
            "image_ratio": 0.5, "length": 8}
    raw = make_config(data=data, train={"steps": 3, "checkpoint_every": 3})
    clips = make_dataset("synthetic:shapes", buckets=raw.data.shapes, seed=0, length=8)
    assert {Batches(clips, batch_size=2, image_ratio=0.5).bucket(p) for p in range(3)} == {0, 1}  # both kinds
    cache_latents(make_dataset("synthetic:shapes", buckets=raw.data.shapes, seed=0, length=8), TINY,
                  tmp_path / "latents", batch_size=2)
    cached = make_config(data={**data, "cache": str(tmp_path / "latents")}, train={"steps": 3, "checkpoint_every": 3})
    train_transformer(raw, tmp_path / "raw")
    train_transformer(cached, tmp_path / "cached")
    a, b = losses(tmp_path / "raw"), losses(tmp_path / "cached")
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert float(b[step]["loss"]) == pytest.approx(float(a[step]["loss"]), rel=1e-5), step
    with pytest.raises(ConfigError, match="data.cache: latent cache .* holds the buckets"):  # made for other buckets
        train_transformer(make_config(data={**data, "buckets": [[9, 32, 32], [1, 32, 48]], "cache": str(tmp_path / "latents")}),
                          tmp_path / "other")


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint by parameter name."""
    from safetensors.torch import load_file
    from cogvx.train.lora import diffusers_key
    path = folder / "pytorch_lora_weights.safetensors"
    if path.is_file():
        file = load_file(str(path))
        return {name: file[diffusers_key(name)] for name in _trainable("lora")}
    return Transformer3D.from_pretrained(folder / "transformer").state_dict()


def _trainable(mode: str) -> list[str]:
    """The trained parameters' names, in the optimiser's order."""
    from cogvx.train.lora import add_lora
    model = Transformer3D.from_pretrained(TINY)
    if mode == "lora":
        add_lora(model, rank=4, alpha=8.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _adam(folder: Path, names: list[str]) -> dict[str, dict]:
    """AdamW's state per parameter name: by index for a plain optimiser, by name under FSDP."""
    state = torch.load(folder / ckpt.STATE, weights_only=True)["optimizers"]["transformer"]["state"]
    return {name: state[name] if name in state else state[i] for i, name in enumerate(names)}


LR = 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("parallel,mode", [("ddp", "lora"), ("fsdp", "full"), ("fsdp", "lora")])
def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path, parallel, mode):
    """`torchrun --nproc_per_node=2 -m cogvx train` with batch 1 per rank vs one process with batch 2
    (two micro-batches a step: the ranks synchronise on the second only): each step's loss and grad norm, AdamW's moments (the gradients) and the weights after each step
    agree within fp32 tolerance. FSDP2 (fully_shard per block) runs one step, stops, and resumes for
    the second from its checkpoint (weights and optimiser state gathered to rank 0, re-sharded)."""
    sections = dict(optim={"lr": LR, "warmup_steps": 0, "schedule": "constant", "grad_accumulation": 2},
                    train={"steps": 2, "checkpoint_every": 1, "parallel": parallel})
    if mode == "lora":
        sections.update(lora())
    train_transformer(make_config(**sections, data={"batch_size": 2}), tmp_path / "one")
    ranks = config_dict(**sections, data={"batch_size": 1})
    if parallel == "fsdp":  # step 1, then --resume for step 2
        first = json.loads(json.dumps(ranks))
        first["train"]["steps"] = 1
        _torchrun(tmp_path, write_toml(tmp_path / "first.toml", first), tmp_path / "ranks")
        _torchrun(tmp_path, write_toml(tmp_path / "ranks.toml", ranks), tmp_path / "ranks", "--resume")
    else:
        _torchrun(tmp_path, write_toml(tmp_path / "ranks.toml", ranks), tmp_path / "ranks")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "ranks")
    assert list(two) == [1, 2]
    names = _trainable(mode)
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            assert float(two[step][key]) == pytest.approx(float(one[step][key]), rel=1e-5), (step, key)
        folders = [tmp_path / run / f"checkpoint-{step}" for run in ("one", "ranks")]
        (a, b), (sa, sb) = [_trained(f) for f in folders], [_adam(f, names) for f in folders]
        for name in names:
            ma, mb = sa[name]["exp_avg"], sb[name]["exp_avg"]
            # fp32 gradients: step 1 within 1e-4 of each tensor's scale; step 2 starts from weights that
            # already differ in their last bits, its gradients by up to 2.2e-4 of the scale (measured, FSDP)
            assert (ma - mb).abs().max() <= (1e-4 if step == 1 else 1e-3) * ma.abs().max() + 1e-12, (step, name)
            # AdamW moves each weight by about lr·m/sqrt(v): where sqrt(v) is at rounding level so is the
            # step's sign, and where m cancels out (step 2) a few elements' steps carry its rounding; the
            # tensor's steps as a whole agree within 0.1 % of an lr-sized step per element
            sure = sa[name]["exp_avg_sq"].sqrt() > 1e-6
            diff = torch.where(sure, b[name] - a[name], 0)
            assert diff.norm() <= 1e-3 * LR * diff.numel() ** 0.5, (step, name, diff.abs().max())
    start = _trained(tmp_path / "one" / "checkpoint-1")
    assert max((a[k] - start[k]).abs().max().item() for k in names) > 1e-3  # step 2 moved them
    saved = torch.load(tmp_path / "ranks" / "checkpoint-2" / ckpt.STATE, weights_only=True)
    sharded = all(isinstance(k, str) for k in saved["optimizers"]["transformer"]["state"])
    assert sharded == (parallel == "fsdp") and saved["world_size"] == 2  # FSDP's state is gathered by name


# -- validation ---------------------------------------------------------------------------------------------
def test_validation_videos_are_the_checkpoints_generations(tmp_path):
    """validate_every 2 of 2 steps: one mp4 per prompt beside the checkpoint, each the video our Pipeline
    generates with the checkpoint's transformer and the same seed (H.264 is lossy on the tiny random
    model's noise-like frames: closer to it than to another seed's by far)."""
    import av
    from cogvx.pipeline import Pipeline
    prompts = ["a red square", "a blue circle"]
    config = make_config(train={"steps": 2, "checkpoint_every": 2, "validate_every": 2},
                         validation={"prompts": prompts, "steps": 3, "guidance_scale": 4.0, "seed": 5})
    result = train_transformer(config, tmp_path / "run")
    videos = sorted((tmp_path / "run" / "validation" / "step-2").iterdir())
    assert result["validation"] == videos and [p.name for p in videos] == ["00-a-red-square.mp4", "01-a-blue-circle.mp4"]
    pipe = Pipeline.from_pretrained(TINY, dtype=torch.float32)
    pipe.transformer = Transformer3D.from_pretrained(result["checkpoint"] / "transformer", dtype=torch.float32)
    generate = lambda prompt, seed: torch.from_numpy(pipe(  # noqa: E731
        prompt, num_frames=9, height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed), progress=False).frames[0]).double()
    for prompt, path in zip(prompts, videos):
        with av.open(str(path)) as f:
            got = torch.stack([torch.from_numpy(frame.to_ndarray(format="rgb24")) for frame in f.decode(video=0)])
        assert got.shape == (9, 32, 32, 3)
        mse = lambda video: ((got.double() / 255 - video) ** 2).mean().item()  # noqa: E731
        # the random tiny model's noise-like videos lose detail in H.264: compare with another seed's
        assert mse(generate(prompt, 5)) < 0.25 * mse(generate(prompt, 6)), path


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["transformer-5b-lora.toml", "transformer-5b-full.toml", "transformer-1.5-lora.toml",
                                  "transformer-tiny.toml"])
def test_shipped_configs_load(name):
    config = load_transformer_config(CONFIGS / name)
    assert config.source == CONFIGS / name
    # what a checkpoint records reads back the same
    assert TransformerTrainConfig.from_dict(json.loads(json.dumps(config.to_dict(), default=str))) == config


def _fake_models(root: Path, layout: str) -> Path:
    """A pipeline folder holding only the configs of CogVideoX's public checkpoints (no weights)."""
    from cogvx.models.transformer import LAYOUTS, TransformerConfig
    from cogvx.models.vae import VAEConfig
    from cogvx.tiny import SCHEDULER
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(TransformerConfig.from_dict(LAYOUTS[layout]).to_dict()))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({**VAEConfig().to_dict(), "scaling_factor": 0.7}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "CogVideoXDDIMScheduler", **SCHEDULER}))
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({"d_model": 4096}))
    (root / "tokenizer").mkdir()
    return root


@pytest.mark.parametrize("name,layout", [("transformer-5b-lora.toml", "5b"), ("transformer-5b-full.toml", "5b"),
                                         ("transformer-1.5-lora.toml", "1.5")])
def test_shipped_configs_fit_the_public_models(tmp_path, name, layout):
    """Pointed at folders with the public checkpoints' configs, the shipped configs pass the checks
    made before training; they say what they promise (5B full: FSDP2; LoRA: the attention projections)."""
    models = str(_fake_models(tmp_path / "m", layout))
    text = (CONFIGS / name).read_text()
    text = text.replace("../models/CogVideoX-5b", models).replace("../models/CogVideoX1.5-5B", models)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "captions.jsonl").write_text("")
    config = load_transformer_config(write_toml_text(tmp_path / name, text.replace("../data/videos",
                                                                                     str(tmp_path / "videos"))))
    config.check_files()
    assert config.train.mixed_precision == "bf16" and config.train.gradient_checkpointing
    if "full" in name:
        assert config.model.finetune == "full" and config.train.parallel == "fsdp"
    else:
        assert config.model.finetune == "lora" and config.lora.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert config.transformer_config().num_layers == 42


def write_toml_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_tiny_config_trains_on_the_embedded_pipeline(tmp_path):
    """The tiny config's transformer (2 layers) takes the embedded pipeline's latents and text
    length; the default model's config (tests/test_default_model.py trains it) has exactly the
    embedded transformer's layout. Two steps of the tiny one run here, validation videos included."""
    config = load_transformer_config(CONFIGS / "transformer-tiny.toml")
    config.check_files()
    embedded = json.loads((DEFAULT_MODEL / "transformer" / "config.json").read_text())
    vae = json.loads((DEFAULT_MODEL / "vae" / "config.json").read_text())
    layout = config.model.transformer
    assert layout.in_channels == layout.out_channels == vae["latent_channels"]
    assert layout.max_text_seq_length == embedded["max_text_seq_length"]
    default = load_transformer_config(CONFIGS / "default-model-transformer.toml")
    assert all(embedded[k] == v for k, v in default.model.transformer.to_dict().items())
    assert config.pipeline.resolve() == DEFAULT_MODEL.resolve() and config.data.source == "synthetic:shapes"
    assert config.data.shapes == [(9, 32, 32), (1, 32, 32)] and 0 < config.data.image_ratio < 0.5
    assert config.train.device == "cpu" and config.validation.prompts
    short = config.to_dict()
    short["train"].update(steps=2, checkpoint_every=2)
    short["validation"]["steps"] = 2
    result = train_transformer(TransformerTrainConfig.from_dict(short), tmp_path / "run")
    assert len(result["validation"]) == len(config.validation.prompts)
    Transformer3D.from_pretrained(result["checkpoint"] / "transformer")  # loads where the embedded one does


BAD = [  # (changes, the key the error must name, words it must say)
    (dict(train={"stepz": 3}), "train.stepz", "unknown key"),
    (dict(optimizer={"lr": 1.0}), "[optimizer]", "unknown section"),
    (dict(optim={"lr": -1.0}), "optim.lr", "positive number"),
    (dict(optim={"disc_lr": 1e-4}), "optim.disc_lr", "unknown key"),
    (dict(train={"context_parallel": True}), "train.context_parallel", "unknown key"),
    (dict(train={"parallel": "zero3"}), "train.parallel", "'ddp' or 'fsdp'"),
    (dict(loss={"text_dropout": 1.0}), "loss.text_dropout", "[0, 1)"),
    (dict(loss={"timestep_min": 500, "timestep_max": 100}), "loss.timestep_max", "at least loss.timestep_min"),
    (dict(model={"finetune": "qlora"}), "model.finetune", "'full' or 'lora'"),
    (dict(lora={"rank": 4}), "[lora]", "model.finetune is 'full'"),
    (dict(**lora(rank=0)), "lora.rank", "positive integer"),
    (dict(**lora(target_modules=[])), "lora.target_modules", "Linear layers"),
    (dict(model={"layout": "5b"}), "model.layout and model.pretrained", "exclude"),
    (dict(model={"pretrained": None}), "model.pretrained", "model.layout"),
    (dict(model={"pretrained": None, "layout": "7b", "pipeline": "p"}), "model.layout", "'2b' or '5b' or '1.5'"),
    (dict(model={"pretrained": None, "layout": "5b", "pipeline": "p", "transformer": {"num_layer": 2}}),
     "model.transformer", "num_layer"),
    (dict(data={"frames": 8}), "data [8, 32, 32]", "8 frames must be 1 + 4·k"),
    (dict(data={"height": 24}), "data [9, 24, 32]", "height 24 must be a multiple of 16"),
    (dict(data={"frames": None, "height": None, "width": None, "buckets": [[9, 32, 32], [1, 32, 40]]}),
     "data.buckets [1, 32, 40]", "width 40 must be a multiple of 16"),
    (dict(data={"frames": None, "height": None, "width": None, "buckets": [[9, 32, 32]], "image_ratio": 0.5}),
     "data.image_ratio", "needs a 1-frame bucket"),
    (dict(data={"source": None, "cache": "latents"}), "data.source", "required"),
    (dict(data={"frames": None}), "data.frames", "is required"),
    (dict(data={"validation_clips": 2}), "data.validation_clips", "unknown key"),
    (dict(validation={"prompts": ["ok", " "]}), "validation.prompts", "non-empty"),
    (dict(validation={"width": 40}), "validation [9, 32, 40]", "width 40 must be a multiple of 16"),
    (dict(train={"mixed_precision": "bf16"}), "train.mixed_precision", "GPU"),
]


@pytest.mark.parametrize("changes,key,says", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_the_key(changes, key, says):
    data = config_dict(**changes)
    with pytest.raises(ConfigError) as err:
        TransformerTrainConfig.from_dict(data)
    assert key in str(err.value) and says in str(err.value), str(err.value)


@pytest.mark.parametrize("change,says", [
    (dict(model={"pretrained": "missing"}), "model.pretrained: model folder"),
    (dict(loss={"timestep_max": 1000}), "loss.timestep_max (1000) must be at most 999"),
    (dict(data={"source": "nowhere"}), "has no captions.jsonl"),
    (dict(data={"cache": "latents"}), "is not a finished latent cache (no manifest.json): write it with "
                                      "`cogvx cache-latents --config"),
    (dict(data={"height": 32, "width": 64 * 16}), None),  # the 1.0 RoPE takes any size: no problem
])
def test_files_checked_before_training(tmp_path, capsys, change, says):
    """check_files (and so `cogvx train`) refuses, in one line, what only the folders can tell."""
    from cogvx import cli
    path = write_toml(tmp_path / "c.toml", config_dict(**change))
    config = load_transformer_config(path)
    if says is None:
        config.check_files()
        return
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        config.check_files()
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and not (tmp_path / "run").exists()


def test_an_i2v_or_epsilon_pipeline_is_refused(tmp_path):
    from cogvx.tiny import build
    i2v = build(tmp_path / "i2v", variant="i2v")
    with pytest.raises(ConfigError, match="image-to-video transformer"):
        make_config(model={"pretrained": str(i2v)}).check_files()
    scheduler = json.loads((TINY / "scheduler" / "scheduler_config.json").read_text())
    (i2v / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "epsilon"}))
    with pytest.raises(ConfigError, match="predicts 'epsilon'"):
        make_config(model={"pretrained": str(TINY), "pipeline": str(i2v)}).check_files()
