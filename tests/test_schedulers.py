"""cogvx.schedulers against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler: step by step,
same generator, the configs CogVideoX ships (v-prediction, trailing, zero-terminal SNR, SNR shift)."""
import json
import math

import pytest
import torch

from cogvx.schedulers import DDIMScheduler, DPMScheduler, GenericDDIMScheduler, dynamic_guidance, load_scheduler

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


def _run(ours, ref, steps, seed=0):
    """Step both schedulers through the same model outputs; every step's sample must be equal."""
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(seed)
    theirs = mine = torch.randn(2, 3, 4, 5, 6, generator=g)
    for i, t in enumerate(ref.timesteps):
        output = torch.randn(theirs.shape, generator=g) * 3  # large enough that clip_sample clips
        theirs = ref.step(output, t, theirs, return_dict=False)[0]
        mine = ours.step(output, t, mine)
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0, msg=f"step {i} (t={int(t)})")


@pytest.mark.parametrize("config", [{}, {**COGVIDEOX, "snr_shift_scale": None}, {"clip_sample": False,
                                     "beta_schedule": "scaled_linear", "set_alpha_to_one": False}],
                         ids=["defaults", "cogvideox-like", "scaled-no-clip"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_folder_naming_generic_ddim_steps_like_diffusers_ddim(tmp_path, config, steps):
    """diffusers' own CogVideoX test folders hold `DDIMScheduler()`: its keys (thresholding, ...)
    load, and the steps are that class's, forced to "ddim" or not."""
    config = {k: v for k, v in config.items() if v is not None and k != "snr_shift_scale"}
    ref = schedulers.DDIMScheduler(**config)
    ref.save_config(tmp_path)
    assert "thresholding" in json.loads((tmp_path / "scheduler_config.json").read_text())
    for kind in (None, "ddim"):
        ours = load_scheduler(tmp_path, kind)
        assert type(ours) is GenericDDIMScheduler
        _run(ours, schedulers.DDIMScheduler.from_config(ref.config), steps)


def test_generic_ddim_keys_refused_when_they_change_the_sampler(tmp_path):
    path = tmp_path / "scheduler_config.json"
    schedulers.DDIMScheduler(thresholding=True).save_config(tmp_path)
    with pytest.raises(ValueError, match="scheduler_config.json.*thresholding must be false"):
        load_scheduler(tmp_path)
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "thresholding": False, "dynamic_thresholding_ratio": "high"}))
    with pytest.raises(ValueError, match="'dynamic_thresholding_ratio' must be a number in"):
        load_scheduler(tmp_path, "dpm")


def test_forced_kind_on_dpm_solver_folder_drops_its_solver_keys(tmp_path):
    """`kind` replaces a DPMSolverMultistepScheduler folder's solver (its keys dropped, as diffusers'
    from_config does); sigma schedules ours cannot follow are refused by name."""
    schedulers.DPMSolverMultistepScheduler(**{k: v for k, v in COGVIDEOX.items() if k not in (
        "snr_shift_scale", "set_alpha_to_one", "clip_sample")}).save_config(tmp_path)
    with pytest.raises(ValueError, match="names scheduler 'DPMSolverMultistepScheduler'"):
        load_scheduler(tmp_path)
    ours = load_scheduler(tmp_path, "dpm")
    assert type(ours) is DPMScheduler and ours.config.prediction_type == "v_prediction"
    _run(load_scheduler(tmp_path, "ddim"), schedulers.CogVideoXDDIMScheduler.from_config(
        json.loads((tmp_path / "scheduler_config.json").read_text())), 7)
    schedulers.DPMSolverMultistepScheduler(use_karras_sigmas=True).save_config(tmp_path)
    with pytest.raises(ValueError, match="sets use_karras_sigmas"):
        load_scheduler(tmp_path, "dpm")


@pytest.mark.parametrize("change, message", [
    ({"num_train_timesteps": "1000"}, "'num_train_timesteps' must be a positive integer; got '1000'"),
    ({"snr_shift_scale": 0}, "'snr_shift_scale' must be a positive number"),
    ({"rescale_betas_zero_snr": 1}, "'rescale_betas_zero_snr' must be a boolean"),
    ({"beta_end": float("inf")}, "'beta_end' must be a number in"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values for num_train_timesteps 1000"),
])
def test_scheduler_config_values_checked_naming_file_and_key(tmp_path, change, message):
    schedulers.CogVideoXDDIMScheduler(**COGVIDEOX).save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=f"invalid scheduler config in '{path}': {message}"):
        load_scheduler(tmp_path)


def test_scheduler_config_file_not_an_object(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"'{path}' must hold a JSON object.*got an array"):
        load_scheduler(tmp_path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=f"'{path}' is not UTF-8"):
        load_scheduler(tmp_path)
