"""Circuits: attribution agrees with activation patching, self-patching is exact, pairs and JSONL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tiny
from crossroute.analyze.circuits import (
    HeadHooks,
    batch_metric,
    circuit_of_model,
    load_pairs_jsonl,
    make_pair_batches,
    overlap,
    pairs_for,
    parse_models,
    run_circuits,
)
from crossroute.core.errors import CrossrouteError
from crossroute.domains.builtin import ENTITIES, KB
from crossroute.model.default import build_default_model
from crossroute.report.sections.circuits import render_circuits_section


def _tiny(seed: int = 0):
    model, tok = build_default_model(seed, **TINY)
    return model.eval(), tok


def _planted(seed: int = 0, layer: int = 1, head: int = 0, scale: float = 4.0):
    """A tiny model where only one head's o_proj columns are non-zero: only that head can matter."""
    model, tok = _tiny(seed)
    hd = TINY["head_dim"]
    with torch.no_grad():
        for i, lyr in enumerate(model.model.layers):
            w = lyr.self_attn.o_proj.weight
            keep = w[:, head * hd:(head + 1) * hd].clone() * scale
            w.zero_()
            if i == layer:
                w[:, head * hd:(head + 1) * hd] = keep
    return model, tok


def test_attribution_agrees_with_activation_on_planted_head() -> None:
    torch.manual_seed(0)
    model, tok = _planted()
    pairs = pairs_for("math", 24)
    res = circuit_of_model(model, tok, pairs, target=0.8, confirm_top=4, batch_size=8)
    attr = torch.tensor(res.attribution)
    act = torch.tensor([[float("nan") if v is None else v for v in row] for row in res.activation])
    assert not torch.isnan(act).any()  # 4 heads, all confirmed
    # only the planted head has an effect, in both estimates; the others are exactly 0
    others = torch.ones_like(attr, dtype=torch.bool)
    others[1, 0] = False
    assert attr[others].abs().max() == 0 and act[others].abs().max() == 0
    assert attr[1, 0] != 0 and act[1, 0] != 0
    assert (attr[1, 0] > 0) == (act[1, 0] > 0)  # same sign
    # same rank: the planted head is first by |effect| in both
    assert int(attr.abs().flatten().argmax()) == int(act.abs().flatten().argmax()) == 2
    assert res.ranking[0] == "L1.head.0"
    # first order is close here (within 20-30 % of the measured effect over different random pair sets)
    assert float(attr[1, 0]) == pytest.approx(float(act[1, 0]), rel=0.35)
    assert res.attribution_vs_activation["sign_agreement"] == 1.0
    # everything runs through that head: it alone recovers the whole clean-corrupted gap
    assert res.circuit == ["L1.head.0"]
    assert res.curve_faithfulness[res.curve_k.index(1)] == pytest.approx(1.0, abs=1e-5)
    assert res.curve_faithfulness[0] == pytest.approx(0.0, abs=1e-5)


def test_patching_every_head_with_its_own_activations_changes_nothing() -> None:
    model, tok = _tiny(3)
    batches = make_pair_batches(tok, pairs_for("qa", 10), 4)
    hooks = HeadHooks(model)
    try:
        with torch.no_grad():
            for b in batches:
                hooks.record = own = {}
                clean = batch_metric(model, b["clean_ids"], b)
                hooks.record = None
                hooks.patch = {layer: (torch.ones(hooks.num_heads, dtype=torch.bool), own[layer])
                               for layer in hooks.layers}
                patched = batch_metric(model, b["clean_ids"], b)
                hooks.reset()
                assert torch.equal(clean, patched)
                assert float(clean) != float(batch_metric(model, b["corrupted_ids"], b))
    finally:
        hooks.remove()


def test_identical_pairs_give_zero_effects() -> None:
    from crossroute.analyze.circuits import Pair

    model, tok = _tiny(4)
    pairs = [Pair(p.clean, p.clean, p.answer, p.wrong) for p in pairs_for("math", 6)]
    res = circuit_of_model(model, tok, pairs, confirm_top=4, batch_size=3)
    assert torch.tensor(res.attribution).abs().max() == 0
    assert all(v == 0 for row in res.activation for v in row)
    assert res.gap == 0 and res.warnings


