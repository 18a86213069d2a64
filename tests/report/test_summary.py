"""The report's summary of the seeds' claims: verdicts follow the CIs strictly, checked on results built by the
producers' own functions (paired_summary, aggregate_seeds, linear_fit) and on hand-built result dicts."""

from __future__ import annotations

import html as html_lib
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from crossroute.analyze.forgetting import forgetting_summary, paired_summary, per_example_scores
from crossroute.core.rundir import RunDir, load_run, open_run
from crossroute.experiments.sequence import aggregate_seeds
from crossroute.measure.stats import across_seeds, linear_fit
from crossroute.report.sections import summary as S

DOMS = ["math", "code", "cw", "qa"]  # trained in this order; qa last
ROWS = ["base", "01_math", "02_code", "03_cw", "04_qa"]
N = 40


def _flips(k: int, start: int = 1) -> list[int]:
    """N 0/1 scores: `start` everywhere but the first k examples."""
    return [1 - start] * k + [start] * (N - k)


def _per_row(scores: dict[str, list[list[int]]]) -> list[dict]:
    """scores[domain][row] -> per-example scores per row, keyed by prompt as crossroute's eval records are."""
    n_rows = len(scores[DOMS[0]])
    return [per_example_scores([{"domain": d, "prompt": f"{d}{i}", "score": s}
                                for d in DOMS for i, s in enumerate(scores[d][r])]) for r in range(n_rows)]


def _result(scores: dict[str, list[list[int]]], rows: list[str] = ROWS) -> dict:
    """A forgetting.json as the sequence writes it (matrix, summary, paired figures), from per-example scores."""
    per_row = _per_row(scores)
    matrix = [[100 * sum(scores[d][r]) / N for d in DOMS] for r in range(len(rows))]
    refresh = len(rows) - 1 if rows[-1].startswith("refresh_") else None
    return {"rows": rows, "domains": DOMS, "matrix": matrix,
            **forgetting_summary(rows, matrix, DOMS, DOMS, refresh),
            "paired": paired_summary(rows, per_row, DOMS, DOMS, refresh)}


ONES, ZEROS = [1] * N, [0] * N


def _planted(math_lost: int = 20) -> dict[str, list[list[int]]]:
    """math learnt in stage 1, `math_lost` of it lost by the end; code gains after its stage (negative forgetting);
    cw loses one example (undecided); qa is trained last."""
    return {"math": [ZEROS, ONES, ONES, ONES, _flips(math_lost)],
            "code": [ZEROS, ZEROS, ZEROS, ONES, ONES],
            "cw": [ZEROS, ZEROS, ZEROS, ONES, _flips(1)],
            "qa": [ZEROS, ZEROS, ZEROS, ZEROS, ONES]}


def _by_key(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in rows}


def test_verdict_rules_follow_the_interval_strictly() -> None:
    assert S.verdict_positive(0.1, 5.0) == S.REPRODUCED
    assert S.verdict_positive(-5.0, -0.1) == S.NOT_REPRODUCED
    assert S.verdict_positive(0.0, 5.0) == S.UNDECIDED  # a bound at 0 does not exclude 0
    assert S.verdict_positive(-5.0, 0.0) == S.UNDECIDED
    assert S.verdict_positive(None, 1.0) == S.verdict_positive(float("nan"), 1.0) == S.UNDECIDED
    assert S.verdict_bound(-0.5, 0.9, -1.0, 1.0) == S.REPRODUCED
    assert S.verdict_bound(-3.0, -1.5, -1.0, 1.0) == S.NOT_REPRODUCED
    assert S.verdict_bound(1.5, 3.0, -1.0, 1.0) == S.NOT_REPRODUCED
    assert S.verdict_bound(-2.0, 0.5, -1.0, 1.0) == S.UNDECIDED
    assert S.verdict_bound(0.19, 0.19, None, 0.19) == S.NOT_REPRODUCED  # an exact figure is always decided
    assert S.verdict_bound(0.18, 0.18, None, 0.19) == S.REPRODUCED
    assert S.combine([S.REPRODUCED, S.REPRODUCED]) == S.REPRODUCED
    assert S.combine([S.REPRODUCED, S.UNDECIDED]) == S.UNDECIDED
    assert S.combine([S.UNDECIDED, S.NOT_REPRODUCED, S.REPRODUCED]) == S.NOT_REPRODUCED
    assert S.combine([]) == S.NOT_MEASURED


