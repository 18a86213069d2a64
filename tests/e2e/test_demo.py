"""The demo's preset path (pretrain -> sequence -> refresh -> diagnosis -> rollback -> report) on CPU.

The gpu preset runs this same code on a CUDA device; here a preset of the same shape (no shipped
checkpoint, pretrained by the demo, short demo) but with a tiny model runs it end to end on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from crossroute.cli.main import app
from crossroute.core.errors import CrossrouteError
from crossroute.experiments.demo import run_demo
from crossroute.model.presets import PRESETS, Preset, get_preset
from crossroute.train.pretrain import PretrainConfig

TINY_ARCH = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)


def _tiny_preset(tmp_path: Path) -> Preset:
    seq = {"model": "default", "domains": ["math", "code"], "eval_n": 4, "train_prompts": 16, "seed": 0,
           "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 6,
                    "learning_rate": 1e-3, "beta": 0.0, "logging_steps": 1},
           "stages": [{"domain": "math", "steps": 2}, {"domain": "code", "steps": 2}],
           "refresh": {"domain": "math", "steps": 1}}
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(seq))
    return Preset(name="tiny", description="test", arch=TINY_ARCH,
                  pretrain=dict(steps=5, batch_size=8, pool_per_domain=20), sequence=path, shipped=None,
                  full_demo=False)


def test_preset_registry() -> None:
    gpu = PretrainConfig.for_preset("gpu")
    assert gpu.arch == PRESETS["gpu"].arch and gpu.steps == PRESETS["gpu"].pretrain["steps"]
    assert PretrainConfig.for_preset("default") == PretrainConfig()  # the shipped recipe is unchanged
    with pytest.raises(CrossrouteError, match="unknown preset 'huge'; use one of: default, gpu"):
        get_preset("huge")


def test_gpu_preset_size() -> None:
    """The gpu preset is 50-150 M parameters of the default's architecture (counted without building it)."""
    a = {**PRESETS["gpu"].arch}
    h, i, n, q, kv, d = (a[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "head_dim"))
    per_layer = h * q * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h + 2 * d
    total = n * per_layer + 83 * h + h  # tied embeddings (83 char tokens) and the final norm
    assert 50e6 <= total <= 150e6


def test_gpu_preset_needs_cuda(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--preset", "gpu", "--out", str(tmp_path / "r")])
    if res.exit_code == 0:  # pragma: no cover - only on a CUDA machine
        pytest.skip("CUDA is available here")
    assert "needs a CUDA GPU" in str(res.exception) and not (tmp_path / "r").exists()


def test_preset_demo_end_to_end_and_resume(tmp_path: Path) -> None:
    preset = _tiny_preset(tmp_path)
    out = tmp_path / "run"
    report = run_demo(out, preset=preset)
    assert report.exists() and "forgetting" in report.read_text().lower()
    cfg = json.loads((out / "checkpoints" / "base" / "config.json").read_text())
    assert cfg["hidden_size"] == 16 and cfg["num_hidden_layers"] == 2
    results = out / "results"
    stats = json.loads((results / "pretrain.json").read_text())
    assert stats["config"]["arch"] == TINY_ARCH and stats["parameters"] > 0
    forgetting = json.loads((results / "forgetting.json").read_text())
    assert forgetting["rows"] == ["base", "01_math", "02_code", "refresh_math"]
    for name in ("diff", "routes", "damage_math", "rollback_math"):
        assert (results / f"{name}.json").exists(), name
    assert not (results / "cpift.json").exists()  # the short demo skips the default preset's extra parts
    base_mtime = (out / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns
    run_demo(out, preset=preset)  # resumes: nothing is retrained
    assert (out / "checkpoints" / "base" / "model.safetensors").stat().st_mtime_ns == base_mtime


def test_multi_seed_demo_runs_on_a_pool_aggregates_and_resumes(tmp_path: Path) -> None:
    preset = _tiny_preset(tmp_path)
    out = tmp_path / "run"
    report = run_demo(out, preset=preset, seeds=[0, 1], workers=2)
    demo = json.loads((out / "results" / "demo.json").read_text())
    assert demo["seeds"] == [0, 1] and demo["workers"] == 2
    assert sorted((c["seed"], c["part"]) for c in demo["costs"]) == [
        (s, p) for s in (0, 1) for p in ("diagnosis", "repair", "sequence")]
    per = [json.loads((out / "seeds" / str(k) / "results" / "forgetting.json").read_text()) for k in (0, 1)]
    agg = json.loads((out / "results" / "forgetting.json").read_text())["seeds"]["aggregate"]
    assert agg["forgetting:math"]["values"] == [p["paired"]["forgetting"]["math"]["value"] for p in per]
    sets = [sorted((out / "seeds" / str(k) / "eval_sets").glob("*.jsonl")) for k in (0, 1)]
    assert [p.read_bytes() for p in sets[0]] == [p.read_bytes() for p in sets[1]]  # the same prompts in every seed
    for k in (0, 1):  # each seed's run trains with its seed (the tiny model's rewards are all 0: no update to see)
        assert yaml.safe_load((out / "seeds" / str(k) / "run.yaml").read_text())["seed"] == k
    measured = [r for r in demo["summary"] if r["verdict"] != "not measured in this run"]
    assert measured and all("across 2 seeds" in e["how"] and len(e["per_seed"]) == 2
                            for r in measured for e in r["estimates"])
    page = report.read_text()
    assert "Across training seeds" in page and (out / "seeds" / "0" / "report.html").exists()
    assert (out / "logs" / "seed1_repair.log").exists()
    mtime = (out / "seeds" / "1" / "checkpoints" / "02_code" / "model.safetensors").stat().st_mtime_ns
    run_demo(out, preset=preset, seeds=[0, 1], workers=2)  # resumes: nothing is retrained
    assert (out / "seeds" / "1" / "checkpoints" / "02_code" / "model.safetensors").stat().st_mtime_ns == mtime


def test_quick_demo_is_one_seed_in_out_with_the_sequence_and_its_diagnosis(tmp_path: Path) -> None:
    preset = _tiny_preset(tmp_path)
    out = tmp_path / "quick"
    run_demo(out, preset=preset, quick=True)
    results = out / "results"
    assert (results / "forgetting.json").exists() and (results / "diff.json").exists()
    assert (results / "diff_bfloat16.json").exists() and (results / "routes.json").exists()
    assert not (results / "rollback_math.json").exists() and not (out / "seeds").exists()
    demo = json.loads((results / "demo.json").read_text())
    assert demo["seeds"] == [0] and demo["parts"] == ["sequence", "diagnosis"] and "summary" not in demo
