"""The embedded default (DESIGN.md §4): a small Qwen3 with a char tokenizer, shipped in crossroute/assets/default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from crossroute.model.tokenizer import build_char_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"


DEFAULT_CHECKPOINT = ASSETS / "default"


DEFAULT_NAME = "default"


def default_config(vocab_size: int, **overrides: Any) -> Qwen3Config:
    """The embedded default's architecture: a ~0.8 M-parameter Qwen3 with GQA, 8 heads of 16 dims and 4 KV groups per
    layer (32 heads, 16 KV groups in all: enough units for head- and KV-level analyses to mean something)."""
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def build_default_model(seed: int, **overrides: Any) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase]:
    """A randomly initialised embedded-default model (deterministic from `seed`) and its char tokenizer."""
    tokenizer = build_char_tokenizer()
    config = default_config(len(tokenizer), **overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer
