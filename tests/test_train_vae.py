"""The VAE trainer (cogvx/train/vae.py), its checkpoints and logs, and `cogvx train-vae` / `plot-log`.
Tiny models (VAE channels 8-16, 9 frames of 16×24), a few steps each, CPU."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx.models.vae import CausalVAE
from cogvx.train import checkpoint as ckpt
from cogvx.train.log import CSVLog, plot_log, read_log
from cogvx.train.loop import EMA, lr_lambda, sample_noise
from cogvx.train.vae import psnr, ssim
from train_helpers import losses, run_killed_after_step

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(block_out_channels=[8, 8, 16, 16], latent_channels=4, layers_per_block=1, norm_num_groups=4,
                sample_height=16, sample_width=24)


def config_dict(**sections) -> dict:
    """A tiny training config (TOML-shaped); `sections` override keys: config_dict(train={"steps": 3})."""
    base = {
        "model": {"vae": dict(TINY_VAE)},
        "data": {"source": "synthetic:shapes", "frames": 9, "height": 16, "width": 24, "batch_size": 2,
                 "validation_clips": 2, "length": 32, "seed": 0},
        "loss": {"kl_weight": 1e-6, "lpips_weight": 0.1, "lpips_backbone": "random", "gan_weight": 0.1,
                 "gan_start_step": 2, "gradient_penalty_weight": 0.0,
                 "lpips_chunk_pixels": 5 * 16 * 24},  # LPIPS on 5 frames at a time: 4 chunks of a batch's 18
        "discriminator": {"channels": 8, "layers": 2},
        "optim": {"lr": 2e-3, "disc_lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"},
        "train": {"steps": 4, "checkpoint_every": 2, "validate_every": 0, "log_every": 1, "seed": 0,
                  "device": "cpu"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return base


def make_config(**sections):
    from cogvx.train.config import VAETrainConfig
    return VAETrainConfig.from_dict(config_dict(**sections))


def write_toml(path: Path, config: dict) -> Path:
    def value(v):
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)
    lines = []
    for name, table in config.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- metrics ------------------------------------------------------------------------------------------
def test_psnr_known_cases():
    x = torch.rand(1, 3, 2, 8, 8, dtype=torch.float64)
    assert psnr(x, x) == math.inf
    y = x + 0.1  # MSE 0.01 on a range of 1: 20 dB
    assert psnr(x, y) == pytest.approx(20.0, abs=1e-9)
    assert psnr(x * 2, y * 2, data_range=2.0) == pytest.approx(20.0, abs=1e-9)


def test_ssim_known_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16, generator=g)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant frames a and b: SSIM = (2ab + C1)/(a² + b² + C1) (the structure term is C2/C2 = 1)
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    assert ssim(torch.full((1, 1, 1, 16, 16), a), torch.full((1, 1, 1, 16, 16), b)) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert 0 < ssim(x, noisy) < ssim(x, (x + noisy) / 2) < 1  # closer → higher
    # per frame: a shifted frame order changes it (frames are not pooled together)
    assert ssim(x, x.roll(1, dims=2)) < 0.5


def test_ssim_matches_a_direct_computation():
    """One frame, one channel: the window sums written out by hand at one position (valid region)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(11, 11, generator=g, dtype=torch.float64), torch.rand(11, 11, generator=g, dtype=torch.float64)
    k = torch.exp(-(torch.arange(11.0, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(k, k) / k.sum() ** 2
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2, (w * x * y).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = ((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).item()
    assert ssim(x[None, None, None].float(), y[None, None, None].float()) == pytest.approx(want, rel=1e-5)


def test_lr_schedule():
    f = lr_lambda(4, 12, "cosine")
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    c = lr_lambda(0, 10, "constant")
    assert {c(s) for s in range(20)} == {1.0}


def test_noise_depends_on_the_sample_not_the_split():
    whole = sample_noise((4, 2, 3, 2, 2), 7, 5, 0, [0, 1, 2, 3], "cpu", torch.float32)
    ranks = [sample_noise((2, 2, 3, 2, 2), 7, 5, 0, [r, r + 2], "cpu", torch.float32) for r in range(2)]
    assert torch.equal(whole, torch.stack([ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]))
    assert not torch.equal(whole, sample_noise((4, 2, 3, 2, 2), 7, 6, 0, [0, 1, 2, 3], "cpu", torch.float32))
    assert not torch.equal(whole, sample_noise((4, 2, 3, 2, 2), 7, 5, 1, [0, 1, 2, 3], "cpu", torch.float32))


def test_ema():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad


# -- gradient checkpointing ----------------------------------------------------------------------------
def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    vae = CausalVAE(TINY_VAE, chunking="whole")
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1

    def grads():
        vae.zero_grad()
        posterior = vae.encode(x)
        ((vae.decode(posterior.mean) - x) ** 2).mean().backward()
        return [p.grad.clone() for p in vae.parameters()]
    plain = grads()
    checkpointed = grads() if not vae.enable_gradient_checkpointing() else grads()
    assert all(b.gradient_checkpointing for b in vae.modules() if hasattr(b, "gradient_checkpointing"))
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- log ----------------------------------------------------------------------------------------------
def test_log_resume_drops_later_rows_and_plot(tmp_path):
    path = tmp_path / "log.csv"
    log = CSVLog(path, ["step", "rec", "lr"])
    for step in range(1, 6):
        log.write({"step": step, "rec": 1.0 / step, "lr": None if step == 2 else 1e-3})
    log.close()
    log = CSVLog(path, ["step", "rec", "lr"], resume_step=3)  # resumed from checkpoint-3
    log.write({"step": 4, "rec": 0.5})
    log.close()
    columns, rows = read_log(path)
    assert columns == ["step", "rec", "lr"] and [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert float(rows[0]["rec"]) == 1.0 and rows[1]["lr"] == "" and float(rows[3]["rec"]) == 0.5
    with pytest.raises(ValueError, match="columns"):
        CSVLog(path, ["step", "other"], resume_step=3)
    png = plot_log(path, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".curves*"))  # no temporary left


# -- checkpoints ----------------------------------------------------------------------------------------
def _parts(seed=0, vae_config=TINY_VAE):
    from cogvx.train.losses import Discriminator3D
    torch.manual_seed(seed)
    vae = CausalVAE(vae_config, chunking="whole")
    disc = Discriminator3D(3, 8, 2)
    opts = {"vae": torch.optim.AdamW(vae.parameters(), lr=1e-3), "discriminator": torch.optim.AdamW(disc.parameters())}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 10, "cosine")) for k, o in opts.items()}
    return vae, disc, opts, scheds


def _models(vae, disc, ema=None):
    """The VAE trainer's checkpointed parts."""
    return {"vae": vae, "discriminator": disc, **({"vae_ema": ema.model} if ema else {})}


def _one_step(vae, disc, opts, scheds):
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    loss = ((vae.decode(vae.encode(x).mean) - x) ** 2).mean() + disc(x).mean()
    loss.backward()
    for o in opts.values():
        o.step()
    for s in scheds.values():
        s.step()


def test_checkpoint_round_trip_keep_and_diffusers_loads_it(tmp_path):
    import diffusers
    vae, disc, opts, scheds = _parts()
    _one_step(vae, disc, opts, scheds)
    ema = EMA(vae, 0.5)
    config = make_config()
    for step in (1, 2, 3, 4):
        folder = ckpt.save_checkpoint(tmp_path, step, models=_models(vae, disc, ema), optimizers=opts,
                                      schedulers=scheds, data_position=step * 10, config=config, keep=2)
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [3, 4] and ckpt.latest_checkpoint(tmp_path) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]  # no temporaries left
    assert {p.name for p in folder.iterdir()} == {"vae", "vae_ema", "discriminator.safetensors",
                                                   "training_state.pt", "train_config.json"}
    torch.manual_seed(123)
    expected_after = torch.rand(3)  # the RNG continues as it would have after the save
    # restore into fresh objects
    vae2, disc2, opts2, scheds2 = _parts(seed=1)
    ema2 = EMA(vae2, 0.5)
    torch.manual_seed(123)
    state = ckpt.load_checkpoint(folder, models=_models(vae2, disc2, ema2), optimizers=opts2, schedulers=scheds2)
    assert state["step"] == 4 and state["data_position"] == 40 and state["config"]["train"]["steps"] == 4
    for a, b in zip([*vae.state_dict().values(), *disc.state_dict().values()],
                    [*vae2.state_dict().values(), *disc2.state_dict().values()]):
        assert torch.equal(a, b)
    assert opts2["vae"].state_dict()["state"][0]["step"] == 1 and scheds2["vae"].last_epoch == 1
    torch.testing.assert_close(opts2["vae"].state_dict()["state"][3]["exp_avg"],
                               opts["vae"].state_dict()["state"][3]["exp_avg"], rtol=0, atol=0)
    assert not torch.equal(torch.rand(3), expected_after)  # set to the state at saving, not left at 123
    # the same step again (a resumed run ending where it started) replaces the folder whole
    ckpt.save_checkpoint(tmp_path, 4, models=_models(vae, disc, ema), optimizers=opts, schedulers=scheds,
                         data_position=41, config=config, keep=2)
    assert ckpt.load_checkpoint(folder, models=_models(vae2, disc2, ema2), optimizers=opts2,
                                schedulers=scheds2)["data_position"] == 41
    # diffusers loads the VAE folder and decodes the same
    theirs = diffusers.AutoencoderKLCogVideoX.from_pretrained(folder / "vae").eval()
    ours = CausalVAE.from_pretrained(folder / "vae")
    z = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_incompatible_checkpoint_is_a_clear_error_and_kept(tmp_path):
    vae, disc, opts, scheds = _parts()
    folder = ckpt.save_checkpoint(tmp_path, 2, models=_models(vae, disc), optimizers=opts, schedulers=scheds,
                                  data_position=0, config=make_config())
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    other = dict(TINY_VAE, latent_channels=8)
    vae2, disc2, opts2, scheds2 = _parts(vae_config=other)
    before = [p.clone() for p in vae2.parameters()]
    with pytest.raises(ckpt.CheckpointError, match=r"latent_channels: checkpoint 4, now 8"):
        ckpt.load_checkpoint(folder, models=_models(vae2, disc2), optimizers=opts2, schedulers=scheds2)
    assert all(torch.equal(a, b) for a, b in zip(before, vae2.parameters()))  # nothing changed
    from cogvx.train.losses import Discriminator3D
    with pytest.raises(ckpt.CheckpointError, match="discriminator tensor"):
        ckpt.load_checkpoint(folder, models=_models(vae, Discriminator3D(3, 16, 2)), optimizers=opts,
                             schedulers=scheds)
    with pytest.raises(ckpt.CheckpointError, match=r"optimizers: checkpoint \['discriminator', 'vae'\], now \['vae'\]"):
        ckpt.load_checkpoint(folder, models=_models(vae, disc), optimizers={"vae": opts["vae"]}, schedulers=scheds)
    (folder / "discriminator.safetensors").rename(tmp_path / "moved")
    with pytest.raises(ckpt.CheckpointError, match="incomplete or of another kind of run: missing discriminator.safetensors"):
        ckpt.load_checkpoint(folder, models=_models(vae, disc), optimizers=opts, schedulers=scheds)
    (tmp_path / "moved").rename(folder / "discriminator.safetensors")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == files
    ckpt.load_checkpoint(folder, models=_models(vae, disc), optimizers=opts, schedulers=scheds)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    vae, disc, opts, scheds = _parts()
    kwargs = dict(models=_models(vae, disc), optimizers=opts, schedulers=scheds, data_position=0, config={})
    good = ckpt.save_checkpoint(tmp_path, 1, **kwargs, keep=1)

    class Broken:
        def state_dict(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, **{**kwargs, "schedulers": {"vae": Broken()}}, keep=1)
    assert ckpt.checkpoints(tmp_path) == [(1, good)] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


