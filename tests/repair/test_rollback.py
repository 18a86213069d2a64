"""Rollback: exact in-place swaps, 100 % rollback = θ_A, selector budgets, the P(ref) screen and its full-eval picks
(at most k/4 + 4 greedy evaluations, with the old sweep's numbers), the sweep's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.domain import Domain
from crossroute.domains.scorers import Scorer
from crossroute.measure.stats import paired_diff
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap
from crossroute.repair.rollback import (
    FRACTIONS,
    SEED_FULL_AT,
    SELECTORS,
    Swapper,
    all_units,
    budget,
    max_full_points,
    parse_full_points,
    pick_full_points,
    rankings,
    rollback_sweep,
    run_rollback,
)
from crossroute.report.sections.rollback import render_rollback_section
from zoo import build_zoo_checkpoint


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Parity(Scorer):
    """1 when the completion's code points sum to an even number: on a random model its scores move with the
    weights (exact match would score 0 everywhere), so equal scores are evidence."""

    name = "parity"

    def score(self, example: Example, text: str) -> float:
        return float(sum(map(ord, text)) % 2 == 0)


def _parity_domain(name: str, n: int = 16) -> Domain:
    rows = [Example(f"{name} {i} {j}", str((i * 7 + j) % 10), split=split)
            for split in ("train", "eval") for i, j in zip(range(n), range(n, 0, -1), strict=True)]
    return Domain(name, "test: greedy scores that depend on the weights", fixed=rows, max_new_tokens=6,
                  scorer=_Parity())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rb")
    return make_tiny(root / "a", seed=0), make_tiny(root / "now", seed=1)


def test_full_rollback_is_theta_a_and_swap_restores(pair: tuple[Path, Path]) -> None:
    la, ln = load_model(pair[0]), load_model(pair[1])
    before, target = _state(ln.model), _state(la.model)
    assert not _identical(before, target)
    swapper = Swapper(ln.model, dict(la.model.named_parameters()))
    with swapper.rolled_back([]):
        assert _identical(_state(ln.model), before)  # 0 % rolled back: CKPT_NOW unchanged
    with swapper.rolled_back(all_units(swapper.umap)):
        assert _identical(_state(ln.model), target)  # bit-identical θ_A (tied head included)
    assert _identical(_state(ln.model), before)
    units = ["L0.mlp.3", "L1.mlp.0", "L1.head.1", "L0.kv.0", "model.norm.weight"]
    with swapper.rolled_back(units):
        now = _state(ln.model)
        up = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(now[up][0], target[up][0]) and torch.equal(now[up][1], before[up][1])
        down = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(now[down][:, 3], target[down][:, 3])
        assert torch.equal(now[down][:, 2], before[down][:, 2])
        o = "model.layers.1.self_attn.o_proj.weight"
        assert torch.equal(now[o][:, 8:16], target[o][:, 8:16])  # head 1, head_dim 8
        assert torch.equal(now[o][:, :8], before[o][:, :8])
    assert _identical(_state(ln.model), before)


def test_selectors_return_the_budget() -> None:
    from conftest import TINY
    from crossroute.model.default import build_default_model

    model, _ = build_default_model(0, **TINY)
    umap = UnitMap.of_model(model)
    gen = torch.Generator().manual_seed(0)
    attr = {k: list(torch.randn(umap.num_layers, max(umap.counts[k]), generator=gen, dtype=torch.float64))
            for k in umap.partition_kinds}
    mag = {k: [x.abs() for x in v] for k, v in attr.items()}
    shared = {"L0.mlp.1", "L0.mlp.2", "L1.mlp.5", "L1.head.0"}
    for kinds in (("neuron",), ("neuron", "head", "kv")):
        ranks = rankings(umap, attr, mag, shared, kinds, seed=0)
        pool = sum(umap.n_units(k) for k in kinds)
        for sel in SELECTORS:
            order, sh = ranks[sel]
            assert len(order) == pool == len(set(order))
            for frac in (0.5, 2.0, 32.0, 100.0):
                assert len(order[: budget(pool, frac)]) == budget(pool, frac)
        order, sh = ranks["conflict"]
        pos = [u for u in shared if _attr(attr, u) > 0 and (len(kinds) > 1 or ".mlp." in u)]
        assert set(order[: len(pos)]) == set(pos) and all(sh[: len(pos)])
    assert budget(64, 0.5) == 1 and budget(64, 32) == 21 and budget(64, 100) == 64


def _attr(attr: dict[str, list[torch.Tensor]], u: str) -> float:
    layer, tag, j = u.split(".")
    kind = {"mlp": "neuron", "head": "head", "kv": "kv"}[tag]
    return float(attr[kind][int(layer[1:])][int(j)])


def test_sweep_writes_json_and_saves_best(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, now = pair
    res = run_rollback(now, a, "math", "qa", fractions=(10, 100), run_dir=tmp_path / "run",
                       save_best=tmp_path / "best", eval_n=4, n=4, batch_size=4, routes_n=4)
    out = json.loads((tmp_path / "run" / "results" / "rollback_math.json").read_text())
    assert len(out["points"]) == 2 * 3 * 2
    pools = out["pool_sizes"]
    full = [p for p in out["points"] if p["full_eval"]]
    assert out["n_full_evals"] == 2 + len(full) <= 12 / 4 + 4
    assert out["full_evals"] == ["theta_now", "theta_A"] + [f"{p['variant']}/{p['selector']}/{p['fraction']:g}"
                                                            for p in full]
    for p in out["points"]:
        assert p["n_units"] == budget(pools[p["variant"]], p["fraction"])
        # every point has the screen: mean P(ref) with its CI, and the paired change vs theta_now (its difference)
        for d in ("math", "qa"):
            e, c = p["screen_p_ref"][d], p["screen_change"][d]
            assert e["lo"] - 1e-9 <= e["value"] <= e["hi"] + 1e-9 and e["n"] == 4
            assert c["value"] == pytest.approx(e["value"] - out["screen_now"][d]["value"], abs=1e-3)
            assert c["lo"] - 1e-9 <= c["value"] <= c["hi"] + 1e-9 and c["n"] == 4
        if not p["full_eval"]:
            assert p["scores"] == {} and p["recovery"] is None and p["change"] == {} and p["full_eval_reason"] is None
            continue
        assert set(p["collateral"]) == {"qa"} and p["full_eval_reason"]
        # the paired change vs theta_now is the difference of the two means, with a CI around it and a p-value
        for d in ("math", "qa"):
            c = p["change"][d]
            assert c["value"] == pytest.approx(p["scores"][d] - out["score_now"][d], abs=1e-3)
            assert c["lo"] - 1e-9 <= c["value"] <= c["hi"] + 1e-9 and 0 < c["p"] <= 1 and c["n"] == 4
    assert out["best"]["full_eval"] and out["best"]["scores"]["math"] == max(p["scores"]["math"] for p in full)
    assert out["best"]["saved_to"] == str(tmp_path / "best")
    assert load_model(tmp_path / "best").model is not None
    assert res.score_peak == out["score_peak"]
    html = render_rollback_section(out)
    assert "<img" in html and "rollback screen (joint)" in html and "rollback recovery (joint)" in html
    assert f"{out['n_full_evals']} full evaluations" in html
    assert html.count("<td>screen</td>") == 12 - len(full) and html.count("<td>full</td>") == len(full)


def test_the_whole_joint_pool_is_theta_a_bitwise_and_scores_as_theta_a(pair: tuple[Path, Path]) -> None:
    # 100 % of the joint pool includes the tensors outside units (norms, embeddings): the model is theta_A exactly,
    # so every domain scores exactly theta_A's score on the same prompts.
    from crossroute.domains.files import get_domain
    from crossroute.measure.evaluate import evaluate_domain
    from crossroute.repair.rollback import VARIANT_KINDS

    a, now = pair
    la, ln = load_model(a), load_model(now)
    umap = UnitMap.of_model(ln.model)
    ids = [u for k in VARIANT_KINDS["joint"] for u in umap.ids(k)]
    assert sorted(ids) == sorted(all_units(umap)) and "model.norm.weight" in ids
    swapper = Swapper(ln.model, dict(la.model.named_parameters()))
    with swapper.rolled_back(ids):
        assert _identical(_state(ln.model), _state(la.model))
    res = rollback_sweep(now, a, "math", "qa", fractions=(100,), selectors=("random",), eval_n=8, n=4,
                         batch_size=4, routes_n=4)
    joint = next(p for p in res.points if p.variant == "joint")
    assert joint.full_eval  # 2 points: both fit the k/4 + 2 budget
    for d in ("math", "qa"):
        dom = get_domain(d)
        assert joint.scores[d] == evaluate_domain(la.model, la.tokenizer, dom, n=8).score
        # the screen at theta_A and at this point is P(ref) at theta_A, multiplied out token by token here
        probs = [_p_ref_by_hand(la.model, la.tokenizer, dom, e) for e in dom.examples("eval", 8)]
        assert res.screen_to[d]["value"] == pytest.approx(100 * sum(probs) / len(probs), rel=1e-4, abs=1e-9)
        assert joint.screen_p_ref[d] == res.screen_to[d]
    assert "nothing" in res.pool_excludes["joint"] and "embeddings" in res.pool_excludes["mlp"]


def _p_ref_by_hand(model: torch.nn.Module, tok: object, dom: object, ex: object) -> float:
    """P(reference + eos | prompt) as a product of next-token probabilities, one unpadded sequence, float64."""
    prompt = dom.prompt_ids(ex, tok)
    answer = list(tok(ex.answer, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    p = 1.0
    for j, t in enumerate(answer):
        p *= float(probs[len(prompt) + j - 1, t])
    return p


def test_pick_full_points_requested_first_then_the_screens_best_per_selector() -> None:
    keys = [(v, s, f) for v in ("mlp", "joint") for s in ("conflict", "random") for f in (1.0, 2.0, 4.0)]
    n_units = [1, 2, 4] * 4
    # mlp/conflict 0-2 (tie at 1 and 2: fewer units), mlp/random 3-5, joint/conflict 6-8, joint/random 9-11 (all 0)
    screen = [0.1, 0.3, 0.3, 0.2, 0.1, 0.0, 0.5, 0.4, 0.1, 0.0, 0.0, 0.0]
    picks = pick_full_points(keys, n_units, screen, requested=[("joint", "random", 4)])
    assert picks == {11: "requested", 6: "screen best of conflict", 3: "screen best of random",
                     1: "screen best of mlp/conflict", 9: "screen best of joint/random"}
    assert len(picks) == max_full_points(12) == 5
    assert pick_full_points(keys, n_units, screen, cap=2) == {6: "screen best of conflict", 3: "screen best of random"}
    with pytest.raises(CrossrouteError, match="not in the sweep"):
        pick_full_points(keys, n_units, screen, requested=[("mlp", "conflict", 3.0)])
    with pytest.raises(CrossrouteError, match="at most 1"):
        pick_full_points(keys, n_units, screen, requested=keys[:2], cap=1)
    assert all(max_full_points(k) + 2 <= k / 4 + 4 for k in range(1, 400))
    default = [(v, s, f) for v in ("mlp", "joint") for s in SELECTORS for f in FRACTIONS]  # the demo's 42 points
    seed = pick_full_points(default, [1] * 42, [0.0] * 42, requested=SEED_FULL_AT)
    assert [default[i] for i, why in seed.items() if why == "requested"] == list(SEED_FULL_AT)
    # two asked for + the best of each variant/selector (ties: the smallest budget; the per-selector bests among them)
    assert len(seed) == 2 + 6 <= max_full_points(42) == 12
    assert parse_full_points("mlp/conflict/2, joint/conflict/32") == [("mlp", "conflict", 2.0),
                                                                       ("joint", "conflict", 32.0)]
    with pytest.raises(CrossrouteError, match="VARIANT/SELECTOR/FRACTION"):
        parse_full_points("mlp/2")


@pytest.fixture(scope="module")
def zoo_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random zoo Qwen3 checkpoints (BPE tokenizer): their greedy completions change with the weights."""
    root = tmp_path_factory.mktemp("rbzoo")
    return build_zoo_checkpoint("qwen3", root / "a", seed=0), build_zoo_checkpoint("qwen3", root / "now", seed=1)