def test_retention_against_itself_is_100_percent(tmp_path: Path) -> None:
    ckpt = make_tiny(tmp_path / "m", seed=5)
    res = run_circuits(ckpt, {"rl": ckpt, "sft": str(ckpt)}, "code", n=8, batch_size=8, confirm_top=2,
                       run_dir=tmp_path / "run")
    assert {m: r["value"] for m, r in res.retention.items()} == {"base": 1.0, "rl": 1.0, "sft": 1.0}
    assert all(r["lo"] == r["hi"] == 1.0 for r in res.retention.values())  # identical per prompt: no spread
    assert res.overlap == {"base": 1.0, "rl": 1.0, "sft": 1.0}
    assert res.retention_difference is not None and res.retention_difference["value"] == 0.0
    assert all(v == 0 for m in res.score_shift.values() for row in m for v in row)
    assert res.differential_vulnerability is not None
    assert all(v == 0 for row in res.differential_vulnerability for v in row) and res.vulnerable == []
    assert res.models["rl"]["curve_faithfulness"] == res.models["base"]["curve_faithfulness"]
    assert res.models["base"]["curve_faithfulness"][-1] == pytest.approx(1.0)
    assert res.base_circuit_faithfulness["rl"]["value"] == pytest.approx(res.models["base"]["faithfulness"])
    saved = json.loads((tmp_path / "run" / "results" / "circuits_code.json").read_text())
    assert saved["retention"]["sft"]["value"] == 1.0 and saved["layout"]["num_heads"] == TINY["num_attention_heads"]
    html = render_circuits_section(saved)
    assert "<img" in html and "Circuits: code" in html
    assert overlap(["a"], []) is None and overlap(["a", "b"], ["a", "c"]) == 0.5


def test_pairs_differ_where_stated() -> None:
    for p in pairs_for("math", 30, seed=1):
        a, b = re.findall(r"\d+", p.clean), re.findall(r"\d+", p.corrupted)
        assert len(p.clean) == len(p.corrupted)
        assert sum(x != y for x, y in zip(a, b, strict=True)) == 1
        assert [len(x) for x in a] == [len(x) for x in b]
        assert p.answer == str(eval(p.clean[2:-1])) and p.wrong == str(eval(p.corrupted[2:-1]))
        assert p.answer != p.wrong
    for p in pairs_for("code", 30, seed=1):
        diff = [i for i, (x, y) in enumerate(zip(p.clean, p.corrupted, strict=True)) if x != y]
        assert len(p.clean) == len(p.corrupted) and diff == [4]  # "C:a=<digit>"
        assert p.answer.endswith(";") and p.wrong is not None and p.wrong.endswith(";") and p.answer != p.wrong
    for p in pairs_for("qa", 30, seed=1):
        e1 = next(e for e in ENTITIES if e in p.clean)
        e2 = next(e for e in ENTITIES if e in p.corrupted)
        assert e1 != e2 and len(e1) == len(e2) and p.clean.replace(e1, e2) == p.corrupted
        assert p.answer.startswith("a ") and p.wrong is not None and p.answer != p.wrong
        assert p.answer[2:] in {v for v in KB[e1].values()}
    for p in pairs_for("cw", 30, seed=1):
        assert len(p.clean) == len(p.corrupted) and p.clean != p.corrupted and p.wrong is None
        assert p.clean.split(",")[0] == p.corrupted.split(",")[0]  # the word count is kept
    assert pairs_for("qa", 5) == pairs_for("qa", 5)
    with pytest.raises(CrossrouteError, match="no pair generator"):
        pairs_for("nope", 3)


