"""Model I/O: load any local Hugging Face causal-LM checkpoint (safetensors only) and save one atomically."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from crossroute.core.atomic import atomic_dir
from crossroute.core.errors import CrossrouteError
from crossroute.io.safetensors import TensorInfo, check_readable
from crossroute.model.adapters import is_adapter, merged_checkpoint
from crossroute.model.default import DEFAULT_CHECKPOINT, DEFAULT_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.utils.loading_report import LoadStateDictInfo

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Loaded:
    """A model and its tokenizer, with the directory they came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path


def resolve_model_path(path: str | Path) -> Path:
    """Map the name 'default' to the shipped embedded checkpoint and a PEFT LoRA adapter directory to its merged
    checkpoint (model.adapters, cached); other values are local paths."""
    if str(path) == DEFAULT_NAME:
        return DEFAULT_CHECKPOINT
    path = Path(path).expanduser()
    return merged_checkpoint(path) if is_adapter(path) else path


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded or single), refusing pickle-only checkpoints."""
    files = [check_readable(f) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise CrossrouteError(
                f"{path / pickles[0]}: pickle-only checkpoint; crossroute reads safetensors only "
                "(never unpickles). Convert it once with a trusted tool, e.g. "
                "`model.save_pretrained(dir, safe_serialization=True)`."
            )
        raise CrossrouteError(f"{path}: no *.safetensors weights found; point --model at a checkpoint directory.")
    return files


# config.json fields that are sizes or counts: a negative value would reach a tensor constructor (traceback)
_SIZE_FIELD = re.compile(r"(?:_size|_dim|_heads|_layers|_experts|_embeddings)$|^num_|^n_[a-z]+$")


def read_config_json(cfg_file: Path) -> dict[str, Any]:
    """config.json as a mapping, refusing invalid JSON, a non-object and negative sizes with one line."""
    try:
        cfg = json.loads(check_readable(cfg_file).read_text())
    except json.JSONDecodeError as e:
        raise CrossrouteError(f"{cfg_file}: invalid JSON at line {e.lineno} ({e.msg}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CrossrouteError(f"{cfg_file}: cannot read ({e}); re-save the checkpoint's config.json.") from None
    if not isinstance(cfg, dict):
        raise CrossrouteError(f"{cfg_file}: a JSON {type(cfg).__name__}, not an object of config fields; use the "
                              "config.json saved with the model.")
    for where, sub in (("", cfg), ("text_config.", cfg.get("text_config"))):
        for key, value in (sub.items() if isinstance(sub, dict) else ()):
            if (_SIZE_FIELD.search(key) and isinstance(value, int | float) and not isinstance(value, bool)
                    and value < 0):
                raise CrossrouteError(f"{cfg_file}: {where}{key} is {value}; a size or count cannot be negative: "
                                      "use the config.json saved with the model.")
    return cfg


def check_checkpoint_dir(path: str | Path, need_tokenizer: bool = True) -> Path:
    """Validate a checkpoint directory before any heavy loading; return it resolved.

    Besides config.json and the files, the safetensors headers must hold exactly the tensors (names, shapes) that
    config.json's architecture expects (check_tensors_match_config): nothing would be initialised at random."""
    path = resolve_model_path(path)
    check_readable(path)
    if not path.exists():
        raise CrossrouteError(f"{path}: no such checkpoint directory; pass a local Hugging Face checkpoint path.")
    if not path.is_dir():
        raise CrossrouteError(f"{path}: is a file; pass the checkpoint directory that holds config.json.")
    cfg_file = path / "config.json"
    if not check_readable(cfg_file).exists():
        raise CrossrouteError(f"{cfg_file}: missing; a Hugging Face checkpoint directory needs config.json.")
    cfg = read_config_json(cfg_file)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CrossrouteError(f"{cfg_file}: architectures must be a list of class names, got {archs!r}.")
    causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
              else model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not causal or not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CrossrouteError(
            f"{cfg_file}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not a causal "
            "language model; crossroute needs a decoder-only checkpoint (e.g. Qwen3ForCausalLM, LlamaForCausalLM)."
        )
    safetensors_files(path)
    if need_tokenizer and not any((path / f).exists() for f in TOKENIZER_FILES):
        raise CrossrouteError(
            f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json); save the tokenizer "
            "next to the weights with `tokenizer.save_pretrained(dir)`."
        )
    check_tensors_match_config(path, cfg)
    if need_tokenizer:
        from crossroute.io.integrity import check_tokenizer_matches

        check_tokenizer_matches(path)  # token ids past the embedding: refused before any run directory is made
    return path


