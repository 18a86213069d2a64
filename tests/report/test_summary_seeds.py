"""The demo's across-seed summary: per-seed rows aggregated into means with t-intervals, judged by each row's own
rule; its forgetting rows agree with aggregate_seeds' forgetting.json, figure for figure and verdict for verdict."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from crossroute.core.rundir import open_run
from crossroute.experiments.sequence import aggregate_seeds
from crossroute.measure.stats import across_seeds
from crossroute.report.build import build_report
from crossroute.report.sections import summary as S

sys.path.insert(0, str(Path(__file__).parent))
from test_summary import DOMS, _by_key, _planted, _result  # noqa: E402


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval, by hand (t_{0.975} with n − 1 degrees of freedom)."""
    t975 = {1: 12.706204736, 2: 4.30265273, 3: 3.182446305}
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_forgetting_rows_across_seeds_match_forgetting_json() -> None:
    per_seed = [_result(_planted(k)) for k in (2, 2, 3)]
    seeds = [0, 1, 2]
    agg = aggregate_seeds(per_seed, seeds, DOMS)
    want = _by_key(S.forgetting_rows(agg))  # what the summary of a `crossroute train` with seeds: shows
    got = _by_key(S.aggregate_rows([S.forgetting_rows(r) for r in per_seed], seeds))
    for key in ("forgetting:math", "forgetting:code", "forgetting:cw", "own_gain"):
        assert got[key]["verdict"] == want[key]["verdict"], key
        for g, w in zip(got[key]["estimates"], want[key]["estimates"], strict=True):
            assert (g["value"], g["lo"], g["hi"], g["verdict"]) == (w["value"], w["lo"], w["hi"], w["verdict"]), key
            fig = "forgetting:" + key.split(":")[1] if key != "own_gain" else f"own_stage_gain:{g['label']}"
            a = agg["seeds"]["aggregate"][fig]
            assert (g["value"], g["lo"], g["hi"]) == (a["mean"], a["lo"], a["hi"])
    (e,) = got["forgetting:math"]["estimates"]
    mean, lo, hi = _t_interval([5.0, 5.0, 7.5])
    assert e["value"] == pytest.approx(mean, abs=1e-4) and e["lo"] == pytest.approx(lo, abs=1e-3)  # t to 3 decimals
    assert e["hi"] == pytest.approx(hi, abs=1e-3) and e["per_seed"] == [5.0, 5.0, 7.5]
    assert got["forgetting:math"]["verdict"] == S.REPRODUCED  # each seed alone is undecided
    assert "per seed: seed 0: ?; seed 1: ?; seed 2: ?" in got["forgetting:math"]["note"]


def test_each_rows_rule_is_applied_to_the_across_seed_interval() -> None:
    def row(values_per_seed: list[float], rule: S.Rule, exact: bool = True) -> list[list[dict]]:
        return [[S._row("x", "claim", "seed", "Jaccard", "T",
                        S._judged([S.Estimate("pair", v, v, v, "exact", exact=exact)], rule))]
                for v in values_per_seed]

    below = S.aggregate_rows(row([0.10, 0.12, 0.11], S.Rule(high=0.19)), [0, 1, 2])[0]
    assert below["verdict"] == S.REPRODUCED and below["estimates"][0]["exact"] is False
    spread = S.aggregate_rows(row([0.05, 0.30, 0.15], S.Rule(high=0.19)), [0, 1, 2])[0]
    a = across_seeds([0.05, 0.30, 0.15])
    assert (spread["estimates"][0]["lo"], spread["estimates"][0]["hi"]) == (a["lo"], a["hi"])
    assert spread["verdict"] == S.UNDECIDED  # every seed decided (2 ✓, 1 ✗) but the interval straddles 0.19
    assert S.aggregate_rows(row([0.3, 0.31, 0.32], S.Rule(high=0.19)), [0, 1, 2])[0]["verdict"] == S.NOT_REPRODUCED
    pos = S.aggregate_rows(row([2.0, 2.5, 3.0], S.POSITIVE), [0, 1, 2])[0]  # [1.26, 3.74]
    assert S.aggregate_rows(row([1.0, 2.0, 3.0], S.POSITIVE), [0, 1, 2])[0]["verdict"] == S.UNDECIDED  # lo −0.48
    assert pos["verdict"] == S.REPRODUCED and pos["estimates"][0]["how"].startswith("95 % t-interval across 3")


