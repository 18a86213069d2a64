"""PEFT LoRA adapter directories as checkpoints: every analysis sees the merged weights θ_base + scaling · B A.

An adapter directory (adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes it)
resolves to a merged checkpoint in crossroute's cache, written once, tensor by tensor (memory about the largest
tensor), atomically, and reused while the adapter files and the base are unchanged. The merge follows PEFT's own
(tuners/lora/layer.py): δ = scaling · B A, transposed for Conv1D (fan_in_fan_out) and embedding layers, scaling =
alpha / r (alpha / √r with use_rslora; r and alpha per module from rank_pattern / alpha_pattern); tensors saved
whole (modules_to_save, an embedding's base_layer) replace the base's. Math in fp32, stored in the base's dtype.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.core.atomic import MARKER, atomic_dir, is_temp
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import (
    CHUNK_ELEMS,
    Checkpoint,
    SafetensorsWriter,
    TensorInfo,
    TensorReader,
    check_readable,
    load_checkpoint,
    tensor_infos,
)
from crossroute.model.default import DEFAULT_CHECKPOINT, DEFAULT_NAME

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLES = ("adapter_model.bin", "adapter_model.pt")
BASE_FIELD = "base_model_name_or_path"
BASE_ENV = "CROSSROUTE_ADAPTER_BASE"  # overrides adapter_config.json's base for every adapter
CACHE_ENV = "CROSSROUTE_CACHE"  # crossroute's cache root; merges land in <root>/merged/<name>-<digest>
PROVENANCE = "adapter_merge.json"  # written into each merged checkpoint: which adapter, which base
KEY_PREFIX = "base_model.model."
RANK_TOL = 1e-6  # singular values above this fraction of the largest count toward the effective rank
MERGE_FORMAT = "crossroute-lora-merge-1"  # part of the cache key: bump when the merge's output changes
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
# adapter_config.json fields that select something other than plain LoRA, each refused when set
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts only after its invocation tokens",
    "use_qalora": "QA-LoRA (use_qalora)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication) changes the architecture",
    "target_parameters": "LoRA on bare parameters (target_parameters, e.g. fused MoE experts)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "megatron_config": "Megatron-parallel LoRA (megatron_config)",
}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B)$")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of the base: its factors' keys in the adapter file, rank, alpha and scaling."""

    module: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    bias_key: str | None
    embedding: bool  # lora_embedding_A/B (delta transposed, as PEFT's Embedding layer)
    r: int
    alpha: float
    scaling: float