def test_sweep_runs_at_most_k_over_4_plus_4_full_evals_with_the_full_sweeps_numbers(
        zoo_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import crossroute.repair.rollback as rb

    a, now = zoo_pair
    da, db = _parity_domain("pa"), _parity_domain("pb")
    calls: list[str] = []
    real = rb.evaluate_domain

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "evaluate_domain", counting)
    kw = dict(fractions=(1, 10, 50), eval_n=16, n=4, batch_size=4, routes_n=4)
    k = 2 * 3 * 3
    new = rollback_sweep(now, a, da, [db], full_at=[("mlp", "random", 50)], **kw)
    assert len(calls) == 2 * new.n_full_evals  # one full evaluation = every domain (pa, pb) greedily
    assert new.n_full_evals <= k / 4 + 4 and new.n_full_evals == 2 + sum(p.full_eval for p in new.points)
    calls.clear()
    old = rollback_sweep(now, a, da, [db], full_all=True, **kw)  # the old sweep: greedy at every point
    assert len(calls) == 2 * (k + 2) and old.n_full_evals == k + 2 and all(p.full_eval for p in old.points)
    assert (new.score_now, new.score_to, new.score_peak) == (old.score_now, old.score_to, old.score_peak)
    assert 0 < new.score_now["pa"] < 100  # the parity scores can differ between points
    reasons = {p.full_eval_reason: p for p in new.points if p.full_eval}
    assert (reasons["requested"].variant, reasons["requested"].selector, reasons["requested"].fraction) == \
        ("mlp", "random", 50)
    for sel in SELECTORS:  # the screen's best on A per selector is fully evaluated (perhaps as the requested one)
        top = max(p.screen_p_ref["pa"]["value"] for p in new.points if p.selector == sel)
        assert any(p.full_eval and p.screen_p_ref["pa"]["value"] >= top - 1e-6 for p in new.points
                   if p.selector == sel)
    for p, q in zip(new.points, old.points, strict=True):
        assert (p.variant, p.selector, p.fraction, p.n_units) == (q.variant, q.selector, q.fraction, q.n_units)
        assert p.screen_p_ref == q.screen_p_ref and p.screen_change == q.screen_change
        if p.full_eval:  # the same greedy numbers as the full sweep at that point, paired CIs included
            assert (p.scores, p.change, p.recovery, p.collateral) == (q.scores, q.change, q.recovery, q.collateral)
    assert new.best is not None and new.points[new.best["index"]].full_eval
    assert any(q.change[d]["value"] != 0 for q in old.points for d in ("pa", "pb"))

    # the requested random point, computed by hand: its units (random order, independent of the attribution)
    # rolled back on freshly loaded models, greedy scores and the paired change vs theta_now
    la, ln = load_model(a), load_model(now)
    umap = UnitMap.of_model(ln.model)
    zeros = {"neuron": list(torch.zeros(umap.num_layers, max(umap.counts["neuron"]), dtype=torch.float64))}
    order = rankings(umap, zeros, zeros, set(), ("neuron",), seed=0)["random"][0]
    units = order[: budget(umap.n_units("neuron"), 50)]
    at_now = {d.name: real(ln.model, ln.tokenizer, d, n=16) for d in (da, db)}
    with Swapper(ln.model, dict(la.model.named_parameters())).rolled_back(units):
        at_pt = {d.name: real(ln.model, ln.tokenizer, d, n=16) for d in (da, db)}
        by_hand = {d.name: [_p_ref_by_hand(ln.model, ln.tokenizer, d, e) for e in d.examples("eval", 16)]
                   for d in (da, db)}
    pt = reasons["requested"]
    assert pt.n_units == len(units) and pt.scores == {d: r.score for d, r in at_pt.items()}
    for d in ("pa", "pb"):
        x, y = ([r["score"] for r in res[d].records] for res in (at_now, at_pt))
        assert pt.change[d] == paired_diff(x, y).to_json()
        assert pt.screen_p_ref[d]["value"] == pytest.approx(100 * sum(by_hand[d]) / 16, rel=1e-4, abs=1e-9)
    assert pt.collateral == {"pb": at_pt["pb"].score - at_now["pb"].score}
    with pytest.raises(CrossrouteError, match="not in the sweep"):
        rollback_sweep(now, a, da, [db], full_at=[("mlp", "conflict", 3)], **kw)


