"""T5 text encoder wrapper: tokenizer + encoder from a local directory.

The official code runs ``google-t5/t5-base``'s encoder on each prompt padded to 300 tokens with
truncation, and uses ``ids != pad`` as the attention mask. Here prompts are padded to the longest in the
batch (padding never influences valid positions: the generator masks it out), and a prompt longer than
``max_length`` tokens can be detected with ``count_tokens`` before it is silently truncated.

Two tokenizers: "t5" (the sentencepiece vocabulary in the directory, for the official weights) and
"byt5" (bytes, no vocabulary file; for models trained here without a pretrained T5).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel
from transformers.utils import logging as hf_logging

from dcar.model.config import TextEncoderConfig
from dcar.model.loading import LoadError

hf_logging.disable_progress_bar()


def _count_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False)["input_ids"])


class TextEncoder(torch.nn.Module):
    def __init__(self, encoder: T5EncoderModel, tokenizer, max_length: int):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> TextEncoder:
        """A freshly initialised encoder (tests, training). Only "byt5" needs no vocabulary file."""
        if cfg.tokenizer != "byt5":
            raise ValueError(
                "a fresh text encoder needs tokenizer='byt5' (a T5 vocabulary must come from a directory)"
            )
        t5 = T5Config(
            vocab_size=cfg.vocab_size,
            d_model=cfg.d_model,
            d_kv=cfg.d_kv,
            d_ff=cfg.d_ff,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
        )
        return cls(T5EncoderModel(t5), ByT5Tokenizer(), cfg.max_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int) -> TextEncoder:
        """Load from a local directory only (``local_files_only``: nothing is ever downloaded here)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise LoadError(f"text encoder directory {path} has no config.json")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            # with output_loading_info it returns (model, info), which its annotation does not say
            encoder, info = cast(
                "tuple[T5EncoderModel, dict]",
                T5EncoderModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True),
            )
        except (OSError, ValueError, SafetensorError) as e:  # transformers' own words, which name no file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoadError(
                f"text encoder directory {path}: not loadable (truncated or corrupt?): {first}"
            ) from e
        # transformers fills a key the file lacks with random values and only warns; every other
        # component here refuses such a file, so this one does too. Keys tied to one present in the file
        # (shared.weight / encoder.embed_tokens.weight) are not reported missing, and a whole T5's decoder
        # keys are only "unexpected": a full t5-base checkpoint loads.
        missing = sorted(info["missing_keys"])
        if missing:
            more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            raise LoadError(
                f"text encoder directory {path}: its weights lack {len(missing)} keys of the model: "
                f"{', '.join(missing[:10])}{more}"
            )
        return cls(encoder.eval(), tokenizer, max_length)

    def save_pretrained(self, path: str | Path) -> None:
        self.encoder.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    @property
    def d_model(self) -> int:
        return self.encoder.config.d_model

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, end-of-sequence included, before any truncation."""
        return _count_tokens(self.tokenizer, prompt)

    def token_counter(self) -> Callable[[str], int]:
        """``count_tokens`` on a private copy of the tokenizer, for another thread (a server's event loop).

        Hugging Face fast tokenizers are not safe to share between threads (their truncation settings are
        mutated per call), and the model's thread tokenizes at the same time.
        """
        return functools.partial(_count_tokens, copy.deepcopy(self.tokenizer))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> last hidden states (B, L, d_model) and attention mask (B, L) int64 (1 = token)."""
        device = next(self.encoder.parameters()).device
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask
