"""Embedded presets: the model size, pretraining recipe and demo sequence of each built-in model.

`default` is the shipped ~0.8 M-parameter model that runs on a laptop CPU; `gpu` is a ~69 M-parameter
model of the same architecture, tokenizer and domains that `crossroute demo --preset gpu` pretrains
itself on one GPU, so the same pipeline is exercised at a size where GPU kernels, bf16 and memory matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.core.errors import CrossrouteError
from crossroute.model.default import ASSETS, DEFAULT_CHECKPOINT


@dataclass(frozen=True)
class Preset:
    """One embedded model size: architecture overrides, pretraining overrides, and what its demo runs."""

    name: str
    description: str
    arch: dict[str, Any] = field(default_factory=dict)  # Qwen3Config overrides of model.default_config
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainConfig overrides
    sequence: Path = ASSETS / "demo_sequence.yaml"  # the demo's train config
    shipped: Path | None = DEFAULT_CHECKPOINT  # a shipped checkpoint, or None: the demo pretrains one
    full_demo: bool = True  # also the protected sequence, CPI-FT and RL-vs-SFT parts
    needs_cuda: bool = False


PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        description="~0.8 M parameters (4 layers, hidden 128), shipped pretrained; runs on a laptop CPU",
    ),
    "gpu": Preset(
        name="gpu",
        description="~69 M parameters (8 layers, hidden 768, 12 heads, 4 KV groups); pretrained by the demo "
        "on one GPU",
        arch=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64),
        pretrain=dict(steps=1500, batch_size=128, learning_rate=6e-4, warmup_steps=150),
        sequence=ASSETS / "gpu_sequence.yaml",
        shipped=None,
        full_demo=False,
        needs_cuda=True,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a one-line error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise CrossrouteError(f"unknown preset {name!r}; use one of: {', '.join(PRESETS)}.") from None


def require_device(preset: Preset) -> None:
    """Refuse a GPU preset on a machine without CUDA (it would take hours on a CPU)."""
    if preset.needs_cuda and not torch.cuda.is_available():
        raise CrossrouteError(f"preset {preset.name!r} needs a CUDA GPU and none is visible; run "
                              "`crossroute demo` (the CPU preset) here, or this command on a GPU machine.")
