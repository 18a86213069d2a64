"""Preflight checks of a checkpoint: weights free of NaN/inf, not truncated, tokenizer fits the model, and
tensor names/shapes that match config.json (no tensor missing, unexpected or mis-shaped).

`check_weights` streams every safetensors tensor in row blocks with diff.py's reader (validated
JSON-only header, `os.preadv` into one reusable buffer): memory is bounded by one block (~1 M
entries), never a whole tensor or model, and nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import (
    CHUNK_ELEMS,
    TensorInfo,
    max_block,
    natural_key,
    open_shards,
    pread_into,
    row_blocks,
    tensor_infos,
    weight_files,
)

_CAST = (torch.float8_e4m3fn, torch.float8_e5m2)  # isnan/isinf lack CPU kernels for these


def _check_header_size(path: Path) -> None:
    """Clear errors for a file too short to hold its own header (diff.py would say 'cannot read')."""
    size = path.stat().st_size
    if size < 8:
        raise CrossrouteError(f"{path}: {size} bytes, too short for a safetensors header; the file is "
                              "truncated, re-download or re-save the checkpoint")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    if n > size - 8:
        raise CrossrouteError(f"{path}: header says {n} header bytes but the file has only {size - 8} "
                              "after the length prefix; the file is truncated or not safetensors, "
                              "re-download or re-save the checkpoint")


def _bad_counts(block: torch.Tensor) -> tuple[int, int]:
    if block.dtype in _CAST:
        block = block.float()
    return int(torch.isnan(block).sum()), int(torch.isinf(block).sum())


def check_weights(path: str | Path, chunk: int = CHUNK_ELEMS) -> None:
    """Raise CrossrouteError naming the first tensor holding NaN or inf values (and how many).

    Also rejects truncated files and corrupt headers with one line naming the file. Tensors are
    visited file by file in on-disk order; integer and bool tensors are skipped."""
    root = Path(path)
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files(root):
        _check_header_size(f)
        try:
            tensors.update(tensor_infos(f))
        except (AttributeError, TypeError) as exc:  # valid JSON that is not a header mapping
            raise CrossrouteError(f"{f}: corrupt safetensors header (not a JSON object of tensor "
                                  "entries); re-download or re-save the checkpoint") from exc
    infos = sorted((i for i in tensors.values() if i.dtype.is_floating_point),
                   key=lambda i: (str(i.file), i.start))
    names = {id(i): n for n, i in tensors.items()}
    if not infos:
        return
    buf = bytearray(max(max_block(i.shape, chunk) * i.dtype.itemsize for i in infos))
    with open_shards(tensors) as fds:
        for info in infos:
            row = math.prod(info.shape[1:]) if info.shape else 1
            size = info.dtype.itemsize
            nan = inf = 0
            for r0, r1 in row_blocks(info.shape, chunk):
                n = (r1 - r0) * row
                if n == 0:
                    continue
                try:
                    view = pread_into(fds[info.file], buf, n * size, info.start + r0 * row * size)
                except CrossrouteError as exc:
                    raise CrossrouteError(f"{info.file}: tensor '{names[id(info)]}': {exc}") from None
                a, b = _bad_counts(torch.frombuffer(view, dtype=info.dtype, count=n))
                nan, inf = nan + a, inf + b
            if nan or inf:
                raise CrossrouteError(f"{info.file}: tensor '{names[id(info)]}' has {nan} NaN and {inf} inf "
                                      "values; the checkpoint is corrupt or diverged")


def _tokenizer_vocab(root: Path) -> tuple[int, Path]:
    """(vocabulary size = highest token id + 1, the file it came from) of the checkpoint's tokenizer."""
    tj = root / "tokenizer.json"
    if tj.exists():
        try:
            data = json.loads(tj.read_text())
            vocab = data["model"].get("vocab") or {}
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
            ids += [int(t["id"]) for t in data.get("added_tokens") or []]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CrossrouteError(f"{tj}: cannot read the vocabulary ({exc}); re-save the tokenizer "
                                  "with save_pretrained") from exc
        return (max(int(i) for i in ids) + 1 if ids else 0), tj
    from transformers import AutoTokenizer  # slow path: vocab.json / tokenizer.model

    try:
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (any loader failure is a user-facing config problem)
        raise CrossrouteError(f"{root}: cannot load the tokenizer ({type(exc).__name__}); the checkpoint "
                              "needs tokenizer.json (or vocab.json / tokenizer.model)") from exc
    return len(tok), root / "tokenizer_config.json"


