"""LoRA adapters on the transformer through `peft`, saved in the layout diffusers'
`CogVideoXPipeline.load_lora_weights` reads: `pytorch_lora_weights.safetensors` whose keys are peft's
without the adapter name, prefixed `transformer.` (`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`),
and whose `lora_adapter_metadata` holds the LoraConfig (rank, alpha, targets, dropout), so an alpha
other than the rank scales as trained.

    config = add_lora(transformer, rank=64, alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    LoRAWeights(transformer, config)   # a checkpoint part: state_dict() in diffusers' keys
"""
from __future__ import annotations

import json

import torch
from torch import nn

from .checkpoint import copy_full_into

ADAPTER = "default"  # peft's adapter name; diffusers' keys leave it out
WEIGHT_NAME = "pytorch_lora_weights"  # .safetensors: diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "transformer."  # CogVideoXLoraLoaderMixin.transformer_name
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def add_lora(model: nn.Module, *, rank: int, alpha: float, target_modules, dropout: float = 0.0):
    """Freeze `model` and inject LoRA adapters (peft's `inject_adapter_in_model`, lora_B zero: the
    model's output is unchanged until they train) into the Linear layers named by target_modules.
    Returns the peft LoraConfig. A target that matches nothing raises ValueError naming it."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        init_lora_weights=True)
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        raise ValueError(f"no Linear layer of the transformer matches the LoRA targets {list(target_modules)}: "
                         f"{exc}") from None
    return config


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by peft name (…to_q.lora_A.default.weight)."""
    return {name: p for name, p in model.named_parameters() if f".{ADAPTER}." in name and ".lora_" in name}


def diffusers_key(name: str) -> str:
    """peft's parameter name -> the key diffusers' CogVideoX LoRA files use."""
    return PREFIX + name.replace(f".{ADAPTER}.", ".")


def adapter_metadata(config) -> dict[str, str]:
    """The safetensors metadata diffusers reads the LoraConfig from: only the keys every peft
    version takes (LoraConfig(**metadata) is how it is read back)."""
    keys = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "lora_dropout": config.lora_dropout}
    return {METADATA_KEY: json.dumps({PREFIX + k: v for k, v in keys.items()}, indent=2, sort_keys=True)}


class LoRAWeights:
    """A model's LoRA adapters (or averages of them: `tensors`, e.g. a ParameterEMA's shadow, by
    peft name) as a checkpoint part, in diffusers' keys and file metadata. FSDP shards are DTensors:
    the checkpoint gathers them; load_state_dict gives each rank its shard."""

    def __init__(self, model: nn.Module, config, tensors: dict[str, torch.Tensor] | None = None):
        self.tensors = lora_parameters(model) if tensors is None else tensors
        if not self.tensors:
            raise ValueError("the model has no LoRA adapters (add_lora first)")
        self.safetensors_metadata = adapter_metadata(config)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {diffusers_key(name): t for name, t in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {diffusers_key(name) for name in self.tensors}
        if expected != set(state):
            raise ValueError(f"LoRA tensors differ: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        for name, tensor in self.tensors.items():
            copy_full_into(tensor, state[diffusers_key(name)])
