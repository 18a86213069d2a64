"""Forgetting between named rows, paired over the same prompts, checked on hand-built per-example scores."""

from __future__ import annotations

import pytest

from crossroute.analyze.forgetting import compare_runs, paired_summary, per_example_scores
from crossroute.measure.stats import mcnemar_p


def _row(math: list[int], qa: list[int]) -> dict[str, dict[str, float]]:
    recs = [{"domain": "math", "prompt": f"m{i}", "score": s} for i, s in enumerate(math)]
    recs += [{"domain": "qa", "prompt": f"q{i}", "score": s} for i, s in enumerate(qa)]
    return per_example_scores(recs)


def test_forgetting_is_own_stage_row_minus_end_not_a_max() -> None:
    rows = ["base", "01_math", "02_qa"]
    base = _row([0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 10)
    after_math = _row([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [0] * 10)
    end = _row([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    s = paired_summary(rows, [base, after_math, end], ["math", "qa"], ["math", "qa"], refresh_row=None)
    f = s["forgetting"]["math"]
    assert (f["from"], f["to"]) == ("01_math", "02_qa")
    assert f["value"] == pytest.approx(30.0)  # 50 % -> 20 %
    assert f["p"] == pytest.approx(mcnemar_p([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0, 0, 0]), abs=1e-6)
    assert s["forgetting"]["qa"]["value"] == 0.0  # qa was trained last: nothing after its own stage
    assert s["own_stage_gain"]["01_math"]["value"] == pytest.approx(30.0)  # 20 % -> 50 %
    assert s["own_stage_gain"]["02_qa"]["value"] == pytest.approx(20.0)


def test_compare_runs_pairs_rows_and_prompts() -> None:
    a = [_row([1, 0, 0, 0], [0, 0, 0, 0])]
    b = [_row([1, 1, 1, 0], [0, 0, 0, 0])]
    c = compare_runs(["04_cw"], a, b, ["math", "qa"])
    assert c["04_cw"]["math"]["value"] == pytest.approx(50.0) and c["04_cw"]["math"]["test"] == "mcnemar_exact"
    assert c["04_cw"]["qa"]["value"] == 0.0 and c["04_cw"]["qa"]["p"] == 1.0
