"""A LoRA GRPO stage (a stage's `peft:`, passed to TRL as a LoraConfig) on CPU: only the targeted weights move, by
an update of rank at most r; the adapter lands in RUN/adapters/<stage>/ and the checkpoint holds merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossroute.core.errors import CrossrouteError
from crossroute.experiments.sequence import parse_train_config, run_training


def _length_reward(completions: list, **kwargs: object) -> list[float]:
    return [float(len(c)) for c in completions]  # the tiny model scores 0 everywhere: length moves its weights


def _raw(model: Path, peft: dict) -> dict:
    return {"model": str(model), "domains": ["math"], "eval_n": 4, "train_prompts": 16, "kl_n": 0,
            "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4,
                     "learning_rate": 5e-2},
            "stages": [{"domain": "math", "steps": 2, "peft": peft}]}


def test_a_lora_stage_moves_only_its_targets_by_rank_r(tmp_path: Path, tiny_ckpt: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from crossroute.domains.domain import Domain

    monkeypatch.setattr(Domain, "reward_func", lambda self: _length_reward)
    r = 2
    raw = _raw(tiny_ckpt, {"r": r, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0})
    run_training(parse_train_config(raw), tmp_path / "run")
    base = load_file(str(tiny_ckpt / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "checkpoints" / "01_math" / "model.safetensors"))
    assert set(after) == set(base)  # merged: a full checkpoint, no lora_ keys
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)
    for k in moved:
        assert torch.linalg.matrix_rank((after[k] - base[k]).double(), atol=1e-6) <= r
    cfg = json.loads((tmp_path / "run" / "adapters" / "01_math" / "adapter_config.json").read_text())
    assert cfg["r"] == r and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(("peft", "needle"), [
    ({"r": 2, "rank": 3}, "stages[0].peft.rank: not a field of LoraConfig"),
    ({"r": 2, "use_dora": True}, "stages[0].peft.use_dora: DoRA is not supported"),
])
def test_bad_peft_settings_are_refused_by_name(tiny_ckpt: Path, peft: dict, needle: str) -> None:
    with pytest.raises(CrossrouteError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_train_config(_raw(tiny_ckpt, peft), "cfg.yaml")