# -- the loop -------------------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    """Two training clips, batch 2: every step sees the same clips (the KL weight tiny, GAN and LPIPS
    off); the reconstruction loss falls, and the checkpoint at the end is a diffusers VAE folder."""
    import diffusers
    from cogvx.train.vae import train_vae
    config = make_config(data={"length": 3, "validation_clips": 1},
                         loss={"lpips_weight": 0.0, "gan_weight": 0.0},
                         optim={"lr": 5e-3, "warmup_steps": 0, "schedule": "constant"},
                         train={"steps": 6, "checkpoint_every": 6, "validate_every": 3})
    result = train_vae(config, tmp_path / "run")
    rows = losses(tmp_path / "run")
    rec = [float(rows[s]["rec"]) for s in range(1, 7)]
    assert rec[-1] < 0.7 * rec[0], rec
    assert result["checkpoint"] == tmp_path / "run" / "checkpoint-6"
    # validation: the held-out clip (the last) reconstructed by the checkpoint's VAE, as logged
    from cogvx.train.data import make_dataset
    from cogvx.train.vae import to_unit
    clip = make_dataset("synthetic:shapes", frames=9, height=16, width=24, seed=0, length=3)[2]["video"][None]
    vae = CausalVAE.from_pretrained(result["checkpoint"] / "vae", chunking="whole")
    with torch.no_grad():
        rec = vae.decode(vae.encode(clip).mode())
    assert float(rows[6]["val_psnr"]) == pytest.approx(psnr(to_unit(clip), to_unit(rec)), rel=1e-6)
    assert float(rows[6]["val_ssim"]) == pytest.approx(ssim(to_unit(clip), to_unit(rec)), rel=1e-6)
    assert rows[3]["val_psnr"] and not rows[4]["val_psnr"]
    import av
    with av.open(str(tmp_path / "run" / "validation" / "step-6.mp4")) as f:  # input | reconstruction
        frames = [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (16, 48, 3)
    theirs = diffusers.AutoencoderKLCogVideoX.from_pretrained(result["checkpoint"] / "vae")
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in vae.parameters())




def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, deterministic):
    """Every loss term on (LPIPS, GAN from step 2 with the adaptive weight, R1, EMA, accumulation):
    an uninterrupted run of 4 steps, and one killed after logging step 3 (checkpoint-2 written,
    step 3 logged but not checkpointed) then resumed: the log's steps 3-4 are the same numbers."""
    from cogvx.train import vae as trainer
    config = make_config(data={"batch_size": 1}, loss={"gradient_penalty_weight": 1.0},
                         optim={"grad_accumulation": 2}, train={"steps": 4, "ema_decay": 0.9})
    trainer.train_vae(config, tmp_path / "whole")

    run_killed_after_step(monkeypatch, trainer, lambda: trainer.train_vae(config, tmp_path / "resumed"), 3)
    assert [s for s, _ in ckpt.checkpoints(tmp_path / "resumed")] == [2]
    assert list(losses(tmp_path / "resumed")) == [1, 2, 3]
    trainer.train_vae(config, tmp_path / "resumed", resume=True)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert list(resumed) == [1, 2, 3, 4]  # step 3 logged once
    for step in (3, 4):
        for key in ("loss", "rec", "kl", "lpips", "gan", "gan_weight", "disc", "gp", "lr", "disc_lr", "grad_norm"):
            assert resumed[step][key] == whole[step][key], (step, key)
    assert resumed[4]["gan"] != "" and float(resumed[4]["gp"]) > 0
    a = CausalVAE.from_pretrained(tmp_path / "whole" / "checkpoint-4" / "vae_ema")
    b = CausalVAE.from_pretrained(tmp_path / "resumed" / "checkpoint-4" / "vae_ema")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -- torchrun: DDP and context parallel -------------------------------------------------------------------