def test_forgetting_rows_take_the_paired_ci_of_each_earlier_domain() -> None:
    res = _result(_planted())
    rows = _by_key(S.forgetting_rows(res))
    assert "forgetting:qa" not in rows  # trained last: nothing after its own stage
    paired = res["paired"]["forgetting"]
    for d, want in (("math", S.REPRODUCED), ("code", S.NOT_REPRODUCED), ("cw", S.UNDECIDED)):
        (e,) = rows[f"forgetting:{d}"]["estimates"]
        assert (e["value"], e["lo"], e["hi"]) == (paired[d]["value"], paired[d]["lo"], paired[d]["hi"])
        assert rows[f"forgetting:{d}"]["verdict"] == want == S.verdict_positive(paired[d]["lo"], paired[d]["hi"])
        assert "1 seed" in e["how"] and f"{paired[d]['from']} → {paired[d]['to']}" in e["label"]
    assert paired["math"]["value"] == pytest.approx(50.0)  # 20 of 40 lost
    gain = rows["own_gain"]
    assert [e["label"] for e in gain["estimates"]] == ROWS[1:]
    assert [e["verdict"] for e in gain["estimates"]] == [S.REPRODUCED, S.UNDECIDED, S.REPRODUCED, S.REPRODUCED]
    assert gain["verdict"] == S.UNDECIDED  # code's own stage changed nothing
    for key in ("refresh_recovery", "refresh_others", "mixed_vs_sequential", "kl_slope"):
        assert rows[key]["verdict"] == S.NOT_MEASURED and rows[key]["estimates"] == []


def test_refresh_rows_recovery_and_the_others_bound() -> None:
    rows = [*ROWS, "refresh_math"]
    s = _planted()
    s["math"].append(ONES)  # the refresh recovers all 20
    s["code"].append(ONES)  # unchanged: CI [0, 0], inside ±1
    s["cw"].append(_flips(21))  # 20 more lost: wholly outside ±1
    s["qa"].append(_flips(1))  # one example: straddles the bound
    res = _result(s, rows)
    got = _by_key(S.forgetting_rows(res))
    assert got["refresh_recovery"]["verdict"] == S.REPRODUCED
    assert got["refresh_recovery"]["estimates"][0]["value"] == pytest.approx(50.0)
    others = {e["label"]: e for e in got["refresh_others"]["estimates"]}
    assert set(others) == {"code", "cw", "qa"}
    for d, want in (("code", S.REPRODUCED), ("cw", S.NOT_REPRODUCED), ("qa", S.UNDECIDED)):
        p = res["paired"]["refresh"][d]
        assert others[d]["verdict"] == want == S.verdict_bound(p["lo"], p["hi"], -1.0, 1.0)
    assert got["refresh_others"]["verdict"] == S.NOT_REPRODUCED


def test_seeds_use_the_across_seed_interval_not_one_runs_ci() -> None:
    per_seed = [_result(_planted(k)) for k in (2, 2, 3)]  # math loses 5, 5, 7.5 points
    one = per_seed[0]["paired"]["forgetting"]["math"]
    assert S.verdict_positive(one["lo"], one["hi"]) == S.UNDECIDED  # each run alone is undecided
    res = aggregate_seeds(per_seed, [0, 1, 2], DOMS)
    res["paired"] = per_seed[0]["paired"]  # a stray single-run figure must not be used
    (e,) = _by_key(S.forgetting_rows(res))["forgetting:math"]["estimates"]
    want = across_seeds([5.0, 5.0, 7.5])
    assert (e["value"], e["lo"], e["hi"]) == (want["mean"], want["lo"], want["hi"])
    assert want["lo"] > 0 and "across 3 seeds" in e["how"]
    assert _by_key(S.forgetting_rows(res))["forgetting:math"]["verdict"] == S.REPRODUCED
    assert [x["label"] for x in _by_key(S.forgetting_rows(res))["own_gain"]["estimates"]] == ROWS[1:]