@dataclass
class Adapter:
    """A parsed adapter directory: its config, tensors, LoRA modules and the base tensors it saved whole."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    modules: list[LoraModule]
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key holding its new value


@dataclass
class TensorPlan:
    """What the merge does to one base tensor: replace it with a saved tensor, then add LoRA deltas."""

    replace: str | None = None
    deltas: list[tuple[LoraModule, bool]] = field(default_factory=list)  # (module, transposed)
    biases: list[LoraModule] = field(default_factory=list)


# ----------------------------------------------------------------------------- recognising and reading adapters

def has_own_weights(path: Path) -> bool:
    """Whether `path` holds a full checkpoint's config.json and weights (besides any adapter files)."""
    if not (path / "config.json").is_file():
        return False
    return any(not f.name.startswith("adapter_model") for f in path.glob("*.safetensors"))


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter directory: adapter_config.json present and no config.json weights of its own."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not has_own_weights(p)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json as a mapping, refusing what the merge does not support (one line each)."""
    cfg_file = check_readable(adapter_dir / ADAPTER_CONFIG)
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CrossrouteError(f"{cfg_file}: invalid JSON at line {e.lineno} ({e.msg}); re-save the adapter with "
                              "save_pretrained.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CrossrouteError(f"{cfg_file}: cannot read ({e}); re-save the adapter with save_pretrained.") from None
    if not isinstance(cfg, dict):
        raise CrossrouteError(f"{cfg_file}: a JSON {type(cfg).__name__}, not an object of adapter fields; use the "
                              "adapter_config.json PEFT saved.")
    named = sorted(d.name for d in adapter_dir.iterdir() if d.is_dir() and (d / ADAPTER_CONFIG).is_file())
    if named:
        raise CrossrouteError(f"{adapter_dir}: holds several named adapters (the default one and "
                              f"{', '.join(named)}); pass one adapter's own directory, e.g. {adapter_dir / named[0]}.")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise CrossrouteError(f"{cfg_file}: peft_type is {peft_type!r}; crossroute merges LoRA adapters only: merge "
                              "this one with PEFT (merge_and_unload, then save_pretrained) and pass that directory.")
    for key, what in UNSUPPORTED_FIELDS.items():
        if cfg.get(key):
            raise CrossrouteError(f"{cfg_file}: {key} is set: {what}, which crossroute does not merge; merge it with "
                                  "PEFT (merge_and_unload, then save_pretrained) and pass that directory.")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise CrossrouteError(f"{cfg_file}: {key} is {value!r}; it must be a positive number, as PEFT saved it.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CrossrouteError(f"{cfg_file}: {key} must map module names to numbers, got {cfg[key]!r}.")
    return cfg


def adapter_weight_file(adapter_dir: Path) -> Path:
    """adapter_model.safetensors, refusing a pickle-only adapter (never unpickled) or none at all."""
    path = check_readable(adapter_dir / ADAPTER_WEIGHTS)
    if path.is_file():
        return path
    pickles = [p for p in ADAPTER_PICKLES if (adapter_dir / p).exists()]
    if pickles:
        raise CrossrouteError(f"{adapter_dir / pickles[0]}: pickle-only adapter; crossroute reads safetensors only "
                              "(never unpickles): re-save it once with `model.save_pretrained(dir, "
                              "safe_serialization=True)`.")
    raise CrossrouteError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; an adapter directory holds {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS} (PeftModel.save_pretrained).")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key): the first key that matches the end
    of the module path at a dot boundary, as a regular expression."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling of B A: alpha / r, or alpha / √r with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def parse_adapter(adapter_dir: str | Path) -> Adapter:
    """Read an adapter directory's config and safetensors header into its LoRA modules and whole tensors."""
    root = Path(adapter_dir).expanduser()
    cfg = read_adapter_config(root)
    file = adapter_weight_file(root)
    tensors = tensor_infos(file)
    parts: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in sorted(tensors):
        if not key.startswith(KEY_PREFIX):
            raise CrossrouteError(f"{file}: tensor {key!r} lacks PEFT's {KEY_PREFIX!r} prefix; re-save the adapter "
                                  "with PeftModel.save_pretrained.")
        name = key.removeprefix(KEY_PREFIX)
        m = _LORA_KEY.match(name)
        if m is not None:
            parts.setdefault(m["module"], {})[m["part"]] = key
        elif "lora_" in name or ".modules_to_save." in name or ".original_module." in name:
            raise CrossrouteError(f"{file}: tensor {key!r} is not a plain LoRA factor (lora_A/lora_B) nor a saved base "
                                  "tensor; crossroute cannot merge it: merge with PEFT (merge_and_unload) instead.")
        else:
            replaced[name.replace(".base_layer.", ".")] = key
    use_rslora = bool(cfg.get("use_rslora"))
    modules = [lora_module(file, mod, keys, cfg, tensors, use_rslora) for mod, keys in sorted(parts.items())]
    if not modules and not replaced:
        raise CrossrouteError(f"{file}: holds no LoRA factors; pass the directory PeftModel.save_pretrained wrote.")
    return Adapter(root, cfg, tensors, modules, replaced)


def lora_module(file: Path, module: str, keys: dict[str, str], cfg: dict[str, Any], tensors: dict[str, TensorInfo],
                use_rslora: bool) -> LoraModule:
    """One module's factors, checked against each other and against its r from adapter_config.json."""
    embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
    a_key = keys.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = keys.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_key is None or b_key is None or (embedding and ("lora_A.weight" in keys or "lora_B.weight" in keys)):
        raise CrossrouteError(f"{file}: module {module!r} has {', '.join(sorted(keys))} but not one lora_A/lora_B "
                              "pair; the adapter file is incomplete: re-save it with save_pretrained.")
    a, b = tensors[a_key].shape, tensors[b_key].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise CrossrouteError(f"{file}: module {module!r}: lora_A {a} and lora_B {b} are not a rank-r pair of "
                              "matrices (Conv layers are not supported); merge with PEFT (merge_and_unload) instead.")
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    if r != a[0]:
        raise CrossrouteError(f"{file}: module {module!r} has rank {a[0]} but adapter_config.json's r / rank_pattern "
                              f"gives {r}; use the adapter_config.json saved with these weights.")
    return LoraModule(module, a_key, b_key, keys.get("lora_B.bias"), embedding, int(r), float(alpha),
                      lora_scaling(float(alpha), int(r), use_rslora))


# ----------------------------------------------------------------------------- the base checkpoint

def looks_like_repo_id(value: str) -> bool:
    """A Hugging Face hub id (`name` or `owner/name`), not a filesystem path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", value)) and not value.endswith((".", "/"))


def cached_hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The local Hugging Face cache's snapshot of `repo` (never the network), None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, an invalid id, a broken cache: all mean "not available locally")
        return None


def adapter_base(adapter_dir: str | Path, base: str | Path | None = None) -> Path:
    """The base checkpoint directory of an adapter: `base`, else CROSSROUTE_ADAPTER_BASE, else adapter_config.json's
    base_model_name_or_path: 'default', an absolute path, a path relative to the adapter dir (or to the working
    directory), or a hub id found in the local Hugging Face cache."""
    root = Path(adapter_dir).expanduser()
    where = "base" if base is not None else BASE_ENV
    value = str(base) if base is not None else os.environ.get(BASE_ENV) or None
    cfg: dict[str, Any] = {}
    if value is None:
        cfg = read_adapter_config(root)
        raw = cfg.get(BASE_FIELD)
        where = f"{root / ADAPTER_CONFIG}: {BASE_FIELD}"
        if not isinstance(raw, str) or not raw.strip():
            raise CrossrouteError(f"{where} is {raw!r}; set it to the base checkpoint directory (or set {BASE_ENV}).")
        value = raw.strip()
    found = find_base(root, value, cfg.get("revision"))
    if found is None:
        cached = " nor in the local Hugging Face cache" if looks_like_repo_id(value) else ""
        raise CrossrouteError(f"{where} is {value!r}, which is not a local checkpoint directory{cached}; point it at "
                              f"a local checkpoint directory (or set {BASE_ENV}=DIR).")
    if is_adapter(found):
        raise CrossrouteError(f"{where} is {value!r}, itself an adapter directory; merge that adapter first "
                              "(PEFT merge_and_unload) and point the field at the merged checkpoint.")
    return found


def find_base(adapter_dir: Path, value: str, revision: Any) -> Path | None:
    """Resolve a base name: 'default', a local directory (absolute, relative to the adapter, relative to the working
    directory), then a hub id in the local cache; None when none of these exists."""
    if value == DEFAULT_NAME:
        return DEFAULT_CHECKPOINT
    path = Path(value).expanduser()
    for cand in ([path] if path.is_absolute() else [adapter_dir / path, path]):
        if cand.is_dir():
            return cand.resolve()
    if looks_like_repo_id(value):
        return cached_hub_snapshot(value, revision if isinstance(revision, str) and revision else None)
    return None


def module_types(base: Path) -> tuple[dict[str, type], dict[str, str]]:
    """The base architecture's {module path: class} and tied weights {target: source}, from a model built on the
    meta device (no memory, no random values): which LoRA delta PEFT would use (Linear, Conv1D, Embedding)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg_file = base / "config.json"
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # noqa: BLE001 (config and model classes raise anything for an odd config)
        raise CrossrouteError(f"{cfg_file}: transformers cannot build the base's causal-LM architecture "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); point the adapter "
                              "at a causal-LM checkpoint directory.") from None
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: type(mod) for name, mod in model.named_modules()}, tied


