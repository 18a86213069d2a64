"""Mixed multi-domain RL (crossroute.train.mixture): prompts drawn by weight, each rewarded only by its own
domain's scorer, and a mixed GRPO stage whose per-domain rewards appear in its log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains.builtin import BUILTIN
from crossroute.experiments.sequence import parse_train_config, run_training, stage_names
from crossroute.model.load import load_tokenizer
from crossroute.train.mixture import DOMAIN_COLUMN, mixture_counts, mixture_rewards, mixture_rows


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(["math", "code", "qa", "cw"]), st.floats(0.01, 10), min_size=1),
       st.integers(0, 500))
def test_counts_sum_to_n_and_follow_the_weights(weights: dict[str, float], n: int) -> None:
    counts = mixture_counts(weights, n)
    assert sum(counts.values()) == n
    total = sum(weights.values())
    assert all(abs(counts[d] - n * w / total) < 1 for d, w in weights.items())


def test_each_prompt_is_rewarded_by_its_own_domain_only(tiny_ckpt: Path) -> None:
    doms = [BUILTIN["math"], BUILTIN["qa"]]
    rows = mixture_rows(doms, {"math": 3, "qa": 1}, 40, seed=0, tokenizer=load_tokenizer(tiny_ckpt))
    tags = [r[DOMAIN_COLUMN] for r in rows]
    assert tags.count("math") == 30 and tags.count("qa") == 10 and tags != sorted(tags)  # weighted, shuffled
    completions = [r.get("answer") or "x" for r in rows]  # the reference: full marks where the scorer reads it
    cols = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r} - {"prompt"}}
    prompts = [r["prompt"] for r in rows]
    got = [f(prompts, completions, **cols) for f in mixture_rewards(doms)]
    assert [f.__name__ for f in mixture_rewards(doms)] == ["reward_math", "reward_qa"]
    for k, d in enumerate(doms):
        own = [i for i, t in enumerate(tags) if t == d.name]
        assert all(got[k][i] is None for i in range(len(rows)) if i not in own)
        sub = {c: [v[i] for i in own] for c, v in cols.items()}
        assert [got[k][i] for i in own] == d.reward_func()([prompts[i] for i in own], [completions[i] for i in own],
                                                           **sub)
        assert sum(got[k][i] for i in own) > 0  # the reference answers score


def _raw(model: Path, domain: object) -> dict:
    return {"model": str(model), "domains": ["math", "qa", "cw"], "eval_n": 4, "train_prompts": 16, "kl_n": 2,
            "grpo": {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 4,
                     "logging_steps": 1},
            "stages": [{"domain": domain, "steps": 2}]}


def test_a_mixed_stage_trains_and_logs_each_domains_reward(tmp_path: Path, tiny_ckpt: Path) -> None:
    cfg = parse_train_config(_raw(tiny_ckpt, {"math": 2.0, "qa": 1.0}))
    assert stage_names(cfg) == ["01_math+qa"]
    result = run_training(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "logs" / "01_math+qa.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "reward" in r]
    assert len(logged) == 2
    assert all("rewards/reward_math/mean" in r and "rewards/reward_qa/mean" in r for r in logged)
    assert set(result["own_stage_gain"]) == {"01_math+qa:math", "01_math+qa:qa"}
    assert set(result["paired"]["forgetting"]["math"]) >= {"from", "to"}
    assert [p["domain"] for p in result["forgetting_vs_kl"]["points"]] == ["cw"]


@pytest.mark.parametrize(("domain", "needle"), [
    ([], "a mixed stage needs at least one domain"),
    (["math", "math"], "each domain once"),
    ({"math": 1.0, "qa": 0.0}, "weights must be finite and > 0"),
    (["math", "chess"], "stages[0].domain 'chess' is not declared"),
])
def test_bad_mixtures_are_refused_by_name(tiny_ckpt: Path, domain: object, needle: str) -> None:
    with pytest.raises(CrossrouteError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_train_config(_raw(tiny_ckpt, domain), "cfg.yaml")


def test_refresh_and_protect_take_one_domain(tiny_ckpt: Path) -> None:
    raw = {**_raw(tiny_ckpt, "math"), "refresh": {"domain": ["math", "qa"], "steps": 1}}
    with pytest.raises(CrossrouteError, match="refresh.domain: a mixture is for sequence stages"):
        parse_train_config(raw, "cfg.yaml")


def test_mixed_rl_runs_beside_the_sequence_and_is_compared_paired(tmp_path: Path, tiny_ckpt: Path) -> None:
    raw = {**_raw(tiny_ckpt, "math"), "stages": [{"domain": "math", "steps": 1}, {"domain": "qa", "steps": 2}],
           "mixed": {}}
    result = run_training(parse_train_config(raw), tmp_path / "run")
    mx = result["mixed_vs_sequential"]
    assert (mx["steps"], mx["weights"], mx["sequential"], mx["mixed"]) == (3, {"math": 1.0, "qa": 2.0}, "02_qa",
                                                                          "mixed/01_math+qa")
    assert (tmp_path / "run" / "mixed" / "checkpoints" / "01_math+qa" / "model.safetensors").exists()
    for d, v in mx["difference"].items():  # mixed minus sequential, paired: the means' difference
        assert v["value"] == pytest.approx(mx["scores"]["mixed"][d] - mx["scores"]["sequential"][d], abs=1e-6)
    from crossroute.report.build import build_report

    assert "Mixed RL beside the sequence" in build_report(tmp_path / "run").read_text()
