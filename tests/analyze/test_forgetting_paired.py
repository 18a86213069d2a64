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


def test_report_plots_carry_error_bars_and_marks(tmp_path) -> None:  # noqa: ANN001
    from crossroute.core.rundir import RunDir
    from crossroute.report.sections.forgetting import render

    rows = ["base", "01_math", "02_qa"]
    mats = [_row([0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 10), _row([1] * 5 + [0] * 5, [0] * 10),
            _row([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1] + [0] * 8)]
    paired = paired_summary(rows, mats, ["math", "qa"], ["math", "qa"], refresh_row=None)
    res = {"rows": rows, "domains": ["math", "qa"], "matrix": [[20.0, 0.0], [50.0, 0.0], [20.0, 20.0]],
           "ci": [[[0, 50], [0, 0]], [[20, 80], [0, 0]], [[0, 50], [0, 50]]], "peak": {"math": 50.0, "qa": 20.0},
           "forgetting": {"math": 30.0, "qa": 0.0}, "backward_transfer": -15.0, "average_base": 10.0,
           "average_final": 20.0, "own_stage_gain": {"01_math": 30.0, "02_qa": 20.0}, "paired": paired}
    run = RunDir(tmp_path)
    run.results.mkdir(parents=True)
    run.write_result("forgetting", res)
    html = render(run) or ""
    assert 'alt="paired differences"' in html and 'alt="score per domain across stages"' in html
    assert "* marks a CI that excludes 0" in html