def test_old_results_without_the_screen_still_render() -> None:
    point = {"variant": "mlp", "selector": "conflict", "fraction": 2.0, "n_units": 3, "n_shared": 1,
             "scores": {"math": 30.0, "qa": 90.0}, "recovery": 0.5, "collateral": {"qa": -1.0},
             "change": {"math": {"value": 2.0, "lo": -1.0, "hi": 5.0}, "qa": {"value": -1.0, "lo": -3.0, "hi": 1.0}}}
    old = {"domain": "math", "others": ["qa"], "selectors": ["conflict"], "variants": ["mlp"], "eval_n": 100,
           "score_peak": 32.0, "score_now": {"math": 28.0, "qa": 91.0}, "points": [point], "best": None}
    html = render_rollback_section(old)
    assert "<td>full</td>" in html and "+2.00 [-1.00, +5.00]" in html and "rollback recovery" in html
    assert "rollback screen" not in html


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])  # gpt2: no .model, the full-logits path
def test_screen_p_ref_is_the_reference_probability_by_hand(family: str, tmp_path: Path) -> None:
    from crossroute.measure.proxy import make_batches
    from crossroute.repair.rollback import screen_p_ref

    loaded = load_model(build_zoo_checkpoint(family, tmp_path / family, seed=0))
    dom = _parity_domain("pa", n=9)
    examples = dom.examples("eval", 9)
    batches = make_batches(loaded.tokenizer, examples, 4, dom)  # sorted by length: 3 batches, padded
    got = screen_p_ref(loaded.model, {"pa": batches})["pa"]
    # make_batches orders by length (stable); pair each value with its example by the same order
    order = sorted(examples, key=lambda e: len(dom.prompt_ids(e, loaded.tokenizer))
                   + len(loaded.tokenizer(e.answer, add_special_tokens=False)["input_ids"]))
    want = [_p_ref_by_hand(loaded.model, loaded.tokenizer, dom, e) for e in order]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-12) and min(want) > 0


def test_a_domain_without_reference_answers_cannot_be_screened(pair: tuple[Path, Path]) -> None:
    a, now = pair
    blank = Domain("blank", "test: no answers", fixed=[Example(f"q {i}", "", split="eval") for i in range(4)])
    with pytest.raises(CrossrouteError, match="blank.*reference answer.*full_all=True"):
        rollback_sweep(now, a, blank, "qa", eval_n=4)