def delta_transposed(module: LoraModule, cls: type | None, base: Path) -> bool:
    """Whether PEFT transposes B A for this module: Conv1D (fan_in_fan_out) and embeddings yes, Linear no; any other
    layer type is refused, as PEFT's Conv / MultiheadAttention LoRA layers compute other deltas."""
    from transformers.pytorch_utils import Conv1D

    if cls is not None and issubclass(cls, torch.nn.Embedding) and module.embedding:
        return True
    if cls is not None and not module.embedding and issubclass(cls, Conv1D):
        return True
    if cls is not None and not module.embedding and issubclass(cls, torch.nn.Linear):
        return False
    what = "no such module" if cls is None else f"a {cls.__name__}"
    raise CrossrouteError(f"adapter module {module.module!r}: the base ({base}) has {what} there; crossroute merges "
                          "LoRA on Linear, Conv1D and Embedding layers only: merge with PEFT (merge_and_unload) "
                          "instead, or point the adapter at the base it was trained on.")


def base_tensor(name: str, base: Checkpoint, tied: dict[str, str], what: str) -> str:
    """The base tensor that holds `name` (a tied lm_head lives in the embedding), refusing one the base lacks."""
    if name in base.tensors:
        return name
    if tied.get(name) in base.tensors:
        return tied[name]
    raise CrossrouteError(f"{what}: the base ({base.root}) has no tensor {name!r}; point the adapter at the base it "
                          "was trained on.")


