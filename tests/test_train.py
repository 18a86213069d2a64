"""Sequential GRPO training: config validation, a 2-stage tiny run, resume after an injected failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import crossroute.train as train
from crossroute.errors import CrossrouteError
from crossroute.train import forgetting_summary, load_train_config, parse_train_config, run_training


def tiny_config(model: Path, steps: int = 2) -> dict[str, Any]:
    return {
        "model": str(model),
        "domains": ["math", "qa"],
        "eval_n": 8,
        "train_prompts": 40,
        "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6,
                 "learning_rate": 1e-2, "logging_steps": 1, "temperature": 1.0},
        "stages": [{"domain": "math", "steps": steps}, {"domain": "qa", "steps": steps}],
        "refresh": {"domain": "math", "steps": 1},
    }


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"stagez": []}, "field stagez: unknown field"),
        ({"stages": [{"domain": "chess", "steps": 1}]}, "cfg.yaml: stages[0].domain 'chess' is not in domains"),
        ({"domains": ["math", "chess"]}, "field domains: unknown domain 'chess'"),
        ({"stages": [{"domain": "math", "steps": 0}]}, "field stages.0.steps"),
        ({"stages": [{"domain": "math", "steps": 1, "lr": 1}]}, "field stages.0.lr: unknown field"),
        ({"stages": []}, "field stages"),
        ({"grpo": {"num_generations": 3, "per_device_train_batch_size": 8}},
         "stages[0].grpo: generation_batch_size (8) must be divisible by num_generations (3)"),
        ({"grpo": {"num_generations": 1, "per_device_train_batch_size": 8}}, "stages[0].grpo"),
        ({"grpo": {"learning_rat": 1e-3}}, "stages[0].grpo.learning_rat: not a GRPOConfig field"),
        ({"refresh": {"domain": "cw", "steps": 1}}, "refresh.domain 'cw' is not in domains"),
    ],
)
def test_config_errors_name_the_field(tiny_ckpt: Path, patch: dict[str, Any], needle: str) -> None:
    raw = {**tiny_config(tiny_ckpt), **patch}
    with pytest.raises(CrossrouteError) as e:
        parse_train_config(raw, "cfg.yaml")
    assert needle in str(e.value), str(e.value)
    assert str(e.value).startswith("cfg.yaml")


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(CrossrouteError, match="bad.yaml: invalid YAML"):
        load_train_config(bad)


def test_shipped_configs_validate() -> None:
    root = Path(__file__).parents[1] / "configs"
    cfg = load_train_config(root / "default_sequence.yaml")
    assert [s.domain for s in cfg.stages] == ["math", "code", "qa", "cw"] and cfg.refresh is not None
    from crossroute.demo import CPIFT_CONFIG, DEMO_CONFIG

    assert DEMO_CONFIG.read_text() == (root / "default_sequence.yaml").read_text()  # the demo runs this config
    assert CPIFT_CONFIG.read_text() == (root / "cpift_default.yaml").read_text()
    raw = yaml.safe_load((root / "qwen3_real.yaml").read_text())
    assert raw["grpo"]["use_vllm"] is True  # documented real-checkpoint example


def test_forgetting_summary_hand_computed() -> None:
    rows = ["base", "01_math", "02_qa", "refresh_math"]
    m = [[10.0, 50.0], [30.0, 45.0], [20.0, 60.0], [28.0, 59.0]]
    s = forgetting_summary(rows, m, ["math", "qa"], ["math", "qa"], refresh_row=3)
    assert s["peak"] == {"math": 30.0, "qa": 60.0}
    assert s["forgetting"] == {"math": 10.0, "qa": 0.0}
    assert s["backward_transfer"] == -10.0
    assert s["average_final"] == 40.0 and s["average_base"] == 30.0
    assert s["own_stage_gain"] == {"01_math": 20.0, "02_qa": 15.0}
    r = s["refresh"]
    assert r["recovered_points"] == 8.0 and r["recovery_share"] == pytest.approx(0.8)
    assert r["others_change"] == {"qa": -1.0}


@pytest.mark.slow
def test_two_stage_run_then_resume_after_failure(tmp_path: Path, tiny_ckpt: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_train_config(tiny_config(tiny_ckpt))
    real = train._run_stage
    calls: list[str] = []

    def failing(cfg_: Any, stage: Any, name: str, *a: Any) -> None:
        calls.append(name)
        if name == "02_qa":
            raise RuntimeError("injected failure")
        real(cfg_, stage, name, *a)

    monkeypatch.setattr(train, "_run_stage", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run_training(cfg, out)
    assert (out / "checkpoints" / "01_math" / "model.safetensors").exists()
    assert not (out / "checkpoints" / "02_qa").exists()
    mtime = (out / "checkpoints" / "01_math" / "model.safetensors").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(train, "_run_stage", lambda *a: (calls.append(a[2]), real(*a)))
    result = run_training(cfg, out)
    assert calls == ["02_qa", "refresh_math"]  # the finished stage was not redone
    assert (out / "checkpoints" / "01_math" / "model.safetensors").stat().st_mtime_ns == mtime
    assert result["rows"] == ["base", "01_math", "02_qa", "refresh_math"]
    assert len(result["matrix"]) == 4 and all(len(r) == 2 for r in result["matrix"])
    assert (out / "results" / "forgetting.json").exists()

    calls.clear()
    run_training(cfg, out)  # a finished run is not retrained
    assert calls == []

    other = parse_train_config({**tiny_config(tiny_ckpt), "seed": 1})
    with pytest.raises(CrossrouteError, match="different config"):
        run_training(other, out)