def test_softened_rows_and_rows_no_seed_measured() -> None:
    def sparsity(share: float) -> dict:
        stage = {"dtype": "float32", "thresholds": [1e-7], "below_fraction": [share], "rel_change": 1e-4}
        return {"stages": [stage, stage], "stage_names": ["01_a", "02_b"]}

    per_seed = [S.diff_rows(sparsity(0.1)) for _ in range(3)]
    row = _by_key(S.aggregate_rows(per_seed, [0, 1, 2]))["sparsity"]
    assert row["verdict"] == S.UNDECIDED  # float32 storage can not contradict a bf16 census
    absent = [S.diff_rows(None) for _ in range(3)]
    assert all(r["verdict"] == S.NOT_MEASURED for r in S.aggregate_rows(absent, [0, 1, 2]))


def test_bf16_census_is_the_sparsity_row_and_storage_its_own_row() -> None:
    def stages(shares: list[float], dtype: str) -> dict:
        return {"stages": [{"dtype": dtype, "thresholds": [1e-7], "below_fraction": [s], "rel_change": 1e-4}
                           for s in shares], "stage_names": ["01_a", "02_b"]}

    rows = _by_key(S.diff_rows(stages([0.0, 0.0], "float32"), stages([0.9, 0.8], "bfloat16")))
    assert [e["value"] for e in rows["sparsity"]["estimates"]] == [90.0, 80.0]
    assert rows["sparsity"]["verdict"] == S.REPRODUCED and "0.0 %" in rows["sparsity"]["note"]
    assert [e["value"] for e in rows["sparsity_storage"]["estimates"]] == [90.0, 80.0]
    assert rows["sparsity_storage"]["verdict"] == S.REPRODUCED
    low = _by_key(S.diff_rows(stages([0.0, 0.0], "float32"), stages([0.5, 0.8], "bfloat16")))
    assert low["sparsity"]["verdict"] == S.NOT_REPRODUCED  # a bf16 census below 77 % does contradict the seed


def test_demo_report_summary_is_the_across_seed_one(tmp_path: Path) -> None:
    top = open_run(tmp_path, {"demo": "test"}, kind="demo")
    roots = []
    for k in (2, 2, 3):
        run = open_run(tmp_path / "seeds" / str(len(roots)), {"seed": len(roots)}, kind="train")
        run.write_result("forgetting", _result(_planted(k)))
        roots.append(run.root)
    costs = [{"seed": s, "part": "sequence", "seconds": 1.5} for s in range(3)]
    data = S.write_demo_summary(top.root, roots, [0, 1, 2], costs, 10.0, 2, ["sequence"])
    assert data["cost_per_part"] == {"sequence": 4.5} and set(data["per_seed"]) == {"0", "1", "2"}
    again = S.write_demo_summary(top.root, roots, [0, 1, 2], costs[:1], 2.0, 2, ["sequence"])  # a resume
    assert again["cost_per_part"] == {"sequence": 6.0} and again["wall_seconds"] == 12.0 and len(again["history"]) == 2
    page = build_report(top.root).read_text()
    assert "95 % t-interval across 3 seeds" in page and "Across training seeds" in page
    assert page.index("The seeds' claims") < page.index("Across training seeds")
    assert "seeds/0/report.html" in page
    anchors = {r["key"]: r["anchor"] for r in data["summary"]}
    assert anchors["forgetting:math"] == S.section_href(S.FORGETTING_TITLE)  # drawn in this report
    assert anchors["sparsity"] == "seeds/0/report.html" + S.section_href(S.DIFF_TITLE)  # in the seed's report
