"""A tiny CogVideoX pipeline folder with random weights, in diffusers' layout, built with our own
modules (no diffusers needed): the tests' fixture, and stage 2 of `cogvx train-default-model`, which
puts the trained VAE and transformer into it (cogvx/train/default_model.py).

    python -m cogvx.tiny FOLDER        # writes model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .loading import DIFFUSERS_VERSION
from .models import CausalVAE, Transformer3D

TEXT_DIM = 32
# a small English word list: prompts tokenize to something, words outside it become <unk>
WORDS = ("a an the of in on at with and to from by over under near into through is are was were "
         "cat dog bird fish horse cow sheep person man woman child people robot car boat ship plane train "
         "tree flower grass forest mountain river lake sea ocean beach sky cloud sun moon star rain snow "
         "city street house room road bridge field desert garden park night day morning evening "
         "red green blue yellow white black golden bright dark small big large tiny old young slow fast "
         "walking running flying swimming dancing playing sitting standing jumping sleeping eating "
         "camera view close shot wide slowly gently water fire light wind video scene "
         # the captions of the synthetic dataset the embedded model learns (cogvx.train.data.SyntheticShapes)
         "square circle triangle moving left right up down gray").split()

TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
                   text_embed_dim=TEXT_DIM, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
                   patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True)
VAE = dict(block_out_channels=[16, 16, 32, 32], latent_channels=4, layers_per_block=1, norm_num_groups=4,
           sample_height=64, sample_width=96, scaling_factor=0.7)
# CogVideoX-5B's sampler settings
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                 timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=1.0)


def _tokenizer(folder: Path, words: tuple[str, ...]) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=226)
    fast.save_pretrained(folder)


def _text_encoder(folder: Path, vocab_size: int, width: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    T5EncoderModel(config).save_pretrained(folder)


# image-to-video variants: the latent of the image enters on the channels (in_channels doubled);
# 5B-I2V adds a learned position table, 1.5-I2V temporal patches, the ofs embedding and inverted scaling
VARIANTS = {
    "t2v": (dict(), dict()),
    "i2v": (dict(in_channels=8, use_learned_positional_embeddings=True), dict()),
    "i2v-1.5": (dict(in_channels=8, patch_size_t=2, ofs_embed_dim=32), dict(invert_scale_latents=True)),
}


def build(folder: str | Path, *, seed: int = 0, scheduler: str = "CogVideoXDPMScheduler", variant: str = "t2v",
          transformer: dict | None = None, vae: dict | None = None, words: tuple[str, ...] = WORDS) -> Path:
    """Write the pipeline folder; `transformer` / `vae` override config entries (e.g. real widths
    for a benchmark: the text encoder's width follows the transformer's text_embed_dim); `words`
    are the tokenizer's vocabulary (any other word becomes <unk>)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer_changes, vae_changes = VARIANTS[variant]
    transformer_config = {**TRANSFORMER, **transformer_changes, **(transformer or {})}
    Transformer3D(transformer_config).save_pretrained(folder / "transformer")
    vae = CausalVAE({**VAE, **vae_changes, **(vae or {})})
    with torch.no_grad():  # random GroupNorm affines: a little more structure than ones and zeros
        for name, p in vae.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    vae.save_pretrained(folder / "vae")
    _tokenizer(folder / "tokenizer", words)
    _text_encoder(folder / "text_encoder", len(words) + 3, transformer_config["text_embed_dim"])
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": scheduler, "_diffusers_version": DIFFUSERS_VERSION, **SCHEDULER}, indent=2))
    index = {"_class_name": "CogVideoXPipeline" if variant == "t2v" else "CogVideoXImageToVideoPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLCogVideoX"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cogvx.tiny FOLDER")
    print(build(sys.argv[1]))