def _torchrun(tmp_path, config_path: Path, out: Path, world: int = 2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "cogvx", "train-vae", "--config", str(config_path), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _assert_same_step(one: Path, ranks: Path, keys, *, discriminator: bool):
    """The gradients of one step, read from AdamW's first moment (exp_avg = (1 − β1)·g after one
    step, g after clipping; the same clip factor on both sides as the grad norms agree), within fp32
    tolerance of each tensor's scale; the weights after the step; the logged losses."""
    a = CausalVAE.from_pretrained(one / "checkpoint-1" / "vae").state_dict()
    b = CausalVAE.from_pretrained(ranks / "checkpoint-1" / "vae").state_dict()
    torch.manual_seed(0)  # the trainer's seed: its initial weights
    start = CausalVAE(TINY_VAE).state_dict()  # the step moved them (lr 2e-3): the equality means something
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    states = [torch.load(d / "checkpoint-1" / ckpt.STATE, weights_only=True)["optimizers"] for d in (one, ranks)]
    for name in ("vae", "discriminator") if discriminator else ("vae",):
        sa, sb = states[0][name]["state"], states[1][name]["state"]
        assert sa.keys() == sb.keys() and len(sa) >= 10  # every tensor had a gradient
        for i in sa:
            ga, gb = sa[i]["exp_avg"], sb[i]["exp_avg"]
            assert (ga - gb).abs().max() <= 1e-4 * ga.abs().max() + 1e-12, (name, i)
    # the weights: AdamW's first step is lr·g/(|g| + 1e-8), so where |g| is near that epsilon fp32
    # rounding of g moves it by up to a step; elsewhere within 5% of a step
    for k, i in zip(a, sorted(states[0]["vae"]["state"])):
        sure = states[0]["vae"]["state"][i]["exp_avg"].abs() > 1e-7  # |g| > 1e-6
        assert torch.where(sure, b[k] - a[k], 0).abs().max() <= 1e-4, k
    ra, rb = losses(one)[1], losses(ranks)[1]
    for key in keys:
        assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-7), key


