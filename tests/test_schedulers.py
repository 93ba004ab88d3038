"""cogvx.schedulers against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler: step by step,
same generator, the configs CogVideoX ships (v-prediction, trailing, zero-terminal SNR, SNR shift)."""
import json
import math

import pytest
import torch

from cogvx.schedulers import DDIMScheduler, DPMScheduler, dynamic_guidance, load_scheduler

schedulers = pytest.importorskip("diffusers.schedulers")

COGVIDEOX = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
                 rescale_betas_zero_snr=True, snr_shift_scale=3.0, set_alpha_to_one=True, clip_sample=False)


@pytest.mark.parametrize("config", [COGVIDEOX, {**COGVIDEOX, "snr_shift_scale": 1.0},
                                    {**COGVIDEOX, "timestep_spacing": "leading", "prediction_type": "epsilon"}],
                         ids=["cogvideox", "snr-shift-1", "leading-eps"])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_steps_match_diffusers(kind, config, steps):
    ref = (schedulers.CogVideoXDDIMScheduler if kind == "ddim" else schedulers.CogVideoXDPMScheduler)(**config)
    ours = (DDIMScheduler if kind == "ddim" else DPMScheduler)(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 5, 6, generator=g)
    theirs, mine = sample.clone(), sample.clone()
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    old = None
    for i, t in enumerate(ref.timesteps):
        output = torch.randn(sample.shape, generator=g)
        if kind == "ddim":
            theirs = ref.step(output, t, theirs, generator=g_ref, return_dict=False)[0]
            mine = ours.step(output, t, mine, generator=g_ours)
        else:
            back = ref.timesteps[i - 1] if i > 0 else None
            theirs, old = ref.step(output, old, t, back, theirs, generator=g_ref, return_dict=False)
            mine = ours.step(output, t, mine, timestep_back=back, generator=g_ours)
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0, msg=f"step {i} (t={int(t)})")
    # the same number of draws: the generators are in the same state
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours))


def test_add_noise_matches_diffusers():
    ref, ours = schedulers.CogVideoXDDIMScheduler(**COGVIDEOX), DDIMScheduler(COGVIDEOX)
    x, noise, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([999, 10])
    torch.testing.assert_close(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), atol=0, rtol=0)


def test_dynamic_guidance_is_diffusers_formula_in_float64():
    for steps in (10, 50):
        for t in (999, 666, 500, 3, 0):
            expected = 1 + 6.0 * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)
            assert dynamic_guidance(6.0, t, steps) == expected
    # float32 would give another value for this step (why the formula is evaluated in Python floats)
    f32 = 1 + 6.0 * ((1 - torch.cos(math.pi * ((torch.tensor(3.0) - 666) / 3) ** 5.0).item()) / 2)
    assert f32 != dynamic_guidance(6.0, 666, 3)


def test_load_scheduler_reads_configs_and_refuses_unknown(tmp_path):
    ref = schedulers.CogVideoXDPMScheduler(**COGVIDEOX)
    ref.save_pretrained(tmp_path / "scheduler")
    assert isinstance(load_scheduler(tmp_path), DPMScheduler)                     # pipeline root
    assert isinstance(load_scheduler(tmp_path / "scheduler", "ddim"), DDIMScheduler)
    assert load_scheduler(tmp_path, "ddim").config.rescale_betas_zero_snr is True
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        load_scheduler(tmp_path, "euler")
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "PNDMScheduler"}))
    with pytest.raises(ValueError, match="names scheduler 'PNDMScheduler'"):
        load_scheduler(tmp_path)
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        load_scheduler(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        DDIMScheduler().set_timesteps(0)
