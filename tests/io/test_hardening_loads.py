"""No silent partial loads: a checkpoint whose tensors differ from its config.json is refused with one line naming
the file, the tensor or field and the fix, before transformers could initialise anything at random; every valid
zoo checkpoint (tied heads, fused MoE experts, renamed GPT-NeoX head, shards) still loads."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import load_checkpoint
from crossroute.model.default import DEFAULT_CHECKPOINT
from crossroute.model.load import check_checkpoint_dir, load_model
from zoo import FAMILIES, build_zoo_checkpoint, zoo_checkpoint

UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("hardening") / "ckpt")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(ckpt: Path, **changes: object) -> None:
    cfg_file = ckpt / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


def _edit_tensors(ckpt: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, f, metadata={"format": "pt"})


def _refused(ckpt: Path, *needles: str) -> str:
    """Both the preflight and the load refuse `ckpt` with one line holding every needle."""
    with pytest.raises(CrossrouteError) as ei:
        check_checkpoint_dir(ckpt)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, msg
    with pytest.raises(CrossrouteError) as ei2:
        load_model(ckpt, device="cpu")
    assert str(ei2.value) == msg
    return msg


@pytest.mark.parametrize("family", FAMILIES)
def test_every_zoo_family_still_loads(family: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    ckpt = zoo_checkpoint(family, tmp_path_factory)
    check_checkpoint_dir(ckpt)
    loaded = load_model(ckpt, device="cpu")
    assert sum(p.numel() for p in loaded.model.parameters()) > 0


def test_shipped_default_and_sharded_checkpoints_load(tiny: Path, tmp_path: Path) -> None:
    check_checkpoint_dir(DEFAULT_CHECKPOINT)
    loaded = load_model(tiny, device="cpu")
    sharded = tmp_path / "sharded"
    loaded.model.save_pretrained(sharded, max_shard_size="20KB")
    loaded.tokenizer.save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    load_model(sharded, device="cpu")


def test_missing_tensor_is_refused(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    _edit_tensors(ck, drop=UP)
    msg = _refused(ck, f"tensor '{UP}' is missing", str(ck), "random values", "re-save")
    assert "more" not in msg  # exactly one missing


def test_unexpected_tensor_is_refused(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    _edit_tensors(ck, add={"model.layers.0.mlp.extra.weight": torch.ones(2, 2)})
    _refused(ck, "unexpected tensor 'model.layers.0.mlp.extra.weight'", "model.safetensors", "config.json")


@pytest.mark.parametrize("layers", [4, 1])
def test_config_and_weights_layer_counts_differ(tiny: Path, tmp_path: Path, layers: int) -> None:
    ck = _copy(tiny, tmp_path / "c")
    _edit_config(ck, num_hidden_layers=layers)
    _refused(ck, "config.json: num_hidden_layers is", f"is {layers} but", "hold 2 decoder layers (0-1)",
             "set num_hidden_layers to 2")


def test_shape_mismatch_with_config(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    _edit_config(ck, intermediate_size=40)
    _refused(ck, "model.layers.0.mlp.down_proj.weight' has shape (16, 32)", "needs (16, 40)", "(and 5 more)",
             "model.safetensors")


def test_negative_dimension_in_config(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    _edit_config(ck, hidden_size=-16)
    _refused(ck, "config.json: hidden_size is -16", "cannot be negative")


def test_config_json_that_is_a_list(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    (ck / "config.json").write_text("[1, 2]")
    _refused(ck, "config.json: a JSON list, not an object")
    with pytest.raises(CrossrouteError, match="a JSON list"):
        load_checkpoint(ck)  # diff / merge read config.json themselves


def _rewrite_header(f: Path, edit: dict[str, list[int]]) -> None:
    """Give tensors new data_offsets in the header of `f`, keeping the data bytes."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for name, offsets in edit.items():
        header[name]["data_offsets"] = offsets
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_overlapping_offsets_are_refused(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    f = ck / "model.safetensors"
    info = load_checkpoint(ck).tensors
    data0 = min(i.start for i in info.values())
    a, b = sorted((n for n in info if info[n].nbytes == info[UP].nbytes), key=lambda n: info[n].start)[:2]
    rel = info[a].start - data0  # the header stores offsets relative to the data section
    _rewrite_header(f, {b: [rel, rel + info[b].nbytes]})  # b now claims a's bytes
    msg = _refused(ck, "overlaps the previous tensor", str(f), "re-download or re-save")
    assert f"'{a}'" in msg or f"'{b}'" in msg


def test_symlink_loops_are_refused(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    (ck / "model.safetensors").unlink()
    os.symlink("model.safetensors", ck / "model.safetensors")  # points at itself
    _refused(ck, "model.safetensors: a symlink loop or a dangling symlink")
    loop = tmp_path / "loop"
    os.symlink("loop", loop)
    with pytest.raises(CrossrouteError, match="loop: a symlink loop"):
        check_checkpoint_dir(loop)
    ck2 = _copy(tiny, tmp_path / "c2")
    (ck2 / "config.json").unlink()
    os.symlink("config.json", ck2 / "config.json")
    _refused(ck2, "config.json: a symlink loop")


def test_tied_head_counts_only_when_tied(tmp_path: Path) -> None:
    ck = build_zoo_checkpoint("gemma2", tmp_path / "g")  # tied lm_head: not in the file, not missing
    assert "lm_head.weight" not in load_checkpoint(ck).tensors
    check_checkpoint_dir(ck)
    _edit_config(ck, tie_word_embeddings=False)  # now the head is a weight of its own, and absent
    _refused(ck, "tensor 'lm_head.weight' is missing")


def test_moe_expert_missing_is_refused(tmp_path: Path) -> None:
    ck = build_zoo_checkpoint("qwen3_moe", tmp_path / "moe")
    _edit_tensors(ck, drop="model.layers.1.mlp.experts.2.up_proj.weight")
    _refused(ck, "model.layers.1.mlp.experts.gate_up_proj", str(ck))


def test_preflight_refuses_a_tokenizer_larger_than_the_embedding(tiny: Path, tmp_path: Path) -> None:
    ck = _copy(tiny, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    _edit_config(ck, vocab_size=10)
    w = load_file(ck / "model.safetensors")
    save_file({k: (v[:10].contiguous() if v.shape[0] == cfg["vocab_size"] else v) for k, v in w.items()},
              ck / "model.safetensors", metadata={"format": "pt"})
    _refused(ck, "exceeds the model's vocab_size 10")
    check_checkpoint_dir(ck, need_tokenizer=False)  # merge donors: weights only