def _config_vocab(root: Path) -> tuple[int, Path]:
    cfg_file = root / "config.json"
    try:
        cfg: Any = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise CrossrouteError(f"{cfg_file}: cannot read ({exc}); a checkpoint needs config.json") from exc
    if isinstance(cfg, dict) and "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    try:
        return int(cfg["vocab_size"]), cfg_file
    except (KeyError, TypeError, ValueError) as exc:
        raise CrossrouteError(f"{cfg_file}: no integer vocab_size; add the model's vocabulary size") from exc


def check_tokenizer_matches(model_path: str | Path) -> None:
    """The tokenizer's vocabulary must fit the model's embedding (config.json vocab_size)."""
    root = Path(model_path)
    n_tok, tok_file = _tokenizer_vocab(root)
    n_cfg, cfg_file = _config_vocab(root)
    if n_tok > n_cfg:
        raise CrossrouteError(f"tokenizer vocabulary ({n_tok} tokens, {tok_file}) exceeds the model's "
                              f"vocab_size {n_cfg} ({cfg_file}); token ids >= {n_cfg} would index past "
                              "the embedding: use the tokenizer saved with this model")


# ----------------------------------------------------------------------------- tensors vs config

# a decoder layer of the language model (not of a vision tower's encoder): model.layers.3., transformer.h.3., ...
LAYER_INDEX = re.compile(r"(?:^|\.)(?:model|transformer|gpt_neox|language_model|decoder|backbone)\."
                         r"(?:layers|h|blocks)\.(\d+)\.")


def header_tensors(root: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint from its validated safetensors headers (names, dtypes, shapes, byte ranges)."""
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files(Path(root)):
        _check_header_size(f)
        tensors.update(tensor_infos(f))
    return tensors


def layers_in(names: Any) -> int | None:
    """1 + the largest decoder-layer index among tensor `names`, None when no name is in a decoder layer."""
    idx = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(idx) + 1 if idx else None


def check_layer_count(cfg_file: Path, n_config: int | None, tensors: dict[str, TensorInfo], extra_ok: int = 0) -> None:
    """The weights must hold the config's num_hidden_layers decoder layers: fewer would load with random layers,
    more would silently drop trained ones (`extra_ok`: extra layers the config declares, e.g. DeepSeek's MTP)."""
    n_w = layers_in(tensors)
    if n_config is None or n_w is None or n_config <= n_w <= n_config + extra_ok:
        return
    where = sorted({str(i.file.name) for i in tensors.values()})[0]
    raise CrossrouteError(f"{cfg_file}: num_hidden_layers is {n_config} but the weights ({where}) hold {n_w} "
                          f"decoder layers (0-{n_w - 1}); set num_hidden_layers to {n_w} or use the config.json "
                          "saved with these weights")


def check_state_dict_report(root: Path, tensors: dict[str, TensorInfo], arch: str, missing: set[str],
                            unexpected: set[str], mismatched: list[tuple[str, tuple, tuple]],
                            conversion_errors: dict[str, str]) -> None:
    """Raise naming the first tensor the checkpoint lacks, has in excess, or holds with another shape than
    config.json implies (`arch` is the model class); nothing is loaded or initialised at random."""
    cfg_file = root / "config.json"

    def more(items: Any) -> str:
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    if mismatched:
        name, got, want = sorted(mismatched, key=lambda m: natural_key(m[0]))[0]
        f = tensors[name].file if name in tensors else root
        raise CrossrouteError(f"{f}: tensor '{name}' has shape {tuple(got)} but {cfg_file} ({arch}) needs "
                              f"{tuple(want)}{more(mismatched)}; the config does not match the weights: use the "
                              "config.json saved with them (check hidden_size, intermediate_size, head counts)")
    if conversion_errors:
        name = sorted(conversion_errors, key=natural_key)[0]
        lines = [ln.strip() for ln in str(conversion_errors[name]).splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.match(r"[A-Za-z_.]+Error: ", ln)]
        last = errs or lines
        raise CrossrouteError(f"{root}: cannot assemble tensor '{name}' of {arch} from the checkpoint's tensors "
                              f"({last[-1] if last else 'conversion failed'}); a part is missing or mis-shaped: "
                              "re-save the checkpoint with save_pretrained")
    if missing:
        name = sorted(missing, key=natural_key)[0]
        raise CrossrouteError(f"{root}: tensor '{name}' is missing from the weights{more(missing)} ({arch} from "
                              f"{cfg_file} needs it; loading would fill it with random values); the checkpoint is "
                              "incomplete: copy the missing shard or re-save it with save_pretrained")
    if unexpected:
        name = sorted(unexpected, key=natural_key)[0]
        f = tensors[name].file if name in tensors else root
        raise CrossrouteError(f"{f}: unexpected tensor '{name}'{more(unexpected)}: {arch} from {cfg_file} has no "
                              "such weight (loading would drop it); use the config.json saved with these weights")