def test_ddp_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    """`torchrun --nproc_per_node=2 -m cogvx train-vae` with batch 1 per rank vs one process with
    batch 2: after one step (every loss on: LPIPS, GAN from step 0 with the adaptive weight, R1) the
    VAE and discriminator weights and the logged losses agree within fp32 tolerance."""
    from cogvx.train.vae import train_vae
    sections = dict(loss={"gan_start_step": 0, "gradient_penalty_weight": 1.0},
                    train={"steps": 1, "checkpoint_every": 1})
    train_vae(make_config(**sections, data={"length": 12, "batch_size": 2}), tmp_path / "one")
    ddp = config_dict(**sections, data={"length": 12, "batch_size": 1})
    _torchrun(tmp_path, write_toml(tmp_path / "ddp.toml", ddp), tmp_path / "ddp")
    _assert_same_step(tmp_path / "one", tmp_path / "ddp",
                      ["loss", "rec", "kl", "lpips", "gan", "gan_weight", "disc", "gp", "grad_norm"],
                      discriminator=True)


def test_context_parallel_two_gloo_ranks_equal_one_process(tmp_path):
    """Stage 2: the same config with train.context_parallel, one process vs two ranks splitting the 9
    frames (1 + 2 latent frames): one step's VAE weights and losses agree (GAN off: under context
    parallelism the discriminator judges each rank's frames)."""
    from cogvx.train.vae import train_vae
    config = config_dict(data={"length": 6, "batch_size": 2}, loss={"gan_weight": 0.0},
                         train={"steps": 1, "checkpoint_every": 1, "context_parallel": True})
    train_vae(make_config(**{k: config[k] for k in ("data", "loss", "train")}), tmp_path / "one")
    _torchrun(tmp_path, write_toml(tmp_path / "cp.toml", config), tmp_path / "cp")
    _assert_same_step(tmp_path / "one", tmp_path / "cp", ["loss", "rec", "kl", "lpips", "grad_norm"],
                      discriminator=False)


