"""Model I/O: safetensors round trip reproduces logits; bad checkpoints give one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.model.default import DEFAULT_CHECKPOINT
from crossroute.model.load import load_model, resolve_model_path, save_model
from crossroute.model.tokenizer import CHARSET, build_char_tokenizer


def test_round_trip_reproduces_logits(tmp_path: Path) -> None:
    src = make_tiny(tmp_path / "a", seed=3)
    a = load_model(src)
    ids = a.tokenizer(["M:12+7=", "Q:pet of Zorbin?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = a.model(**ids).logits
    save_model(a.model, a.tokenizer, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "b").glob("*.bin"))
    b = load_model(tmp_path / "b")
    with torch.no_grad():
        after = b.model(**b.tokenizer(["M:12+7=", "Q:pet of Zorbin?"], return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert b.tokenizer.padding_side == "left" and b.tokenizer.pad_token == "<pad>"


def test_save_is_atomic_on_failure(tmp_path: Path, tiny_ckpt: Path) -> None:
    loaded = load_model(tiny_ckpt)

    class Boom(Exception):
        pass

    def bad_save(*a: object, **k: object) -> None:
        raise Boom

    target = tmp_path / "out"
    save_model(loaded.model, loaded.tokenizer, target)
    before = sorted(p.name for p in target.iterdir())
    tok = loaded.tokenizer
    orig = tok.save_pretrained
    tok.save_pretrained = bad_save  # type: ignore[method-assign]
    with pytest.raises(Boom):
        save_model(loaded.model, tok, target)
    tok.save_pretrained = orig  # type: ignore[method-assign]
    assert sorted(p.name for p in target.iterdir()) == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")


def test_non_causal_config(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CrossrouteError, match=r"'bert' \(BertForMaskedLM\) is not a causal language model"):
        load_model(d)


def test_missing_tokenizer(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "c")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(CrossrouteError, match="no tokenizer files"):
        load_model(d)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "c")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CrossrouteError, match="pickle-only checkpoint"):
        load_model(d)


def test_missing_config_and_bad_json(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = _copy(tiny_ckpt, tmp_path / "c")
    (d / "config.json").write_text("{oops")
    with pytest.raises(CrossrouteError, match="config.json: invalid JSON"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(CrossrouteError, match="config.json: missing"):
        load_model(d)


def test_default_name_resolves_to_shipped_checkpoint() -> None:
    assert resolve_model_path("default") == DEFAULT_CHECKPOINT
    assert (DEFAULT_CHECKPOINT / "model.safetensors").exists()


@given(st.text(alphabet=CHARSET, max_size=40))
def test_char_tokenizer_round_trip(text: str) -> None:
    tok = build_char_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
