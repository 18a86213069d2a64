"""Checkpoint preflight checks: NaN/inf weights named exactly, truncated files, corrupt headers, vocab mismatch."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.io.integrity import check_tokenizer_matches, check_weights

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("checks") / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _plant(ckpt: Path, name: str, nan: int, inf: int) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    t = tensors[name].clone()
    flat = t.view(-1)
    flat[:nan] = float("nan")
    flat[nan:nan + inf] = float("inf")
    tensors[name] = t
    save_file(tensors, f, metadata={"format": "pt"})


def test_clean_checkpoint_passes(tiny: Path) -> None:
    check_weights(tiny)
    check_weights(tiny, chunk=7)  # many small blocks
    check_tokenizer_matches(tiny)


def test_nan_tensor_named_exactly(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "nan")
    _plant(ck, NAME, nan=3, inf=0)
    with pytest.raises(CrossrouteError) as ei:
        check_weights(ck, chunk=5)  # counts must add up across blocks
    msg = str(ei.value)
    assert f"tensor '{NAME}' has 3 NaN and 0 inf values" in msg
    assert "model.safetensors" in msg and "corrupt or diverged" in msg and "\n" not in msg


def test_inf_counted(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "inf")
    _plant(ck, "model.norm.weight", nan=1, inf=2)
    with pytest.raises(CrossrouteError, match=r"'model\.norm\.weight' has 1 NaN and 2 inf values"):
        check_weights(ck)


def test_truncated_file(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "trunc")
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CrossrouteError, match=r"truncated") as ei:
        check_weights(ck)
    assert str(f) in str(ei.value)


def test_truncated_inside_header(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "trunc_hdr")
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CrossrouteError, match=r"truncated") as ei:
        check_weights(ck)
    assert str(f) in str(ei.value)


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2, 3]", b'{"w": "F32"}'])
def test_corrupt_header(tmp_path: Path, header: bytes) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CrossrouteError) as ei:
        check_weights(tmp_path)
    assert str(tmp_path) in str(ei.value) and "\n" not in str(ei.value)


def test_integer_tensors_skipped(tmp_path: Path) -> None:
    save_file({"ids": torch.arange(10), "w": torch.ones(3, 4, dtype=torch.bfloat16)}, tmp_path / "model.safetensors")
    check_weights(tmp_path)


def test_vocab_mismatch(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "vocab")
    cfg_file = ck / "config.json"
    cfg = json.loads(cfg_file.read_text())
    n_tok = cfg["vocab_size"]
    cfg["vocab_size"] = n_tok - 5
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CrossrouteError) as ei:
        check_tokenizer_matches(ck)
    msg = str(ei.value)
    assert f"({n_tok} tokens" in msg and f"vocab_size {n_tok - 5}" in msg
    assert "tokenizer.json" in msg and "config.json" in msg


def test_vocab_smaller_than_model_is_fine(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "padded")
    cfg_file = ck / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["vocab_size"] += 64  # padded embedding, as many real models have
    cfg_file.write_text(json.dumps(cfg))
    check_tokenizer_matches(ck)