def test_jsonl_pairs_validation(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"clean": "M:1+2=", "corrupted": "M:1+3=", "answer": "3", "wrong": "4"}\n\n'
                    '{"clean": "M:5+2=", "corrupted": "M:6+2=", "answer": "7"}\n')
    pairs = load_pairs_jsonl(good)
    assert len(pairs) == 2 and pairs[0].wrong == "4" and pairs[1].wrong is None
    assert pairs[1].where.endswith("good.jsonl:3")
    cases = {
        '{"clean": "a", "corrupted": "b"}': r"bad.jsonl:2: field 'answer' missing",
        '{"clean": "a", "corrupted": "b", "answer": 3}': r"bad.jsonl:2: field 'answer' must be a non-empty string",
        '{"clean": "a", "corrupted": "b", "answer": "x", "extra": 1}': r"bad.jsonl:2: unknown field 'extra'",
        '{"clean": "a", "corrupted": "a", "answer": "x"}': r"bad.jsonl:2: .*identical",
        '{"clean": "a", "corrupted": "b", "answer": "x", "wrong": ""}': r"bad.jsonl:2: field 'wrong'",
        '{"clean": "a", "corrupted": "b", "answer": "x", "wrong": "x"}': r"bad.jsonl:2: field 'wrong' equals",
        '[1, 2]': r"bad.jsonl:2: expected a JSON object",
        '{"clean": ': r"bad.jsonl:2: invalid JSON",
    }
    bad = tmp_path / "bad.jsonl"
    for line, msg in cases.items():
        bad.write_text('{"clean": "a", "corrupted": "b", "answer": "x"}\n' + line + "\n")
        with pytest.raises(CrossrouteError, match=msg):
            load_pairs_jsonl(bad)
    with pytest.raises(CrossrouteError, match="no such JSONL"):
        load_pairs_jsonl(tmp_path / "missing.jsonl")
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text('{"clean": "M:1+2=", "corrupted": "M:10+2=", "answer": "3"}\n')
    _, tok = _tiny()
    with pytest.raises(CrossrouteError, match=r"uneven.jsonl:1: clean and corrupted prompts are 6 and 7 tokens"):
        make_pair_batches(tok, load_pairs_jsonl(uneven), 4)


def test_parse_models() -> None:
    assert parse_models("rl=a/b, sft=c") == {"rl": "a/b", "sft": "c"}
    for bad in ("rl", "base=x", "rl=a,rl=b", "=x"):
        with pytest.raises(CrossrouteError):
            parse_models(bad)


def test_kl_of_a_model_to_itself_is_zero_and_positive_to_another() -> None:
    from crossroute.experiments.rl_vs_sft import kl_to_base

    model, tok = _tiny(6)
    other, _ = _tiny(7)
    prompts = [tok(p.clean, add_special_tokens=False)["input_ids"] for p in pairs_for("math", 6)]
    same = kl_to_base(model, model, tok, prompts, max_new_tokens=4, seed=0)
    assert same["kl_token"] == 0.0 and same["n_tokens"] > 0 and same["reverse"]["kl_token"] == 0.0
    diff = kl_to_base(model, other, tok, prompts, max_new_tokens=4, seed=0)
    assert diff["kl_token"] > 0 and diff["reverse"]["kl_token"] > 0 and "forward" in diff["direction"]
    assert diff["kl_seq_ci"][0] <= diff["kl_seq"] <= diff["kl_seq_ci"][1]


def test_forward_kl_samples_from_the_base_and_matches_an_exact_sum() -> None:
    # With one new token, the sampled estimate of KL(p || q) averages the exact next-token KL at the prompt's end
    # over prompts: it equals sum_v p(v)(log p(v) - log q(v)) computed directly, whichever token was sampled.
    from crossroute.experiments.rl_vs_sft import sampled_kl

    p_model, tok = _tiny(6)
    q_model, _ = _tiny(7)
    ids = [tok(p.clean, add_special_tokens=False)["input_ids"] for p in pairs_for("math", 4)]
    got = sampled_kl(p_model, p_model, q_model, tok, ids, max_new_tokens=1, seed=0, batch_size=1)
    want = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            lp = torch.log_softmax(p_model(x).logits[0, -1].float(), -1)
            lq = torch.log_softmax(q_model(x).logits[0, -1].float(), -1)
            want.append(float((lp.exp() * (lp - lq)).sum()))
    assert got["kl_seq"] == pytest.approx(sum(want) / len(want), rel=1e-4)


def test_per_prompt_values_do_not_depend_on_batching() -> None:
    """Rows (clean and wrong answers) of one pair land in different batches; they are summed back to their pair."""
    model, tok = _tiny(8)
    pairs = pairs_for("qa", 9)
    a = circuit_of_model(model, tok, pairs, confirm_top=2, batch_size=2)
    b = circuit_of_model(model, tok, pairs, confirm_top=2, batch_size=32)
    for key in ("metric_clean", "metric_corrupted", "effect", "circuit_metric"):
        assert torch.allclose(torch.tensor(a.per_prompt[key]), torch.tensor(b.per_prompt[key]), atol=1e-5), key
    # the per-prompt clean metric recomputed pair by pair, one batch per pair
    with torch.no_grad():
        one = [float(batch_metric(model, bt["clean_ids"], bt)) for p in pairs
               for bt in make_pair_batches(tok, [p], 4)]
    assert a.per_prompt["metric_clean"] == pytest.approx(one, abs=1e-5)
    assert a.metric_clean == pytest.approx(sum(one) / len(one), abs=1e-6)