def test_kl_slope_and_mixed_rows() -> None:
    res = _result(_planted())
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    fit = linear_fit(xs, [2 * x + 0.01 * (-1) ** i for i, x in enumerate(xs)])
    res["forgetting_vs_kl"] = {"fit_new_task": fit}
    diff = {d: {"value": v, "lo": lo, "hi": hi, "n": N} for d, v, lo, hi in
            (("math", 10.0, 4.0, 16.0), ("code", 3.0, -1.0, 7.0), ("qa", -9.0, -12.0, -6.0))}
    res["mixed_vs_sequential"] = {"difference": diff}
    rows = _by_key(S.forgetting_rows(res))
    (e,) = rows["kl_slope"]["estimates"]
    assert e["value"] == fit["slope"] and [e["lo"], e["hi"]] == fit["slope_ci"] and fit["slope_ci"][0] > 0
    assert rows["kl_slope"]["verdict"] == S.REPRODUCED and "1 seed" in e["how"]
    mixed = rows["mixed_vs_sequential"]
    assert [x["label"] for x in mixed["estimates"]] == ["math", "code"]  # qa, trained last, is no earlier domain
    assert mixed["verdict"] == S.UNDECIDED


def _diff(dtype: str, below: float, jac_max: float) -> dict:
    stage = {"dtype": dtype, "thresholds": [1e-9, 1e-8, 1e-7, 1e-6, 1e-5],
             "below_fraction": [0.0, 0.0, below, 0.9, 1.0], "rel_change": 2e-4, "top_k_percent": 1.0}
    m = [[1.0, 0.05, jac_max], [0.05, 1.0, 0.02], [jac_max, 0.02, 1.0]]
    return {"stages": [stage, stage, stage], "stage_names": ["01_math", "02_code", "03_qa"],
            "jaccard": {"neuron": m}}


def test_sparsity_row_names_the_storage_dtype() -> None:
    bf = _by_key(S.diff_rows(_diff("bfloat16", 0.50, 0.25)))
    assert bf["sparsity"]["verdict"] == S.NOT_REPRODUCED
    assert [e["value"] for e in bf["sparsity"]["estimates"]] == [50.0] * 3
    assert all("exact count, bfloat16 storage" == e["how"] for e in bf["sparsity"]["estimates"])
    fp = _by_key(S.diff_rows(_diff("float32", 0.50, 0.25)))["sparsity"]
    assert fp["verdict"] == S.UNDECIDED and "float32" in fp["note"] and "no contradiction" in fp["note"]
    assert _by_key(S.diff_rows(_diff("bfloat16", 0.80, 0.1)))["sparsity"]["verdict"] == S.REPRODUCED
    assert _by_key(S.diff_rows(_diff("float32", 0.80, 0.1)))["sparsity"]["verdict"] == S.REPRODUCED
    assert bf["rel_change"]["verdict"] == S.REPRODUCED
    (j,) = bf["changed_jaccard"]["estimates"]
    assert j["value"] == 0.25 and "01_math / 03_qa" in bf["changed_jaccard"]["note"] and j["how"] == "exact count"
    assert bf["changed_jaccard"]["verdict"] == S.NOT_REPRODUCED
    assert _by_key(S.diff_rows(_diff("bfloat16", 0.8, 0.1)))["changed_jaccard"]["verdict"] == S.REPRODUCED


def test_routes_row_against_random_sets_of_the_same_size() -> None:
    base = S.random_jaccard(100, 10.0)
    assert base == pytest.approx(0.1 / 1.9)  # 10 of 100 units: p / (2 - p)
    routes = {"domains": ["math", "code", "qa", "cw"], "q": 10.0, "n": 64, "layout": {"intermediate_size": 100},
              "jaccard": {"neuron": [[1, 0.3, 0.2, 0.0], [0.3, 1, 0.25, 0.0], [0.2, 0.25, 1, 0.0], [0, 0, 0, 1]]}}
    row = S.routes_row(routes)
    assert [e["label"] for e in row["estimates"]] == ["math / code", "math / qa", "code / qa"]  # cw is not a pair
    assert row["verdict"] == S.REPRODUCED
    routes["jaccard"]["neuron"][0][2] = routes["jaccard"]["neuron"][2][0] = 0.03  # math / qa below random
    assert S.routes_row(routes)["verdict"] == S.NOT_REPRODUCED


