"""The T5 text encoder, through `transformers` (its T5EncoderModel and tokenizer, read from local
folders): prompts -> (B, 226, 4096) embeddings, as CogVideoX's pipeline makes them (padded to the
maximum length, truncated, `</s>` appended, no attention mask); the length is the transformer's
max_text_seq_length (226 for every CogVideoX; the embedded tiny model's is shorter)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

MAX_TOKENS = 226


@contextmanager
def _load_errors(folder: Path, what: str):
    """transformers' errors for bad files (OSError, ValueError, safetensors' error, huggingface_hub's
    config validation; messages of several lines) as a one-line ValueError naming the folder; the
    original stays chained."""
    from huggingface_hub import errors
    from safetensors import SafetensorError

    names = ("StrictDataclassFieldValidationError", "StrictDataclassClassValidationError")
    bad_config = tuple(getattr(errors, name) for name in names if hasattr(errors, name))
    try:
        yield
    except (OSError, ValueError, SafetensorError, *bad_config) as exc:
        raise ValueError(f"cannot load the {what} from {str(folder)!r}: {' '.join(str(exc).split())}") from exc


def text_length(root: str | Path) -> int:
    """The transformer's `max_text_seq_length` in a pipeline folder (MAX_TOKENS without one)."""
    config = Path(root) / "transformer" / "config.json"
    if not config.is_file():
        return MAX_TOKENS
    with _load_errors(config.parent, "transformer config"):
        length = json.loads(config.read_text()).get("max_text_seq_length", MAX_TOKENS)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_text_seq_length must be a positive integer; got {length!r}")
    return length


class TextEncoder:
    def __init__(self, tokenizer, model, max_length: int = MAX_TOKENS):
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @classmethod
    def from_pretrained(cls, root: str | Path, *, dtype: torch.dtype = torch.bfloat16, device=None) -> "TextEncoder":
        """`root/tokenizer` and `root/text_encoder` of a diffusers pipeline folder; prompts are padded
        to the text length its transformer is made for (`max_text_seq_length`, 226 for CogVideoX)."""
        from transformers import AutoTokenizer, T5EncoderModel

        root = Path(root)
        for part in ("tokenizer", "text_encoder"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{str(root)!r} has no {part}/ folder (a CogVideoX pipeline folder has "
                                        "tokenizer/, text_encoder/, transformer/, vae/, scheduler/)")
        if not any((root / "tokenizer").iterdir()):
            raise FileNotFoundError(f"{str(root / 'tokenizer')!r} is empty: expected tokenizer.json and "
                                    "tokenizer_config.json (a T5 tokenizer)")
        with _load_errors(root / "tokenizer", "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        with _load_errors(root / "text_encoder", "T5 text encoder"):
            model = T5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype).eval()
        return cls(tokenizer, model.to(device) if device is not None else model, text_length(root))

    def truncated(self, prompts: list[str], max_length: int | None = None) -> list[str]:
        """The part of each prompt that does not fit in max_length tokens ('' when it fits)."""
        n = self.max_length if max_length is None else max_length
        ids = self.tokenizer(prompts, add_special_tokens=True).input_ids
        return [self.tokenizer.decode(i[n - 1:-1]) if len(i) > n else "" for i in ids]

    @torch.no_grad()
    def encode(self, prompts: list[str], *, device=None, dtype: torch.dtype | None = None,
               max_length: int | None = None) -> torch.Tensor:
        """(B, max_length, dim) embeddings: padded or truncated to max_length tokens (default self.max_length)."""
        n = self.max_length if max_length is None else max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        model_device = next(self.model.parameters()).device
        embeddings = self.model(ids.to(model_device))[0]
        return embeddings.to(dtype=dtype or self.model.dtype, device=device or model_device)

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self