def merge_plan(adapter: Adapter, base: Checkpoint) -> dict[str, TensorPlan]:
    """{base tensor: what to do to it}, every shape checked against the base before any tensor is read."""
    types, tied = module_types(base.root)
    plans: dict[str, TensorPlan] = {}
    tie_group = set(tied) | set(tied.values())
    for name, key in adapter.replaced.items():
        if name in tie_group and ".base_layer." not in key:
            raise CrossrouteError(f"adapter tensor {key!r} (modules_to_save) replaces a weight the base ties to "
                                  "another (tie_word_embeddings), which PEFT unties; the merge would need untied "
                                  "embeddings: merge with PEFT (merge_and_unload) and save_pretrained instead.")
        target = base_tensor(name, base, tied, f"adapter tensor {key!r}")
        have, want = adapter.tensors[key].shape, base.tensors[target].shape
        if have != want:
            raise CrossrouteError(f"adapter tensor {key!r} has shape {have} but the base's {target!r} has {want} "
                                  "(a resized vocabulary?); merge with PEFT (merge_and_unload) and save_pretrained.")
        plans.setdefault(target, TensorPlan()).replace = key
    for m in adapter.modules:
        transposed = delta_transposed(m, types.get(m.module), base.root)
        target = base_tensor(f"{m.module}.weight", base, tied, f"adapter module {m.module!r}")
        a, b = adapter.tensors[m.a_key].shape, adapter.tensors[m.b_key].shape
        want = [a[1], b[0]] if transposed else [b[0], a[1]]
        info = base.tensors[target]
        if info.shape != want:
            raise CrossrouteError(f"adapter module {m.module!r}: its delta has shape {want} but the base's {target!r} "
                                  f"has {info.shape}; point the adapter at the base it was trained on.")
        if not info.dtype.is_floating_point:
            raise CrossrouteError(f"{base.root}: {target!r} is {info.dtype} (quantized); merge the adapter into the "
                                  "unquantized base checkpoint.")
        plans.setdefault(target, TensorPlan()).deltas.append((m, transposed))
        if m.bias_key is not None:
            bias = base_tensor(f"{m.module}.bias", base, tied, f"adapter tensor {m.bias_key!r}")
            plans.setdefault(bias, TensorPlan()).biases.append(m)
    return plans


# ----------------------------------------------------------------------------- the streamed merge

