"""Model I/O: load any local Hugging Face causal-LM checkpoint (safetensors only) and save one atomically."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
from crossroute.model.default import DEFAULT_CHECKPOINT, DEFAULT_NAME

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
    """Map the name 'default' to the shipped embedded checkpoint; other values are local paths."""
    if str(path) == DEFAULT_NAME:
        return DEFAULT_CHECKPOINT
    return Path(path).expanduser()


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded or single), refusing pickle-only checkpoints."""
    files = sorted(path.glob("*.safetensors"))
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


def check_checkpoint_dir(path: str | Path, need_tokenizer: bool = True) -> Path:
    """Validate a checkpoint directory before any heavy loading; return it resolved."""
    path = resolve_model_path(path)
    if not path.exists():
        raise CrossrouteError(f"{path}: no such checkpoint directory; pass a local Hugging Face checkpoint path.")
    if not path.is_dir():
        raise CrossrouteError(f"{path}: is a file; pass the checkpoint directory that holds config.json.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CrossrouteError(f"{cfg_file}: missing; a Hugging Face checkpoint directory needs config.json.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CrossrouteError(f"{cfg_file}: invalid JSON at line {e.lineno} ({e.msg}).") from None
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    causal = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) if archs
              else model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not causal or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
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
    return path


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
    from crossroute.io.integrity import check_tokenizer_matches, check_weights

    check_weights(path)  # NaN/inf, truncated or corrupt shards: one line naming file and tensor
    check_tokenizer_matches(path)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError) as e:
        raise CrossrouteError(f"{path}: cannot load the model ({str(e).splitlines()[0]}).") from None
    model.to(default_device(device))
    model.eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Loaded(model=model, tokenizer=tokenizer, path=path)


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
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save weights (safetensors), config and tokenizer into `path`, atomically (temp dir + rename).

    `state_dict`: the full weights when the model's own are sharded (DeepSpeed ZeRO-3, FSDP), as
    `accelerator.get_state_dict(model)` gathers them."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return path