def test_conflict_and_damage_rows() -> None:
    def conflict(g: float, lo: float, hi: float) -> dict:
        return {"domain_a": "math", "domain_b": "qa", "n": 64, "global_cosine": g,
                "most_conflicting": {"cosine": lo}, "most_synergistic": {"cosine": hi}}

    (row,) = S.conflict_rows([conflict(0.004, -0.07, 0.08)])
    assert row["verdict"] == S.REPRODUCED and row["estimates"][0]["value"] == pytest.approx(0.07 - 0.004)
    assert S.conflict_rows([conflict(0.1, -0.07, 0.08)])[0]["verdict"] == S.NOT_REPRODUCED
    assert S.conflict_rows([conflict(0.004, 0.01, 0.08)])[0]["verdict"] == S.NOT_REPRODUCED  # no module conflicts
    shares = {"share_eig": [0.2, 0.3, 0.4, 0.45, 0.5, 0.6], "share_random": [1e-4] * 6,
              "share_top_abs_delta": [1e-3] * 6}
    damage = {"domain": "math", "n": 64, "first_order": 0.01, "second_order": 0.03,
              "conflict": [{"domain_b": "qa", **shares},
                           {"domain_b": "cw", **shares, "share_top_abs_delta": [0.7] * 6}]}
    rows = _by_key(S.damage_rows([damage]))
    assert rows["second_order:math"]["estimates"][0]["value"] == pytest.approx(3.0)
    assert rows["second_order:math"]["verdict"] == S.REPRODUCED
    assert rows["subspace:math/qa"]["estimates"][0]["value"] == pytest.approx(0.5 - 1e-3)  # r = 5: eigen − top-|δ|
    assert rows["subspace:math/qa"]["verdict"] == S.REPRODUCED
    assert rows["subspace:math/cw"]["verdict"] == S.NOT_REPRODUCED  # the top-|δ| baseline carries more
    assert _by_key(S.damage_rows([{**damage, "second_order": 0.001}]))["second_order:math"]["verdict"] == \
        S.NOT_REPRODUCED


def _change(v: float, lo: float, hi: float) -> dict:
    return {"value": v, "lo": lo, "hi": hi, "n": 100}


def test_rollback_rows_use_the_screen_where_a_point_has_no_greedy_eval() -> None:
    points = [{"variant": "mlp", "selector": "random", "fraction": 2.0, "full_eval": True, "recovery": 0.9,
               "change": {"math": _change(9.0, 5.0, 12.0)}},  # not the conflict selector: ignored
              {"variant": "mlp", "selector": "conflict", "fraction": 2.0, "full_eval": False, "recovery": None,
               "screen_recovery": 0.3, "change": {},
               "screen_change": {"math": _change(1.5, 0.5, 2.5), "qa": _change(-0.2, -0.6, 0.1)}},
              {"variant": "joint", "selector": "conflict", "fraction": 16.0, "full_eval": True, "recovery": -0.2,
               "change": {"math": _change(-4.0, -7.0, -1.0), "qa": _change(0.0, 0.0, 0.0)}}]
    res = {"domain": "math", "others": ["qa"], "score_peak": 40.0, "score_now": {"math": 20.0}, "points": points}
    rows = _by_key(S.rollback_rows([res]))
    (e,) = rows["rollback:mlp:math"]["estimates"]
    assert (e["value"], e["lo"], e["hi"]) == (1.5, 0.5, 2.5) and "P(ref) screen" in e["label"]
    assert rows["rollback:mlp:math"]["verdict"] == S.REPRODUCED
    assert "recovery 30.0 % of a 20.00-point gap" in rows["rollback:mlp:math"]["note"]
    joint = rows["rollback:joint:math"]
    assert joint["verdict"] == S.NOT_REPRODUCED and "greedy" in joint["estimates"][0]["label"]
    assert "nearest swept fraction to 32 %" in joint["note"]
    assert rows["rollback_collateral:math"]["verdict"] == S.REPRODUCED  # the screen's qa CI is inside ±1


def test_cpift_and_circuit_rows() -> None:
    cpift = {"cpift_vs": {"mixed_sft": {"math": _change(5.0, 1.0, 9.0), "qa": _change(3.0, 0.5, 6.0)},
                          "sequential_sft": {"math": _change(5.0, 1.0, 9.0), "qa": _change(-3.0, -6.0, -0.5)}}}
    rows = _by_key(S.cpift_rows(cpift))
    assert rows["cpift_vs:mixed_sft"]["verdict"] == S.REPRODUCED
    assert rows["cpift_vs:sequential_sft"]["verdict"] == S.NOT_REPRODUCED
    assert all(r["verdict"] == S.NOT_MEASURED for r in S.cpift_rows(None))
    rl = {"domain": "math", "retention_difference": {"math": _change(0.12, 0.03, 0.2), "qa": _change(-1, -2, -1)}}
    row = S.circuit_row(rl, [])
    assert row["estimates"][0]["value"] == pytest.approx(12.0) and row["estimates"][0]["lo"] == pytest.approx(3.0)
    assert row["verdict"] == S.REPRODUCED and row["section"] == "RL vs SFT on math"
    assert S.circuit_row(None, [])["verdict"] == S.NOT_MEASURED