def add_deltas(name: str, w: torch.Tensor, deltas: list[tuple[LoraModule, bool]], factors: TensorReader,
               chunk: int = CHUNK_ELEMS) -> None:
    """w += Σ scaling · B A (transposed where PEFT does), in place, in fp32 row blocks of about `chunk` entries."""
    loaded = [(m, factors.read(m.a_key).float(), factors.read(m.b_key).float(), t) for m, t in deltas]
    rows, row = w.shape[0], math.prod(w.shape[1:])
    step = max(1, chunk // max(row, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = w[r0:r1].float()
        for m, a, b, transposed in loaded:
            delta = (b @ a[:, r0:r1]).T if transposed else b[r0:r1] @ a
            block += delta.mul_(m.scaling)  # PEFT's order: (B A) · scaling, then added
        check_block_finite(name, block, [m for m, _ in deltas])
        w[r0:r1] = block.to(w.dtype)


def add_biases(name: str, w: torch.Tensor, modules: list[LoraModule], factors: TensorReader) -> None:
    """bias += scaling · lora_B.bias (PEFT's lora_bias), in fp32."""
    out = w.float()
    for m in modules:
        out += factors.read(m.bias_key).float() * m.scaling  # type: ignore[arg-type]
    check_block_finite(name, out, modules)
    w.copy_(out.to(w.dtype))


def check_block_finite(name: str, block: torch.Tensor, modules: list[LoraModule]) -> None:
    """Refuse a merged tensor holding NaN or inf (a broken adapter, or an overflow of the base's dtype)."""
    if not bool(torch.isfinite(block).all()):
        raise CrossrouteError(f"merging the adapter into {name!r} gives NaN or inf values (module "
                              f"{modules[0].module!r}); the adapter's factors are broken: use a finite checkpoint.")


def write_merged(adapter: Adapter, base: Checkpoint, plans: dict[str, TensorPlan], out: Path) -> None:
    """Write every base tensor (in the base's shard layout and dtypes) with the plan applied, into `out`."""
    files: dict[Path, list[str]] = {}
    for name, info in sorted(base.tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        files.setdefault(info.file, []).append(name)
    with TensorReader(base) as reader, TensorReader(Checkpoint(adapter.root, adapter.tensors, None)) as factors:
        for file, names in files.items():
            writer = SafetensorsWriter(out / file.name, [(n, base.tensors[n].dtype, base.tensors[n].shape)
                                                         for n in names])
            try:
                for n in names:
                    writer.write(n, merged_tensor(n, reader, factors, plans.get(n)))
            except BaseException:
                writer.abort()
                raise
            writer.close()


def merged_tensor(name: str, reader: TensorReader, factors: TensorReader, plan: TensorPlan | None) -> torch.Tensor:
    """One base tensor with its plan applied: replaced by the adapter's saved tensor, then LoRA deltas added."""
    w = reader.read(name)
    if plan is None:
        return w
    if plan.replace is not None:
        w = factors.read(plan.replace).to(w.dtype)  # its own writable buffer: deltas are added in place
    if plan.deltas:
        add_deltas(name, w, plan.deltas, factors)
    if plan.biases:
        add_biases(name, w, plan.biases, factors)
    return w


def copy_side_files(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """config.json, generation config and other non-weight files from the base; the tokenizer from the adapter when
    it saved one, else from the base."""
    own_tokenizer = any((adapter_dir / n).is_file() for n in TOKENIZER_NAMES)
    for f in sorted(base_dir.iterdir()):
        if (not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name in (MARKER, PROVENANCE) or is_temp(f)
                or (own_tokenizer and f.name in TOKENIZER_NAMES)):
            continue
        shutil.copy2(f, out / f.name)
    if own_tokenizer:
        for n in TOKENIZER_NAMES:
            if (adapter_dir / n).is_file():
                shutil.copy2(adapter_dir / n, out / n)


# ----------------------------------------------------------------------------- the cache

def cache_root() -> Path:
    """crossroute's cache directory: CROSSROUTE_CACHE, else $XDG_CACHE_HOME/crossroute, else ~/.cache/crossroute."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "crossroute"


_DIGESTS: dict[tuple[Any, ...], str] = {}


def file_stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return path.name, st.st_size, st.st_mtime_ns


def merge_digest(adapter_dir: Path, base_dir: Path) -> str:
    """sha256 of the adapter's files (contents), the resolved base path and its files' sizes and times: a changed
    adapter or a re-saved base gives a new merge. Memoised per process on the files' sizes and times."""
    own = sorted(f for f in adapter_dir.iterdir() if f.is_file() and not f.name.startswith(".")
                 and f.name != "README.md")
    base_files = sorted(f for f in base_dir.iterdir() if f.is_file() and (f.name == "config.json"
                                                                          or f.name.endswith(".safetensors")))
    stamp = (MERGE_FORMAT, str(adapter_dir.resolve()), str(base_dir), tuple(map(file_stamp, own)),
             tuple(map(file_stamp, base_files)))
    if stamp not in _DIGESTS:
        h = hashlib.sha256(f"{MERGE_FORMAT}\0{base_dir}\0".encode())
        for f in own:
            with open(f, "rb") as fh:
                h.update(f"{f.name}\0".encode() + hashlib.file_digest(fh, "sha256").digest())
        for name, size, mtime in stamp[4]:
            h.update(f"{name}\0{size}\0{mtime}\0".encode())
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def cache_dir_for(adapter_dir: Path, base_dir: Path) -> Path:
    """<cache>/merged/<adapter name>-<digest>: the name keeps eval tables and file names readable."""
    label = re.sub(r"[^A-Za-z0-9._-]", "_", adapter_dir.resolve().name)[:60].strip("._") or "adapter"
    return cache_root() / "merged" / f"{label}-{merge_digest(adapter_dir, base_dir)[:24]}"


@contextlib.contextmanager
def merge_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock per merged directory, so that concurrent processes (a distributed launch) merge once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def merged_checkpoint(adapter_dir: str | Path, base: str | Path | None = None) -> Path:
    """The checkpoint directory of adapter + base merged (θ_base + scaling · B A), from the cache when present,
    else streamed there tensor by tensor and written atomically (one console line says so)."""
    root = Path(adapter_dir).expanduser()
    if not is_adapter(root):
        raise CrossrouteError(f"{root}: not an adapter directory (no {ADAPTER_CONFIG}, or it holds a full "
                              "checkpoint); pass the directory PeftModel.save_pretrained wrote.")
    base_dir = adapter_base(root, base)
    dest = cache_dir_for(root, base_dir)
    if (dest / MARKER).is_file():
        return dest
    with merge_lock(dest):
        if (dest / MARKER).is_file():  # another process merged it while this one waited
            return dest
        adapter = parse_adapter(root)
        ck = load_checkpoint(base_dir)
        if (ck.config or {}).get("quantization_config") is not None:
            raise CrossrouteError(f"{base_dir / 'config.json'}: a quantized base (quantization_config); merge the "
                                  "adapter into the unquantized checkpoint.")
        plans = merge_plan(adapter, ck)
        console.print(f"merging LoRA adapter {root} into base {base_dir} -> {dest}", highlight=False, soft_wrap=True)
        with atomic_dir(dest, force=False) as tmp:
            copy_side_files(root, base_dir, tmp)
            write_merged(adapter, ck, plans, tmp)
            (tmp / PROVENANCE).write_text(json.dumps({"adapter": str(root.resolve()), "base": str(base_dir),
                                                      "format": MERGE_FORMAT}, indent=2) + "\n")
    return dest


# ----------------------------------------------------------------------------- reporting

def effective_rank(a: torch.Tensor, b: torch.Tensor, scaling: float, tol: float = RANK_TOL) -> tuple[int, float]:
    """(rank, largest singular value) of δ = scaling · B A from QR of B and Aᵀ (r×r work, never the full matrix):
    singular values above tol × the largest count."""
    _, rb = torch.linalg.qr(b.double())
    _, ra = torch.linalg.qr(a.double().T)
    sv = torch.linalg.svdvals(abs(scaling) * (rb @ ra.T))
    top = float(sv.max()) if sv.numel() else 0.0
    return (int((sv > tol * top).sum()) if top > 0 else 0), top


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What an adapter is, for diff to report: r, alpha, scaling, rslora, targets, and per module its rank, alpha,
    scaling and the effective rank of its δ = scaling · B A."""
    adapter = parse_adapter(adapter_dir)
    cfg = adapter.config
    modules: dict[str, dict[str, Any]] = {}
    with TensorReader(Checkpoint(adapter.root, adapter.tensors, None)) as factors:
        for m in adapter.modules:
            rank, top = effective_rank(factors.read(m.a_key).float(), factors.read(m.b_key).float(), m.scaling)
            modules[m.module] = {"tensor": f"{m.module}.weight", "r": m.r, "alpha": m.alpha, "scaling": m.scaling,
                                 "effective_rank": rank, "top_singular_value": top, "embedding": m.embedding,
                                 "bias": m.bias_key is not None}
    return {"adapter": str(adapter.root), "base": cfg.get(BASE_FIELD), "peft_type": cfg["peft_type"], "r": cfg["r"],
            "alpha": cfg["lora_alpha"], "scaling": lora_scaling(float(cfg["lora_alpha"]), int(cfg["r"]),
                                                                bool(cfg.get("use_rslora"))),
            "use_rslora": bool(cfg.get("use_rslora")), "target_modules": cfg.get("target_modules"),
            "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
            "modules_to_save": cfg.get("modules_to_save") or [], "replaced_tensors": sorted(adapter.replaced),
            "modules": modules}