# -- the command line -----------------------------------------------------------------------------------
def _cli(*args):
    from cogvx import cli
    return cli.main(list(args))


@pytest.mark.parametrize("change, says", [
    ({"data": {"frames": 8}}, "data.frames must be 1 + 8·k"),
    ({"data": {"frames": 13}}, "data.frames must be 1 + 8·k"),  # 4 latent frames decode to 16
    ({"loss": {"lpips_weight": 0.1, "lpips_backbone": "missing-vgg16.pth"}}, "vgg16"),
    ({"train": {"stepz": 3}}, "unknown key train.stepz"),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys, change, says):
    path = write_toml(tmp_path / "bad.toml", config_dict(**change))
    assert _cli("train-vae", "--config", str(path), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvx: error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run" / "log.csv").exists()


def test_cli_resume_errors_keep_the_checkpoint(tmp_path, capsys):
    from cogvx.train.vae import train_vae
    assert _cli("train-vae", "--config", str(tmp_path / "nowhere.toml")) == 2
    assert "nowhere.toml" in capsys.readouterr().err
    path = write_toml(tmp_path / "run.toml", config_dict(train={"steps": 1, "checkpoint_every": 1}))
    assert _cli("train-vae", "--config", str(path), "--out", str(tmp_path / "run"), "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    train_vae(make_config(loss={"lpips_weight": 0.0}, train={"steps": 1, "checkpoint_every": 1}), tmp_path / "run")
    folder = tmp_path / "run" / "checkpoint-1"
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert _cli("train-vae", "--config", str(path), "--out", str(tmp_path / "run")) == 2  # no --resume
    assert "already has checkpoints (latest checkpoint-1): pass --resume" in capsys.readouterr().err
    other = write_toml(tmp_path / "other.toml", config_dict(model={"vae": dict(TINY_VAE, latent_channels=8)},
                                                            train={"steps": 2}))
    assert _cli("train-vae", "--config", str(other), "--out", str(tmp_path / "run"), "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latent_channels: checkpoint 4, now 8" in err, err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


def test_cli_plot_log(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("step,rec,lr,val_psnr\n1,0.5,1e-4,\n2,0.25,1e-4,20.5\n3,0.2,5e-5,\n")
    assert _cli("plot-log", str(log), "--out", str(tmp_path / "curves.png")) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert _cli("plot-log", str(tmp_path / "none.csv"), "--out", str(tmp_path / "c.png")) == 2
    assert _cli("plot-log", str(log), "--out", str(tmp_path / "curves.jpg")) == 2
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert _cli("plot-log", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "c.png")) == 2
    err = capsys.readouterr().err
    assert err.count("cogvx: error:") == 3 and "no 'step' column" in err


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    """A captioned folder of images (1-frame clips) with a corrupt and a missing file among the
    training clips: training goes on, the log counts them; a folder with no readable file stops
    before training with one line."""
    import json
    from PIL import Image
    from cogvx.train.vae import train_vae
    folder = tmp_path / "data"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        pixels = (torch.rand(20, 30, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append({"path": f"{i}.png", "caption": f"image {i}"})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines[1:1] = [{"path": "corrupt.png", "caption": "broken"}, {"path": "missing.png", "caption": "gone"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    # 6 lines: the last held out, 5 to train on (2 unreadable); 2 steps of 2 clips draw 4 of the 5
    config = make_config(data={"source": str(folder), "frames": 1, "validation_clips": 1},
                         loss={"lpips_weight": 0.0, "gan_weight": 0.0}, train={"steps": 2, "checkpoint_every": 2})
    with pytest.warns(UserWarning, match="skipping"):
        train_vae(config, tmp_path / "run")
    assert sum(int(r["skipped"]) for r in losses(tmp_path / "run").values()) >= 1
    for name in ("0.png", "1.png", "2.png", "3.png"):
        (folder / name).write_bytes(b"broken")
    path = write_toml(tmp_path / "none.toml", config_dict(data={"source": str(folder), "frames": 1}))
    capsys.readouterr()  # the run's progress bar
    assert _cli("train-vae", "--config", str(path), "--out", str(tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.source" in err and "can be read" in err, err


def test_sigterm_keeps_the_checkpoints_and_resume_continues(tmp_path, capsys):
    """A real kill: `python -m cogvx train-vae` sent SIGTERM once checkpoint-2 exists exits 143 with
    one line naming the latest checkpoint, leaving no temporary behind; --resume continues from it
    and the log has every step once."""
    import signal
    import time
    config = config_dict(data={"batch_size": 1}, loss={"lpips_weight": 0.0, "gan_weight": 0.0},
                         train={"steps": 1000, "checkpoint_every": 1, "validate_every": 0})
    path = write_toml(tmp_path / "run.toml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cogvx", "train-vae", "--config", str(path), "--out",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "checkpoint-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest is not None and last == f"cogvx: terminated; the latest checkpoint is {latest}: continue with --resume"
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary left
    done = int(latest.name.split("-")[1])
    config["train"]["steps"] = done + 1
    write_toml(path, config)
    assert _cli("train-vae", "--config", str(path), "--out", str(tmp_path / "run"), "--resume") == 0
    assert list(losses(tmp_path / "run")) == list(range(1, done + 2))
    assert "resumed from" in capsys.readouterr().out
