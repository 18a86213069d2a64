"""Circuits on the base model's scale: a broken capability reads as weaker heads, the cap, and CIs checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from crossroute.analyze.circuits import (
    circuit_of_model,
    curve_rounds,
    linearised_ratio,
    max_heads_of,
    paired_ratio_diff,
    pairs_for,
    parse_head,
    ratio_ci,
    run_circuits,
    score_grid,
    select_circuit,
)
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.model.load import load_model, save_model
from crossroute.report.console import print_circuits
from crossroute.report.sections.circuits import render_circuits_section

BROKEN = [(0, 2), (0, 4)]  # heads whose output projection is zeroed: the base math circuit's top two (of 32)


def _default():
    loaded = load_model("default", dtype=torch.float32, device="cpu")
    return loaded.model.eval(), loaded.tokenizer


def _broken_checkpoint(path: Path, heads: list[tuple[int, int]]) -> Path:
    """The shipped default with the o_proj columns of `heads` set to 0: those heads write nothing."""
    model, tok = _default()
    hd = model.config.head_dim
    with torch.no_grad():
        for layer, h in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
    save_model(model, tok, path)
    return path


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """base = the default, rl = the same weights, sft = the default with two heads destroyed; math pairs."""
    root = tmp_path_factory.mktemp("circ")
    broken = _broken_checkpoint(root / "broken", BROKEN)
    res = run_circuits("default", {"rl": "default", "sft": str(broken)}, "math", n=24, batch_size=32,
                       confirm_top=16, run_dir=root / "run", device="cpu")
    saved = json.loads((root / "run" / "results" / "circuits_math.json").read_text())
    assert saved["retention"] == res.to_json()["retention"]
    return saved


def test_broken_capability_lowers_retention_and_shifts_scores_down(broken_run: dict) -> None:
    base, rl, sft = (broken_run["models"][m] for m in ("base", "rl", "sft"))
    assert base["gap"] > 0  # the default model has the capability
    # scores recomputed from the kept per-prompt values: -mean(effect) / mean(BASE gap), for every model
    gap_b = np.asarray(base["per_prompt"]["metric_clean"]) - np.asarray(base["per_prompt"]["metric_corrupted"])
    for r in (base, rl, sft):
        eff = np.asarray(r["per_prompt"]["effect"])
        assert np.allclose(r["score"], -eff.mean(0) / gap_b.mean(), atol=1e-9)
        assert np.allclose(r["effect"], eff.mean(0), atol=1e-9)
        assert r["scale_gap"] == pytest.approx(gap_b.mean())
    # the destroyed heads write nothing: raw effect and score exactly 0, shift = -s_base
    for layer, h in BROKEN:
        assert sft["effect"][layer][h] == 0 and sft["score"][layer][h] == 0
        assert broken_run["score_shift"]["sft"][layer][h] == pytest.approx(-base["score"][layer][h])
    # the capability collapsed: own gap / base gap well below 1
    assert sft["capability"]["hi"] < 1 and sft["gap"] < base["gap"]
    assert rl["capability"]["value"] == pytest.approx(1.0)
    # retention falls (CI below 1) while the unchanged model keeps all of it
    assert broken_run["retention"]["rl"]["value"] == pytest.approx(1.0)
    assert broken_run["retention"]["sft"]["hi"] < 1
    assert broken_run["retention"]["base"] == {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": 24}
    # on the base scale the base circuit's heads lose score on average (of 32 heads some others may compensate a
    # little), and the shifts are negative on average over all heads
    shift = np.asarray(broken_run["score_shift"]["sft"])
    assert np.mean([shift[parse_head(u)] for u in base["circuit"]]) < 0
    assert shift.mean() < 0
    assert all(v == 0 for row in broken_run["score_shift"]["rl"] for v in row)
    # the defect being fixed: on its own (shrunken) gap some head of the broken model would look stronger
    # than in the base, while on the base's gap the same head is weaker
    own = np.asarray(sft["score_own_gap"], dtype=float)
    assert np.any((own > np.asarray(base["score"])) & (np.asarray(sft["score"]) < np.asarray(base["score"])))


def test_rl_minus_sft_on_the_base_scale_is_paired_and_significant(broken_run: dict) -> None:
    d = broken_run["retention_difference"]
    ret = broken_run["retention"]
    assert d["value"] == pytest.approx(ret["rl"]["value"] - ret["sft"]["value"])
    assert d["lo"] > 0 and d["p"] < 0.01 and d["test"] == "sign_flip" and d["n"] == 24
    dv = np.asarray(broken_run["differential_vulnerability"])
    base = np.asarray(broken_run["models"]["base"]["score"])
    for layer, h in BROKEN:
        assert dv[layer, h] == pytest.approx(base[layer, h])  # s_rl = s_base, s_sft = 0
    vul = {v["head"]: v for v in broken_run["vulnerable"]}
    top = max(BROKEN, key=lambda lh: base[lh])
    assert f"L{top[0]}.head.{top[1]}" in vul
    v = vul[f"L{top[0]}.head.{top[1]}"]
    assert v["lo"] > 0 and v["significant"] and v["raw_effect_sft"] == 0
    assert [x["differential_vulnerability"] for x in broken_run["vulnerable"]] == sorted(
        (x["differential_vulnerability"] for x in broken_run["vulnerable"]), reverse=True)


def test_report_and_terminal_show_scale_cis_and_cap(broken_run: dict) -> None:
    page = render_circuits_section(broken_run)
    for text in ("gap / base gap", "|circuit| / cap", "retention of base circuit", "raw effect", "[95% CI]",
                 "Normalisation: every model", "Retention rl − sft"):
        assert text in page, text
    base = broken_run["models"]["base"]
    assert f"cap {base['max_heads']}" in page
    width = console.width
    console.width = 400  # no wrapping of the long titles
    try:
        with console.capture() as cap:
            print_circuits(broken_run)
    finally:
        console.width = width
    out = cap.get()
    assert "base-scale score" in out and "retention rl - sft" in out and "cap 25 %" in out
    old = {k: v for k, v in broken_run.items() if k != "normalisation"}
    assert "rerun" in render_circuits_section(old)  # a result of the old schema is named, not misread


def test_cap_binds_exactly_where_the_curve_says() -> None:
    model, tok = _default()
    pairs = pairs_for("math", 12)
    free = circuit_of_model(model, tok, pairs, target=0.8, max_fraction=1.0, confirm_top=4)
    k = free.smallest_reaching_target
    assert k is not None and free.target_reached and not free.cap_binds and len(free.circuit) == k
    f = dict(zip(free.curve_k, free.curve_faithfulness, strict=True))
    assert f[k] >= 0.8 and all(f[j] < 0.8 for j in range(1, k))
    assert free.faithfulness_ci["value"] == pytest.approx(f[k])
    if k > 1:
        n_heads = model.config.num_hidden_layers * model.config.num_attention_heads
        capped = circuit_of_model(model, tok, pairs, target=0.8, max_fraction=(k - 1) / n_heads, confirm_top=4)
        assert capped.cap_binds and not capped.target_reached and capped.max_heads == k - 1
        assert capped.circuit == free.ranking[: k - 1] and capped.faithfulness == pytest.approx(f[k - 1])
        assert any("cap binds" in w for w in capped.warnings)
        # the curve stopped at the cap: where the target is first reached is not known there; the full curve says k
        assert capped.curve_truncated and capped.curve_k == [*range(k), n_heads]
        assert capped.smallest_reaching_target is None
        assert any("not reached up to the cap, where the curve stops; PatchPasses(full_curve=True)" in w
                   for w in capped.warnings)
        full = circuit_of_model(model, tok, pairs, target=0.8, max_fraction=(k - 1) / n_heads, confirm_top=4,
                                passes={"full_curve": True})
        assert full.smallest_reaching_target == k and not full.curve_truncated and full.circuit == capped.circuit
        assert full.faithfulness == pytest.approx(capped.faithfulness, abs=1e-5)
        assert full.curve_faithfulness[: k] == pytest.approx(capped.curve_faithfulness[: k], abs=1e-5)
        assert capped.curve_faithfulness[-1] == pytest.approx(full.curve_faithfulness[-1], abs=1e-5) == 1.0


def test_select_circuit_on_synthetic_curves() -> None:
    ks = list(range(0, 9))
    curve = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.85, 0.9, 1.0]
    s = select_circuit(ks, curve, 0.8, max_heads=4)
    assert (s.size, s.faithfulness, s.target_reached, s.cap_binds, s.smallest_reaching) == (4, 0.4, False, True, 6)
    s = select_circuit(ks, curve, 0.8, max_heads=6)
    assert (s.size, s.target_reached, s.cap_binds) == (6, True, False)
    s = select_circuit(ks, curve, 0.3, max_heads=8)
    assert (s.size, s.faithfulness) == (3, 0.3)
    flat = [0.0] * 9  # target unreachable, no cap: not a binding cap
    s = select_circuit(ks, flat, 0.8, max_heads=8)
    assert (s.size, s.target_reached, s.cap_binds, s.smallest_reaching) == (8, False, False, None)
    s = select_circuit(ks, [math.nan] * 9, 0.8, max_heads=2)
    assert s.size == 2 and s.cap_binds and not s.target_reached
    assert max_heads_of(16, 0.25) == 4 and max_heads_of(4, 0.25) == 1 and max_heads_of(10, 0.01) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(CrossrouteError, match="max-fraction"):
            max_heads_of(16, bad)
    with pytest.raises(CrossrouteError, match="cap"):
        select_circuit(ks[:3], curve[:3], 0.8, max_heads=5)
    # a curve stopped once the circuit is decided: reached below the cap (the cap itself never evaluated) ...
    s = select_circuit([0, 1, 2], [0.0, 0.5, 0.9], 0.8, max_heads=4, total=16)
    assert (s.size, s.faithfulness, s.target_reached, s.cap_binds, s.smallest_reaching) == (2, 0.9, True, False, 2)
    # ... or stopped at the cap, which binds below all 16 heads; the smallest size reaching the target is unknown
    s = select_circuit(ks[:5], curve[:5], 0.8, max_heads=4, total=16)
    assert (s.size, s.faithfulness, s.target_reached, s.cap_binds, s.smallest_reaching) == (4, 0.4, False, True, None)


def test_curve_rounds_cover_the_prefix_sizes_up_to_the_cap_once() -> None:
    ks = list(range(17))
    assert curve_rounds(ks, 4, 2, False) == [[0, 1], [2, 3], [4]]
    assert curve_rounds(ks, 4, 2, False, first=1) == [[0], [1, 2], [3, 4]]  # one slot of round 1 taken
    assert curve_rounds(ks, 4, 9, False) == [[0, 1, 2, 3, 4]]
    assert curve_rounds(ks, 4, 9, True) == [ks] and curve_rounds(ks, 4, 0, False, first=0)[0] == [0]
    geo = [0, 1, 2, 3, 5, 6, 7, 8, 10, 12, 15, 18, 22]  # a geometric tail past the exact range
    for cap in (1, 6, 12, 22):
        for per in (1, 2, 3, 7, 50):
            rounds = curve_rounds(geo, cap, per, False, first=max(1, per - 1))
            assert [k for r in rounds for k in r] == [k for k in geo if k <= cap]
            assert all(1 <= len(r) <= per for r in rounds)


def test_planted_head_scores_through_the_pure_functions() -> None:
    rng = np.random.default_rng(1)
    n = 80
    gap = rng.normal(3.0, 0.8, n)
    neg = rng.normal(0.0, 0.02, (n, 2, 3))
    neg[:, 1, 2] = 0.6 * gap  # only head L1.head.2 matters: patching it removes 60 % of each prompt's gap
    g = score_grid(neg, gap)
    assert g["value"][1][2] == pytest.approx(0.6, abs=1e-12)  # mean(0.6 g) / mean(g)
    assert g["lo"][1][2] == pytest.approx(0.6, abs=1e-5) and g["hi"][1][2] == pytest.approx(0.6, abs=1e-5)
    for layer in range(2):
        for h in range(3):
            if (layer, h) != (1, 2):
                assert abs(g["value"][layer][h]) < 0.01 and g["hi"][layer][h] - g["lo"][layer][h] < 0.02
    ranking = sorted(((layer, h) for layer in range(2) for h in range(3)), key=lambda lh: -g["value"][lh[0]][lh[1]])
    assert ranking[0] == (1, 2)


def _direct_ratio_boot(num: np.ndarray, den: np.ndarray, n_boot: int = 4000, seed: int = 7) -> tuple[float, float]:
    """Resample prompts jointly and take the ratio of resampled means: the plain bootstrap of a ratio."""
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    r = num[idx].mean(1) / den[idx].mean(1)
    lo, hi = np.quantile(r, [0.025, 0.975])
    return float(lo), float(hi)


def test_ratio_ci_agrees_with_a_direct_bootstrap_and_the_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    n = 300
    den = rng.normal(2.0, 0.6, n)
    num = 0.4 * den + rng.normal(0.0, 0.3, n)
    est = ratio_ci(num, den)
    assert est["value"] == pytest.approx(num.mean() / den.mean(), rel=1e-12)
    z = linearised_ratio(num, den)
    assert z.mean() == pytest.approx(est["value"], rel=1e-12)
    half = 1.959964 * z.std(ddof=1) / math.sqrt(n)  # delta-method normal interval
    lo, hi = _direct_ratio_boot(num, den)
    width = est["hi"] - est["lo"]
    for a, b in ((est["lo"], est["value"] - half), (est["hi"], est["value"] + half), (est["lo"], lo),
                 (est["hi"], hi)):
        assert abs(a - b) < 0.1 * width, (a, b, width)
    # a denominator with mean 0 gives no ratio (and no fake CI)
    assert ratio_ci(num, np.array([1.0, -1.0] * (n // 2)))["value"] is None
    with pytest.raises(CrossrouteError, match="prompt axis"):
        linearised_ratio(num[:5], den)


def test_paired_ratio_difference_hand_built_and_against_a_direct_paired_bootstrap() -> None:
    # hand-built: a constant scale 2 and num_b = num_a + 1 on every prompt -> the difference is 0.5 exactly
    num_a = np.array([0.5, 1.0, 1.5, 2.0, 0.0, 1.0])
    d = paired_ratio_diff(num_a, np.full(6, 2.0), num_a + 1, np.full(6, 2.0))
    assert d["value"] == pytest.approx(0.5) and d["lo"] == pytest.approx(0.5) and d["hi"] == pytest.approx(0.5)
    assert d["p"] < 0.05 and d["significant"]
    rng = np.random.default_rng(3)
    n = 200
    den = rng.normal(2.0, 0.5, n)
    a = 0.5 * den + rng.normal(0, 0.3, n)
    b = a - 0.2 + rng.normal(0, 0.3, n)
    d = paired_ratio_diff(a, den, b, den)
    assert d["value"] == pytest.approx((b.mean() - a.mean()) / den.mean())
    idx = np.random.default_rng(9).integers(0, n, size=(4000, n))
    boot = (b[idx].mean(1) - a[idx].mean(1)) / den[idx].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    width = d["hi"] - d["lo"]
    assert abs(d["lo"] - lo) < 0.1 * width and abs(d["hi"] - hi) < 0.1 * width
    assert d["hi"] < 0 and d["p"] < 0.001
    same = paired_ratio_diff(a, den, a + rng.normal(0, 0.01, n), den)  # no real difference
    assert same["lo"] < 0 < same["hi"] and same["p"] > 0.05


def test_rl_vs_sft_columns_and_section_carry_the_cis(broken_run: dict) -> None:
    from crossroute.experiments.rl_vs_sft import circuit_columns
    from crossroute.report.sections.rl_vs_sft import render_rl_vs_sft_section

    circuits = {"math": broken_run}
    rows = []
    for name in ("base", "rl", "sft"):
        cols = circuit_columns(circuits, ["math"], "math", name)
        assert cols["retention_own"] == broken_run["retention"][name]["value"]
        assert cols["retention_own_ci"] == [broken_run["retention"][name]["lo"], broken_run["retention"][name]["hi"]]
        assert cols["capability"]["math"] == broken_run["models"][name]["capability"]["value"]
        rows.append({"model": name, "own": 40.0, "own_gain": 0.0, "others_change": {}, "forgetting_mean": 0.0,
                     "kl_token": 0.0, "kl_seq": 0.0, **cols})
    assert rows[2]["retention_own"] < rows[1]["retention_own"]
    result = {"rows": rows, "domain": "math", "domains": ["math"], "rl": {"steps": 60},
              "sft": {"steps": 10, "search": [{"steps": 10}]}, "kl_definition": "KL", "circuits": circuits,
              "retention_difference": {"math": broken_run["retention_difference"]}}
    page = render_rl_vs_sft_section(result)
    d = broken_run["retention_difference"]
    assert f"{100 * d['value']:.3g} % [{100 * d['lo']:.3g}, {100 * d['hi']:.3g}] p=" in page
    lo, hi = rows[2]["retention_own_ci"]
    assert f"[{100 * lo:.3g}, {100 * hi:.3g}]" in page