def _run(tmp_path: Path, results: dict[str, dict]) -> RunDir:
    run = open_run(tmp_path / "run", {"model": "m"}, "train")
    for name, obj in results.items():
        run.write_result(name, obj)
    return load_run(run.root)


def test_absent_results_are_listed_as_not_measured(tmp_path: Path) -> None:
    empty = _run(tmp_path / "a", {})
    assert all(r["verdict"] == S.NOT_MEASURED for r in S.summary_rows(empty))
    assert S.render(empty) is None  # nothing measured: the page keeps its "no results" note
    run = _run(tmp_path / "b", {"forgetting": _result(_planted())})
    rows = S.summary_rows(run)
    json.dumps(rows)  # the rows are plain JSON
    absent = [r for r in rows if r["verdict"] == S.NOT_MEASURED]
    assert {r["key"] for r in absent} >= {"sparsity", "active_overlap", "conflict", "rollback:mlp",
                                          "cpift_vs:mixed_sft", "circuit_retention", "refresh_recovery"}
    page = S.render(run)
    assert page is not None and page.count("<td class=\"v-not-measured-in-this-run\">") == len(absent)
    assert page.count("<tr>") == len(rows) + 1  # one row per claim, hidden none
    assert page.count("href=") == len(rows) - len(absent)  # no link to a section the run lacks


def test_rows_render_their_interval_unless_exact() -> None:
    refresh = {"key": "k", "claim": "c", "seed": "s", "unit": "points", "section": "T", "anchor": "#t", "note": "",
               "verdict": S.REPRODUCED, "estimates": [
                   {"label": "qa", "value": 0.0, "lo": 0.0, "hi": 0.0, "how": "paired", "verdict": S.REPRODUCED,
                    "exact": False}]}
    assert "qa <b>+0.00</b> [+0.00, +0.00]" in S.render_summary_section([refresh])
    (sparse,) = [r for r in S.diff_rows(_diff("bfloat16", 0.8, 0.1)) if r["key"] == "sparsity"]
    page = S.render_summary_section([sparse])
    assert "01_math <b>80 %</b> <span" in page and "[" not in page.split("<tbody>")[1].split("</tbody>")[0]


DEMO = Path("/tmp/demo2")


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "results" / "forgetting.json").exists(), reason="no demo run at /tmp/demo2")
def test_demo_report_opens_with_the_summary(tmp_path: Path) -> None:
    from crossroute.report.build import build_report

    dst = tmp_path / "demo"
    dst.mkdir()
    shutil.copy(DEMO / "run.yaml", dst / "run.yaml")
    shutil.copytree(DEMO / "results", dst / "results", ignore=shutil.ignore_patterns("*.jsonl"))
    page = build_report(dst).read_text()
    titles = [html_lib.unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", page)]
    assert titles[0] == "The seeds' claims on this run"  # the page opens with the summary
    rows = S.summary_rows(load_run(dst))
    assert sum(r["verdict"] != S.NOT_MEASURED for r in rows) >= 15
    assert not any(math.isnan(e["value"]) for r in rows for e in r["estimates"])
    for r in rows:
        if r["verdict"] == S.NOT_MEASURED:
            continue
        assert r["section"] in titles, r["key"]
        assert f'id="{r["anchor"].removeprefix("#")}"' in page, r["key"]  # the link's target exists


def test_every_section_gets_the_id_of_its_title() -> None:
    from crossroute.report.html import anchor, section, with_ids

    assert anchor("Update anatomy") == "update-anatomy" and anchor("RL vs SFT: KL & more") == "rl-vs-sft-kl-more"
    assert section("Update anatomy", "x").startswith('<section id="update-anatomy"><h2>')
    own = '<section class="diff">\n<h2>Update anatomy</h2><p>..</p><section><h2>inner</h2></section></section>'
    got = with_ids(own)
    assert got.startswith('<section id="update-anatomy" class="diff"><h2>Update anatomy</h2>')
    assert got.count("id=") == 1  # only the section's own opening tag
    assert with_ids(got) == got  # a section that has an id keeps it


def _visible(page: str) -> str:
    """The page's text as a reader sees it (no tags, styles or attribute values), lower case."""
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", page, flags=re.S))).lower()
