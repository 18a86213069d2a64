"""Shared fixtures: tiny random Qwen3 checkpoints (a few thousand parameters) built in the test itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossroute.model.default import build_default_model
from crossroute.model.load import save_model

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


def make_tiny(path: Path, seed: int = 0) -> Path:
    """Save a tiny random embedded-default-shaped model (char tokenizer) to `path`."""
    torch.manual_seed(seed)
    model, tok = build_default_model(seed, **TINY)
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")
