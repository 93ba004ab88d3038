"""CogVideoX's samplers: DDIM (deterministic) and DPM-Solver++ 2M (stochastic), v-prediction over a
scaled-linear beta schedule with CogVideoX's SNR shift, optional zero-terminal-SNR rescale, trailing
timesteps. They read diffusers' `scheduler_config.json` and follow `CogVideoXDDIMScheduler` /
`CogVideoXDPMScheduler` operation by operation (float64 schedule, the same draws from the
generator in the same order), so a seeded run gives diffusers' numbers; a folder naming diffusers'
generic `DDIMScheduler` (its CogVideoX test folders do) gets that class's DDIM.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import loading
from ._random import randn
from .loading import DiffusersConfig


@dataclass(frozen=True)
class SchedulerConfig(DiffusersConfig):
    """diffusers' CogVideoX scheduler config (same keys and defaults)."""
    MODEL = "scheduler"
    num_train_timesteps: loading.PositiveInt = 1000
    beta_start: loading.UnitFloat = 0.00085
    beta_end: loading.UnitFloat = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[loading.UnitFloat, ...] | None = None
    clip_sample: bool = True  # read by the generic DDIM only (CogVideoX's samplers never clip)
    set_alpha_to_one: bool = True
    steps_offset: loading.NonNegativeInt = 0
    prediction_type: str = "epsilon"
    clip_sample_range: loading.PositiveFloat = 1.0
    sample_max_value: loading.PositiveFloat = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: loading.PositiveFloat = 3.0
    # diffusers' DDIMScheduler / DPMSolverMultistepScheduler write these; thresholding is not implemented
    thresholding: bool = False
    dynamic_thresholding_ratio: loading.UnitFloat = 0.995

    def problems(self) -> list[str]:
        problems = []
        if self.beta_schedule not in ("linear", "scaled_linear") and self.trained_betas is None:
            problems.append(f"beta_schedule must be 'linear' or 'scaled_linear'; got {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            problems.append(f"prediction_type must be epsilon, sample or v_prediction; got {self.prediction_type!r}")
        if self.timestep_spacing not in ("linspace", "leading", "trailing"):
            problems.append(f"timestep_spacing must be linspace, leading or trailing; got {self.timestep_spacing!r}")
        if self.thresholding:
            problems.append("thresholding must be false: dynamic thresholding of the x0 prediction is not implemented")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            problems.append(f"trained_betas has {len(self.trained_betas)} values for num_train_timesteps "
                            f"{self.num_train_timesteps}")
        return problems


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so that the last step has zero SNR and the first keeps its value."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root ** 2


class CogVideoXScheduler:
    """What DDIM and DPM share: the noise schedule, the timesteps, x0 from the model output, add_noise."""

    CLASS_NAMES: tuple[str, ...] = ()
    DEFAULTS: dict = {}  # config values where the diffusers class's defaults differ from CogVideoX's

    def __init__(self, config: SchedulerConfig | dict | None = None):
        if config is None or isinstance(config, dict):
            config = {**self.DEFAULTS, **(config or {})}
        self.config = c = SchedulerConfig.of(config)
        self.alphas_cumprod = self._alphas_cumprod(c)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    @staticmethod
    def _betas(c: SchedulerConfig, scaled_dtype: torch.dtype) -> torch.Tensor:
        if c.trained_betas is not None:
            return torch.tensor(c.trained_betas, dtype=torch.float32)
        if c.beta_schedule == "linear":
            return torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
        return torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps, dtype=scaled_dtype) ** 2

    def _alphas_cumprod(self, c: SchedulerConfig) -> torch.Tensor:
        alphas_cumprod = torch.cumprod(1.0 - self._betas(c, torch.float64), dim=0)
        # CogVideoX's SNR shift: SNR divided by snr_shift_scale at every step
        alphas_cumprod = alphas_cumprod / (c.snr_shift_scale + (1 - c.snr_shift_scale) * alphas_cumprod)
        return rescale_zero_terminal_snr(alphas_cumprod) if c.rescale_betas_zero_snr else alphas_cumprod

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        c = self.config
        if not 0 < num_inference_steps <= c.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {c.num_train_timesteps}]; got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        if c.timestep_spacing == "linspace":
            steps = np.linspace(0, c.num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = c.num_train_timesteps // num_inference_steps
            steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64) + c.steps_offset
        else:  # trailing: from the last training step down
            ratio = c.num_train_timesteps / num_inference_steps
            steps = np.round(np.arange(c.num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
        self.timesteps = torch.from_numpy(steps).to(device)

    def _alphas(self, timestep: int):
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        prev = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return alpha_prod_t, alpha_prod_prev, prev

    def _original_sample(self, model_output, sample, alpha_prod_t):
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        if kind == "sample":
            return model_output
        return alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output  # v-prediction

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise (video-to-video: noising the encoded video to `strength`)."""
        alphas = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)[timesteps.to(original.device)]
        shape = (-1,) + (1,) * (original.dim() - 1)
        return (alphas ** 0.5).reshape(shape) * original + ((1 - alphas) ** 0.5).reshape(shape) * noise


class DDIMScheduler(CogVideoXScheduler):
    """Deterministic DDIM (eta 0): draws nothing from the generator."""

    CLASS_NAMES = ("CogVideoXDDIMScheduler",)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, **_) -> torch.Tensor:
        alpha_prod_t, alpha_prod_prev, _ = self._alphas(timestep)
        original = self._original_sample(model_output, sample, alpha_prod_t)
        a_t = ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) ** 0.5
        b_t = alpha_prod_prev ** 0.5 - alpha_prod_t ** 0.5 * a_t
        return a_t * sample + b_t * original


class GenericDDIMScheduler(DDIMScheduler):
    """diffusers' generic `DDIMScheduler` at eta 0, as its CogVideoX pipeline runs it when a folder
    names it: its defaults, no SNR shift, a float32 schedule (zero-terminal SNR rescaled through the
    betas), x0 clipped to ±clip_sample_range when clip_sample, the step written with the noise."""

    CLASS_NAMES = ("DDIMScheduler",)
    DEFAULTS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")

    def _alphas_cumprod(self, c: SchedulerConfig) -> torch.Tensor:
        betas = self._betas(c, torch.float32)
        if c.rescale_betas_zero_snr:  # diffusers rescales ᾱ, then turns it back into betas
            bar = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
            betas = 1 - torch.cat([bar[0:1], bar[1:] / bar[:-1]])
        return torch.cumprod(1.0 - betas, dim=0)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, **_) -> torch.Tensor:
        alpha_prod_t, alpha_prod_prev, _ = self._alphas(timestep)
        beta_prod_t = 1 - alpha_prod_t
        original = self._original_sample(model_output, sample, alpha_prod_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            noise = model_output
        elif kind == "sample":
            noise = (sample - alpha_prod_t ** 0.5 * original) / beta_prod_t ** 0.5
        else:
            noise = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
        if self.config.clip_sample:
            original = original.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return alpha_prod_prev ** 0.5 * original + (1 - alpha_prod_prev) ** 0.5 * noise


class DPMScheduler(CogVideoXScheduler):
    """CogVideoX's stochastic DPM-Solver++ (2M): a first-order step, then second-order steps using
    the previous step's x0 prediction. Its draws from the generator: one on the first and the last
    step, two on every step between (the first discarded), as diffusers draws them."""

    CLASS_NAMES = ("CogVideoXDPMScheduler",)

    def __init__(self, config=None):
        super().__init__(config)
        self.previous_original: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)
        self.previous_original = None

    @staticmethod
    def _half_log_snr(alpha_prod):
        return ((alpha_prod / (1 - alpha_prod)) ** 0.5).log()

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, *, timestep_back: int | None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step from `timestep` (timestep_back: the previous, larger timestep; None on the first)."""
        alpha_prod_t, alpha_prod_prev, prev = self._alphas(timestep)
        original = self._original_sample(model_output, sample, alpha_prod_t)
        lamb, lamb_next = self._half_log_snr(alpha_prod_t), self._half_log_snr(alpha_prod_prev)
        h = lamb_next - lamb
        mult1 = ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * alpha_prod_prev ** 0.5
        mult_noise = (1 - alpha_prod_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        noise = randn(sample.shape, generator, sample.device, sample.dtype)
        old, self.previous_original = self.previous_original, original
        if old is None or prev < 0:
            return mult1 * sample - mult2 * original + mult_noise * noise
        r = (lamb - self._half_log_snr(self.alphas_cumprod[timestep_back])) / h
        denoised = (1 + 1 / (2 * r)) * original - 1 / (2 * r) * old
        noise = randn(sample.shape, generator, sample.device, sample.dtype)
        return mult1 * sample - mult2 * denoised + mult_noise * noise


SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMScheduler}
CLASSES = {name: cls for cls in (DDIMScheduler, GenericDDIMScheduler, DPMScheduler) for name in cls.CLASS_NAMES}
# keys of diffusers' DPMSolverMultistepScheduler that describe its own solver: dropped when a `kind`
# replaces that solver (as diffusers' from_config drops them), except the sigma schedules, which
# change the timesteps and ours cannot follow
SOLVER_KEYS = {"solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
               "final_sigmas_type", "lambda_min_clipped", "variance_type", "flow_shift", "time_shift_type"}
SIGMA_SCHEDULE_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                       "use_flow_sigmas", "use_dynamic_shifting")


def load_scheduler(folder: str | Path, kind: str | None = None) -> CogVideoXScheduler:
    """The scheduler of a folder, of the class its config names, or of `kind` ("ddim" / "dpm") with
    the folder's schedule settings ("ddim" on a folder naming diffusers' DDIMScheduler: that one)."""
    if kind is not None and kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {sorted(SCHEDULERS)}")
    folder = Path(folder)
    path = folder / "scheduler_config.json"
    if not path.is_file():
        path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no scheduler_config.json")
    config = loading.read_json(path)
    name = config.get("_class_name")
    if kind is None:
        if name not in CLASSES:
            raise ValueError(f"{str(path)!r} names scheduler {name!r}; supported: {', '.join(CLASSES)} "
                             "(or force one with kind='ddim' / 'dpm')")
        cls = CLASSES[name]
    else:
        cls = GenericDDIMScheduler if kind == "ddim" and name in GenericDDIMScheduler.CLASS_NAMES else SCHEDULERS[kind]
        schedules = [key for key in SIGMA_SCHEDULE_KEYS if config.get(key)]
        if schedules:
            raise ValueError(f"{str(path)!r} sets {', '.join(schedules)}: a sigma schedule the CogVideoX samplers "
                             "cannot follow")
        config = {k: v for k, v in config.items() if k not in SOLVER_KEYS and k not in SIGMA_SCHEDULE_KEYS}
    return cls(SchedulerConfig.from_dict({**cls.DEFAULTS, **config}, source=path))


def dynamic_guidance(guidance_scale: float, timestep: float, num_inference_steps: int) -> float:
    """CogVideoX's "dynamic CFG" exactly as diffusers computes it, in Python floats (float64):
    g_t = 1 + g·(1 − cos(π·((S − t)/S)^5))/2, with S the number of steps and t the timestep *value*
    (0–999), not the step index. For t > S the base (S − t)/S is a large negative number and its
    fifth power huge, so g_t does not follow a smooth cosine ramp: it lands pseudo-randomly in
    [1, 1 + g] from step to step (float32 would land elsewhere: this is why float64 matters).
    Reproduced as is, because seeded runs must equal diffusers'."""
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_inference_steps - timestep) / num_inference_steps)
                                                ** 5.0)) / 2)
