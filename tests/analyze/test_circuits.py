"""Circuits: attribution agrees with activation patching, self-patching is exact, pairs and JSONL; the stacked,
early-stopped patching passes give the one-pass-per-head reference's circuit and numbers in fewer forwards."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, make_tiny
from crossroute.analyze.circuits import (
    HeadHooks,
    PatchPasses,
    batch_metric,
    circuit_of_model,
    head_set_metrics,
    load_pairs_jsonl,
    make_pair_batches,
    overlap,
    pairs_for,
    parse_models,
    patch_passes,
    row_metric,
    run_circuits,
)
from crossroute.core.errors import CrossrouteError
from crossroute.domains.builtin import ENTITIES, KB
from crossroute.model.default import build_default_model
from crossroute.model.load import load_model
from crossroute.report.sections.circuits import render_circuits_section
from zoo import FAMILIES, zoo_checkpoint


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


# ----------------------------------------------------------------------------- stacked, early-stopped passes

REFERENCE = PatchPasses(stack=1, full_curve=True)  # one forward per head / prefix set: the old path


def _close(a, b, what: str) -> None:
    """Nested lists of numbers (None as NaN) equal within 1e-5."""
    fa = np.array(a, dtype=float) if a is not None else np.array(np.nan)
    fb = np.array(b, dtype=float) if b is not None else np.array(np.nan)
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=what)


def _assert_same_circuit(ref, new) -> None:
    """The same circuit, ranking and numbers (1e-5); the curve compared where both evaluated it."""
    assert new.circuit == ref.circuit and new.ranking == ref.ranking
    assert (new.target_reached, new.cap_binds, new.max_heads) == (ref.target_reached, ref.cap_binds, ref.max_heads)
    for key in ("metric_clean", "metric_corrupted", "gap", "scale_gap", "attribution", "activation", "effect",
                "effect_lo", "effect_hi", "score", "score_lo", "score_hi", "faithfulness"):
        _close(getattr(ref, key), getattr(new, key), key)
    for key in ("value", "lo", "hi"):
        _close(ref.faithfulness_ci[key], new.faithfulness_ci[key], f"faithfulness_ci.{key}")
    for key in ("metric_clean", "metric_corrupted", "effect", "circuit_metric"):
        _close(ref.per_prompt[key], new.per_prompt[key], f"per_prompt.{key}")
    at = dict(zip(ref.curve_k, ref.curve_faithfulness, strict=True))
    assert set(new.curve_k) <= set(at) and new.curve_k[0] == 0 and new.curve_k[-1] == ref.curve_k[-1]
    _close([at[k] for k in new.curve_k], new.curve_faithfulness, "curve")


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_passes_give_the_reference_circuit_on_every_zoo_family(family, tmp_path_factory) -> None:
    loaded = load_model(zoo_checkpoint(family, tmp_path_factory), dtype=torch.float32, device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    pairs = pairs_for("code", 6)
    kw = dict(confirm_top=8, batch_size=4, max_fraction=0.5)  # every head confirmed: each layer a stacked group
    ref = circuit_of_model(model, tok, pairs, passes=REFERENCE, **kw)
    assert not ref.curve_truncated and ref.curve_k == list(range(9))
    for passes in (PatchPasses(), PatchPasses(stack=3), PatchPasses(stack=2, max_cache_mb=0),
                   PatchPasses(max_stack_tokens=1), PatchPasses(full_curve=True)):
        new = circuit_of_model(model, tok, pairs, passes=passes, **kw)
        _assert_same_circuit(ref, new)
        assert new.curve_truncated == (not passes.full_curve)  # up to the cap, 4 of 8 heads, then k = 8
    assert new.curve_k == ref.curve_k  # full_curve: every prefix size, the same values


def test_stacked_copies_each_patch_their_own_head() -> None:
    model, tok = _tiny(9)
    b = make_pair_batches(tok, pairs_for("math", 6), 16)[0]
    hooks = HeadHooks(model)
    heads = [(layer, h) for layer in hooks.layers for h in range(hooks.num_heads)]
    try:
        with torch.no_grad():
            hooks.record = corr = {}
            row_metric(model, b["corrupted_ids"], b)
            hooks.record = None
            one = []
            for layer, h in heads:  # one forward per head, as before
                hooks.patch = {layer: (torch.arange(hooks.num_heads) == h, corr[layer])}
                one.append(row_metric(model, b["clean_ids"], b))
            s = len(heads)
            hooks.patch = {layer: (torch.stack([torch.arange(hooks.num_heads) == h if ly == layer else
                                                torch.zeros(hooks.num_heads, dtype=torch.bool) for ly, h in heads]),
                                   corr[layer]) for layer in hooks.layers}
            stacked = {k: v.repeat(s, *([1] * (v.dim() - 1))) for k, v in b.items()}
            rows = row_metric(model, stacked["clean_ids"], stacked).view(s, -1)
            hooks.reset()
            clean = row_metric(model, b["clean_ids"], b)
    finally:
        hooks.remove()
    assert torch.allclose(rows, torch.stack(one), atol=1e-6)
    assert all(not torch.allclose(r, clean) for r in one)  # every head's patch changes the metric


class _Passes:
    """Counts forwards (input-embedding calls) and layer-rows (rows through each head-out module) of a model."""

    def __init__(self, model, hooks_on) -> None:
        self.forwards = self.layer_rows = 0
        self.handles = [model.get_input_embeddings().register_forward_hook(self._fwd)]
        self.handles += [m.register_forward_pre_hook(self._layer) for m in hooks_on]

    def _fwd(self, module, args, out) -> None:
        self.forwards += 1

    def _layer(self, module, args) -> None:
        self.layer_rows += args[0].shape[0]

    def take(self) -> tuple[int, int]:
        out = (self.forwards, self.layer_rows)
        self.forwards = self.layer_rows = 0
        return out


def test_forward_passes_drop_as_claimed() -> None:
    loaded = load_model("default", dtype=torch.float32, device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    pairs = pairs_for("math", 8)
    batches = make_pair_batches(tok, pairs, 8)
    rows = [int(b["clean_ids"].shape[0]) for b in batches]
    L = model.config.num_hidden_layers
    H = model.config.num_attention_heads
    count = _Passes(model, [lyr.self_attn.o_proj for lyr in model.model.layers])
    try:
        ref = circuit_of_model(model, tok, pairs, confirm_top=L * H, batch_size=8, passes=REFERENCE)
        ref_passes = count.take()
        new = circuit_of_model(model, tok, pairs, confirm_top=L * H, batch_size=8)
        new_passes = count.take()
        small = circuit_of_model(model, tok, pairs, confirm_top=L * H, batch_size=8, passes=PatchPasses(stack=3))
        small_passes = count.take()
        bare = circuit_of_model(model, tok, pairs, confirm_top=L * H, batch_size=8, passes={"max_cache_mb": 0})
        bare_passes = count.take()
    finally:
        for h in count.handles:
            h.remove()
    _assert_same_circuit(ref, new)
    _assert_same_circuit(ref, small)
    ks = len(ref.curve_k)  # every prefix size 0..L*H
    cap = L * H // 4  # the default cap: 25 % of the heads
    assert ks == L * H + 1 and new.max_heads == cap and new.curve_k == [*range(cap + 1), L * H]
    # old path, per batch: attribution (corrupted + clean), activation (corrupted + clean + one per head),
    # curve (corrupted + one per prefix size): 2 + (2 + L*H) + (1 + L*H + 1) forwards of every layer
    per_batch = 2 + (2 + L * H) + (1 + ks)
    assert ref_passes == (len(batches) * per_batch, sum(rows) * per_batch * L)
    # new path, per batch: attribution 2 (its corrupted run and clean layer outputs kept for the later passes),
    # activation one stacked forward per layer (H heads each) computing only layers >= l, curve one forward of the
    # cap + 1 prefix sizes up to the cap (k = L*H is the clean run)
    layer_rows = 2 * L + sum(H * (L - layer) for layer in range(L)) + (cap + 1) * L
    assert new_passes == (len(batches) * (2 + L + 1), sum(rows) * layer_rows)
    # at most 3 copies a forward: ceil(H / 3) forwards per layer, ceil((cap + 1) / 3) for the curve's copies
    assert small_passes == (len(batches) * (2 + math.ceil(H / 3) * L + math.ceil((cap + 1) / 3)),
                            sum(rows) * layer_rows)
    # nothing kept across passes: the corrupted run once more per pass, the clean run once more in the activation
    _assert_same_circuit(ref, bare)
    assert bare_passes == (len(batches) * (2 + (2 + L) + 2), sum(rows) * (layer_rows + 3 * L))
    assert new_passes[0] * 4 < ref_passes[0] and 2 * new_passes[1] < ref_passes[1]


def test_the_curve_stops_once_the_circuit_is_decided() -> None:
    model, tok = _planted()
    pairs = pairs_for("math", 12)
    full = circuit_of_model(model, tok, pairs, confirm_top=4, batch_size=8, max_fraction=1.0, passes=REFERENCE)
    assert full.circuit == ["L1.head.0"] and full.curve_k == [0, 1, 2, 3, 4] and not full.curve_truncated
    # one prefix size a round: the round with k = 1 reaches the target, so k = 2, 3 are never evaluated
    one = circuit_of_model(model, tok, pairs, confirm_top=4, batch_size=8, max_fraction=1.0,
                           passes=PatchPasses(stack=1))
    assert one.curve_k == [0, 1, 4] and one.curve_truncated and one.smallest_reaching_target == 1
    _assert_same_circuit(full, one)
    assert one.curve_faithfulness[-1] == pytest.approx(1.0, abs=1e-5)  # k = all heads: the clean run


def test_fused_base_circuit_and_head_set_metrics_match_the_reference(tmp_path: Path) -> None:
    a, b = make_tiny(tmp_path / "a", seed=11), make_tiny(tmp_path / "b", seed=12)
    kw = dict(n=8, batch_size=4, confirm_top=4)
    ref = run_circuits(a, {"rl": b, "sft": a}, "qa", passes=REFERENCE, **kw).to_json()
    new = run_circuits(a, {"rl": b, "sft": a}, "qa", **kw).to_json()
    for key in ("retention", "base_circuit_faithfulness", "retention_difference"):
        for m in ref[key] if key != "retention_difference" else [None]:
            r, x = (ref[key], new[key]) if m is None else (ref[key][m], new[key][m])
            for f in ("value", "lo", "hi"):
                _close(r[f], x[f], f"{key}.{m}.{f}")
    assert ref["overlap"] == new["overlap"]
    _close(ref["score_shift"]["rl"], new["score_shift"]["rl"], "score_shift")
    _close(ref["differential_vulnerability"], new["differential_vulnerability"], "dv")
    # the base circuit inside rl, measured on its own, is what the fused keep pass found
    loaded = load_model(b, dtype=torch.float32, device="cpu")
    pairs = pairs_for("qa", 8)
    for passes in (REFERENCE, PatchPasses()):
        inside = head_set_metrics(loaded.model, loaded.tokenizer, pairs, ref["models"]["base"]["circuit"], 4, passes)
        rec_b = (np.asarray(ref["models"]["base"]["per_prompt"]["circuit_metric"])
                 - np.asarray(ref["models"]["base"]["per_prompt"]["metric_corrupted"]))
        assert float(np.mean(inside.kept - inside.corrupted) / np.mean(rec_b)) == pytest.approx(
            new["retention"]["rl"]["value"], abs=1e-5)
        _close(ref["models"]["rl"]["per_prompt"]["metric_corrupted"], inside.corrupted.tolist(), "corrupted")


def test_patch_passes_are_validated() -> None:
    assert patch_passes(None) == PatchPasses() and patch_passes({"stack": 2}).stack == 2
    for bad, field in (({"stack": 0}, "stack"), ({"max_stack_tokens": 0}, "max_stack_tokens"),
                       ({"max_cache_mb": -1}, "max_cache_mb"), ({"stak": 2}, "stak")):
        with pytest.raises(CrossrouteError, match=f"circuit patch passes: field {field}"):
            patch_passes(bad)
