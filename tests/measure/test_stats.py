"""Scores' CIs and paired differences, checked against values computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.measure.stats import mcnemar_p, mean_ci, paired_diff, sign_flip_p


def test_mcnemar_hand_computed() -> None:
    # 1 pair 0->1, 9 pairs 1->0, 5 ties: p = 2 * P(Bin(10, 1/2) <= 1) = 2 * 11 / 1024
    a = [0] + [1] * 9 + [1] * 5
    b = [1] + [0] * 9 + [1] * 5
    assert mcnemar_p(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_p([1, 0], [1, 0]) == 1.0
    d = paired_diff(a, b)
    assert d.test == "mcnemar_exact" and d.p == pytest.approx(2 * 11 / 1024, abs=1e-6)
    assert d.value == pytest.approx(100 * (1 - 9) / 15, abs=1e-3)


def test_bootstrap_ci_matches_the_normal_approximation_at_large_n() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.3).astype(float)
    est = mean_ci(x, n_boot=4000)
    p = x.mean()
    half = 100 * 1.959964 * math.sqrt(p * (1 - p) / len(x))
    assert est.value == pytest.approx(100 * p, abs=1e-3)
    assert est.lo == pytest.approx(100 * p - half, abs=0.35)
    assert est.hi == pytest.approx(100 * p + half, abs=0.35)


def test_paired_ci_is_narrower_than_unpaired_for_correlated_scores() -> None:
    rng = np.random.default_rng(2)
    a = (rng.random(500) < 0.5).astype(float)
    b = a.copy()
    flip = rng.random(500) < 0.06
    b[flip] = 1 - b[flip]
    d = paired_diff(a, b)
    se_unpaired = 100 * math.sqrt(0.25 / 500 * 2)
    assert (d.hi - d.lo) < 2 * 1.96 * se_unpaired / 2


def test_sign_flip_exact_case() -> None:
    # all 10 differences positive: the exact two-sided p is 2 / 2**10
    p = sign_flip_p([0.5] * 10, n_perm=20000)
    assert p == pytest.approx(2 / 1024, abs=0.0015)
    d = paired_diff([0.0] * 10, [0.5] * 10)
    assert d.test == "sign_flip" and d.significant and d.value == 50.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=60))
def test_ci_brackets_the_mean(x: list[float]) -> None:
    est = mean_ci(x, n_boot=200)
    assert est.lo - 1e-9 <= est.value <= est.hi + 1e-9
    assert 0.0 <= est.lo and est.hi <= 100.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=1, max_size=60))
def test_paired_diff_is_antisymmetric(pairs: list[tuple[float, float]]) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab, ba = paired_diff(a, b, n_boot=200), paired_diff(b, a, n_boot=200)
    assert ab.value == pytest.approx(-ba.value, abs=1e-9)
    assert ab.p == pytest.approx(ba.p) and 0.0 < ab.p <= 1.0


def test_p_ref_equals_the_product_of_stepwise_next_token_probabilities() -> None:
    """P(ref) from one batched teacher-forced pass equals prod_t p(a_t | prompt, a_<t) computed token by token."""
    import torch

    from crossroute.domains.builtin import BUILTIN
    from crossroute.measure.evaluate import reference_probability
    from crossroute.model.load import load_model

    loaded = load_model("default")
    model, tok, dom = loaded.model, loaded.tokenizer, BUILTIN["math"]
    examples = dom.examples("eval", 6)
    got = reference_probability(model, tok, dom, examples, batch_size=4)
    for e, g in zip(examples, got, strict=True):
        ids = dom.prompt_ids(e, tok)
        target = list(tok(e.answer, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        prob = 1.0
        with torch.no_grad():
            for t in target:
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
                prob *= float(torch.softmax(logits, -1)[t])
                ids = ids + [t]
        assert g == pytest.approx(prob, rel=1e-4, abs=1e-9)
    assert 0.0 < max(got) <= 1.0


def test_across_seeds_hand_computed() -> None:
    from crossroute.measure.stats import across_seeds

    a = across_seeds([2.0, 4.0, 6.0])  # mean 4, sd 2, t(0.975, 2) = 4.303: 4 +- 4.303 * 2 / sqrt(3)
    assert a["mean"] == 4.0 and a["sd"] == 2.0 and a["n"] == 3
    assert a["lo"] == pytest.approx(4 - 4.303 * 2 / math.sqrt(3), abs=1e-3)
    assert a["hi"] == pytest.approx(4 + 4.303 * 2 / math.sqrt(3), abs=1e-3)
    assert across_seeds([1.0])["sd"] is None and across_seeds([])["n"] == 0


def test_unbiased_pass_at_k_hand_computed() -> None:
    from crossroute.measure.evaluate import pass_at_k

    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0


@pytest.mark.slow
def test_sampled_avg_at_k_agrees_with_p_ref() -> None:
    """At T=1 the expected accuracy of exact match is (at least) P(ref): avg@16 lies within sampling error of it."""
    from crossroute.domains.builtin import BUILTIN
    from crossroute.measure.evaluate import EvalProtocol, evaluate_domain
    from crossroute.model.load import load_model

    loaded = load_model("default")
    proto = EvalProtocol(temperature=1.0, k=16, pass_at=[1, 4, 16], p_ref=True)
    s = evaluate_domain(loaded.model, loaded.tokenizer, BUILTIN["math"], n=40, protocol=proto)
    probs = [r["p_ref"] for r in s.records]
    se = 100 * math.sqrt(sum(q * (1 - q) / 16 for q in probs)) / len(probs)
    gap = s.score - s.p_ref["value"]
    assert -4 * se <= gap <= 4 * se + 2.0, (s.score, s.p_ref, se)
    assert s.pass_at["pass@1"]["value"] == pytest.approx(s.score, abs=1e-3)  # 0/1 scores: pass@1 = avg@k
    assert s.pass_at["pass@1"]["value"] <= s.pass_at["pass@4"]["value"] <= s.pass_at["pass@16"]["value"]
    assert all(len(r["completions"]) == 16 for r in s.records)
    again = evaluate_domain(loaded.model, loaded.tokenizer, BUILTIN["math"], n=40, protocol=proto)
    assert [r["completions"] for r in again.records] == [r["completions"] for r in s.records]  # seeded


def test_clopper_pearson_matches_published_values() -> None:
    # R: binom.test(3, 10)$conf.int = 0.06673951 0.65245285; binom.test(0, 10): 0 0.3084971
    from crossroute.measure.stats import clopper_pearson

    assert clopper_pearson(3, 10) == pytest.approx((0.06673951, 0.65245285), abs=1e-7)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-7)
    assert clopper_pearson(10, 10)[1] == 1.0


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 25), st.integers(0, 25), st.integers(0, 40))
def test_binary_paired_ci_agrees_with_mcnemar(n01: int, n10: int, ties: int) -> None:
    # 0/1 outcomes: the CI excludes 0 exactly when the exact McNemar p < 0.05, and it brackets the difference.
    a = [0.0] * n01 + [1.0] * n10 + [1.0] * ties
    b = [1.0] * n01 + [0.0] * n10 + [1.0] * ties
    if not a:
        return
    d = paired_diff(a, b)
    assert d.lo - 1e-6 <= d.value <= d.hi + 1e-6
    if n01 + n10:
        assert d.significant == (mcnemar_p(a, b) < 0.05)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=3, max_size=30))
def test_linear_fit_matches_numpy_polyfit(pts: list[tuple[float, float]]) -> None:
    from crossroute.measure.stats import linear_fit

    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    fit = linear_fit(x, y, n_boot=50, n_perm=50)
    if np.ptp(x) < 1e-6:
        return
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope, rel=1e-4, abs=1e-4)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-4, abs=1e-3)
    if np.ptp(y) > 1e-6 and fit["r2"] is not None:
        assert fit["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, abs=1e-4)


def test_linear_fit_exact_line_and_no_relation() -> None:
    from crossroute.measure.stats import linear_fit

    x = np.arange(10.0)
    exact = linear_fit(x, 3.0 - 2.0 * x)
    assert (exact["slope"], exact["intercept"], exact["r2"]) == (-2.0, 3.0, 1.0)
    assert exact["slope_ci"] == [-2.0, -2.0] and exact["p"] < 0.01
    flat = linear_fit(x, [1.0, -1.0] * 5)
    assert flat["p"] > 0.3 and flat["slope_ci"][0] < 0 < flat["slope_ci"][1]
    assert linear_fit([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["slope"] is None  # x constant: no fit
    assert linear_fit([1.0, 2.0], [1.0, 2.0])["n"] == 2
