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


def assert_close(a: object, b: object, rel: float = 1e-5, abs_: float = 1e-12, where: str = "") -> None:
    """Recursive equality of JSON-like results, with a relative tolerance on floats (the path of a mismatch in the
    message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], rel, abs_, f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, abs_, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, int | float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=rel, abs=abs_), where
    else:
        assert a == b, where