def load_config(path: Path) -> PretrainedConfig:
    """transformers' config object of a checkpoint, any failure as one line naming config.json."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (config classes raise anything for a bad field)
        raise CrossrouteError(f"{path / 'config.json'}: transformers cannot read it ({type(e).__name__}: "
                              f"{_first_line(e)}); fix that field or use the config.json saved with the "
                              "model.") from None


def meta_model(path: Path, config: PretrainedConfig) -> PreTrainedModel | None:
    """The checkpoint's architecture built on the meta device (no memory, no random values): its state dict is
    what the weights must provide. None when transformers maps the config to no causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        return None
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception as e:  # noqa: BLE001 (model constructors raise anything for an inconsistent config)
        raise CrossrouteError(f"{path / 'config.json'}: transformers cannot build {cls.__name__} from it "
                              f"({type(e).__name__}: {_first_line(e)}); fix the sizes it names or use the "
                              "config.json saved with the model.") from None


def _first_line(e: BaseException) -> str:
    """The gist of an exception's message: its first line (with the next when the first ends in a colon)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def dry_load(path: Path, model: PreTrainedModel, tensors: dict[str, TensorInfo]) -> LoadStateDictInfo | None:
    """transformers' own key matching (renamings, MoE expert fusing, prefixes, tied and ignorable keys) run
    on meta tensors shaped like the header: the missing, unexpected and mis-shaped keys a real load would
    meet, without reading or initialising any weight. None when this transformers lacks the internals."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None
    state = {n: torch.empty(i.shape, dtype=i.dtype, device="meta") for n, i in tensors.items()}
    try:
        load_cfg = LoadStateDictConfig(device_map={"": "meta"}, weight_mapping=get_model_conversion_mapping(model))
        info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=state, load_config=load_cfg)
        adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
        if adjust is not None:
            adjust(info)
    except Exception as e:  # noqa: BLE001 (transformers' converters raise anything on odd tensors)
        raise CrossrouteError(f"{path}: transformers cannot match the weights with "
                              f"config.json ({type(e).__name__}: {_first_line(e)}); use the config.json saved with "
                              "these weights, or re-save the checkpoint with save_pretrained.") from None
    info.missing_keys = untied_missing(model, set(info.missing_keys))
    return info


def untied_missing(model: PreTrainedModel, missing: set[str]) -> set[str]:
    """Missing keys less tied weights (lm_head tied to embed_tokens): transformers ties a group from any one
    member the checkpoint has, in either direction."""
    groups: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        groups.setdefault(source, {source}).add(target)
    for group in groups.values():
        if group - missing:
            missing -= group
    return missing


def config_layers(cfg: dict[str, Any]) -> int | None:
    """num_hidden_layers of a raw config.json (GPT-2's n_layer; a multimodal config's text_config), None if absent."""
    for sub in (cfg, cfg.get("text_config")):
        if isinstance(sub, dict):
            n = sub.get("num_hidden_layers", sub.get("n_layer"))
            if isinstance(n, int) and not isinstance(n, bool):
                return n
    return None


def check_tensors_match_config(path: Path, cfg: dict[str, Any] | None = None) -> None:
    """Refuse, before any load, a checkpoint whose tensors differ from what config.json's architecture expects:
    a config/weights layer-count mismatch, then the first missing, unexpected or mis-shaped tensor."""
    from crossroute.io.integrity import check_layer_count, check_state_dict_report, header_tensors

    tensors = header_tensors(path)
    cfg = read_config_json(path / "config.json") if cfg is None else cfg
    mtp = cfg.get("num_nextn_predict_layers")
    check_layer_count(path / "config.json", config_layers(cfg), tensors, mtp if isinstance(mtp, int) else 0)
    config = load_config(path)
    if cfg.get("quantization_config") is not None:
        return  # pre-quantized weights are matched by transformers' quantizer; load_model checks the result
    model = meta_model(path, config)
    info = None if model is None else dry_load(path, model, tensors)
    if model is None or info is None:
        return  # load_model's check of transformers' loading report still refuses random or dropped tensors
    check_state_dict_report(path, tensors, type(model).__name__, set(info.missing_keys), set(info.unexpected_keys),
                            list(info.mismatched_keys), dict(info.conversion_errors))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the checkpoint's tokenizer from the local directory, left-padded, with a pad token."""
    path = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CrossrouteError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]}).") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def default_device(device: str | torch.device | None = None) -> str:
    """`device` if given, else the first CUDA GPU when one is visible, else the CPU."""
    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def causal_lm_class(path: Path) -> type | None:
    """The transformers class a checkpoint's config.json maps to (None when transformers does not know it)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return None


def pick_attn_implementation(path: str | Path, setting: str | None = "auto", double_backward: bool = False) -> str:
    """The attention kernel to load with: `setting` when explicit; for "auto", eager where a double backward
    is needed (fused SDPA kernels have none) or the architecture lacks SDPA (Gemma2), sdpa elsewhere."""
    setting = setting or "auto"
    if setting not in ATTN_CHOICES:
        raise CrossrouteError(f"attn_implementation {setting!r}: use one of {', '.join(ATTN_CHOICES)}.")
    if setting != "auto":
        return setting
    if double_backward:
        return "eager"
    cls = causal_lm_class(resolve_model_path(path))
    return "sdpa" if cls is not None and getattr(cls, "_supports_sdpa", False) else "eager"


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = "auto",
    device: str | torch.device | None = None,
    double_backward: bool = False,
) -> Loaded:
    """Load a local causal-LM checkpoint and its tokenizer from safetensors (no hub, no pickle).

    `device` None: CUDA when available (crossroute.model.default_device), else the CPU. `attn_implementation`
    "auto" picks per architecture (pick_attn_implementation); `double_backward` asks for a twice-differentiable
    kernel (HVPs)."""
    path = check_checkpoint_dir(path)
    attn_implementation = pick_attn_implementation(path, attn_implementation, double_backward)
    from crossroute.io.integrity import check_weights

    check_weights(path)  # NaN/inf, truncated or corrupt shards: one line naming file and tensor
    # (check_checkpoint_dir already matched the tensors with config.json and the tokenizer with the embedding)
    tokenizer = load_tokenizer(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise CrossrouteError(f"{path}: cannot load the model ({str(e).splitlines()[0]}).") from None
    check_loading_info(path, type(model).__name__, info)
    model.to(default_device(device))
    model.eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model=model, tokenizer=tokenizer, path=path)


def check_loading_info(path: Path, arch: str, info: dict[str, Any]) -> None:
    """After the load, transformers' own report must be clean too: a key it initialised at random or dropped is
    refused (a second guard behind check_tensors_match_config, e.g. for quantized checkpoints)."""
    from crossroute.io.integrity import check_state_dict_report

    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        check_state_dict_report(path, {}, arch, missing, unexpected, mismatched, {})


_LAYER_PARAM_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def params_in_layers(model: torch.nn.Module, layers: Sequence[int]) -> list[str]:
    """Names of the parameters of decoder layers `layers` (HF `...layers.<i>....` naming), refusing a
    layer the model does not have."""
    want = set(layers)
    names, seen = [], set()
    for name, _ in model.named_parameters():
        m = _LAYER_PARAM_RE.search(name)
        if m is not None:
            seen.add(int(m.group(1)))
            if int(m.group(1)) in want:
                names.append(name)
    missing = sorted(want - seen)
    if missing:
        raise CrossrouteError(f"--layers: the model has decoder layers 0-{max(seen, default=-1)}, not "
                              f"{missing[0]}; pick layers it has.")
    return names


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None, force: bool = False) -> Path:
    """Save weights (safetensors), config and tokenizer into `path`, atomically (temp dir + rename).

    `state_dict`: the full weights when the model's own are sharded (DeepSpeed ZeRO-3, FSDP), as
    `accelerator.get_state_dict(model)` gathers them. An existing `path` is replaced only when crossroute wrote
    it (its .crossroute marker) or `force`; a full disk is one line naming `path` (core.atomic.atomic_dir)."""
    path = Path(path)
    with atomic_dir(path, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return path




