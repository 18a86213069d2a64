"""Stratified eval sets and eval sets pinned in a run directory."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.builtin import BUILTIN, math_stratum
from crossroute.domains.domain import Domain
from crossroute.domains.evalset import pin_eval_sets, read_eval_set, with_eval_sets, write_eval_sets
from crossroute.domains.spec import DomainSpec, build_domain
from crossroute.domains.strata import allocate, interleave


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 50), min_size=1),
       st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 40)), st.integers(0, 200))
def test_allocate_respects_caps_and_total(weights: dict[str, int], caps_raw: dict[str, int], n: int) -> None:
    caps = {s: caps_raw.get(s, 1000) for s in weights}
    q = allocate({s: float(w) for s, w in weights.items()}, n, caps)
    assert sum(q.values()) == min(n, sum(caps.values()))
    assert all(0 <= q[s] <= caps[s] for s in weights)
    if all(c >= n for c in caps.values()):  # nothing binds: within one of the exact proportional share
        total = sum(weights.values())
        assert all(abs(q[s] - n * w / total) < 1 + 1e-9 for s, w in weights.items())


def test_allocate_gives_a_capped_strata_remainder_to_the_others_in_proportion() -> None:
    # shares 1:1:2 of 40 = 10/10/20; 'a' holds only 4, so its 6 go to b and c as 1:2.
    assert allocate({"a": 1.0, "b": 1.0, "c": 2.0}, 40, {"a": 4, "b": 99, "c": 99}) == {"a": 4, "b": 12, "c": 24}


def test_interleave_keeps_every_prefix_stratified() -> None:
    pools = {"x": [Example(f"x{i}", "") for i in range(30)], "y": [Example(f"y{i}", "") for i in range(10)]}
    out = interleave(pools, {"x": 30, "y": 10})
    for m in (4, 8, 20, 40):
        assert sum(e.prompt.startswith("y") for e in out[:m]) == m // 4


@pytest.mark.parametrize("n", [60, 300, 500])
def test_math_eval_mix_matches_the_generator_whatever_n(n: int) -> None:
    # The generator draws 1 operation with probability 2/3 (rng.choice([1, 1, 2])); first-come unique prompts
    # over-represent it at small n. The stratified set keeps 2/3 at every n below the 1-op stratum's capacity.
    exs = BUILTIN["math"].examples("eval", n)
    ones = sum(math_stratum(e) == "1 ops" for e in exs)
    assert len(exs) == n
    assert abs(ones / n - 2 / 3) < 0.03 + 1 / n
    assert len({e.prompt for e in exs}) == n


def test_stratified_fixed_pool_keeps_the_columns_proportions(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": "1", "level": "hard" if i % 4 == 0 else "easy", "split": "eval"}
            for i in range(80)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = build_domain(DomainSpec(file=str(path), fields={"stratum": "level"}, scorer="exact"), "lv")
    for n in (8, 20, 40):
        got = Counter(e.stratum for e in d.examples("eval", n))
        assert got == {"easy": 3 * n // 4, "hard": n // 4}


def test_a_missing_stratum_column_names_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    with pytest.raises(CrossrouteError, match=r"rows.jsonl:1: no field 'level' \(mapped as stratum\)"):
        build_domain(DomainSpec(file=str(path), fields={"stratum": "level"}, scorer="exact"), "lv")


def test_pinned_sets_read_back_identical_and_are_never_drawn_again(tmp_path: Path) -> None:
    code = BUILTIN["code"]
    cw = BUILTIN["cw"]
    first = pin_eval_sets(tmp_path, [code, cw], 40)
    assert [d.eval_fixed for d in first] == [code.examples("eval", 40), cw.examples("eval", 40)]
    assert first[1].eval_fixed[0].rubric  # rubrics survive the file

    def boom(rng: random.Random) -> Example:
        raise AssertionError("a pinned eval set was drawn again")

    changed = [replace(code, generate=boom, _cache={}), replace(cw, generate=boom, _cache={})]
    again = pin_eval_sets(tmp_path, changed, 40)
    assert [d.eval_fixed for d in again] == [d.eval_fixed for d in first]
    assert again[0].examples("eval", 10) == first[0].eval_fixed[:10]
    manifest = json.loads((tmp_path / "eval_sets" / "manifest.json").read_text())
    assert manifest["domains"]["code"]["n"] == 40 and sum(manifest["domains"]["code"]["strata"].values()) == 40


def test_a_resume_that_asks_for_more_prompts_is_refused(tmp_path: Path) -> None:
    pin_eval_sets(tmp_path, [BUILTIN["math"]], 30)
    with pytest.raises(CrossrouteError, match="pins 30 prompts but this run asks for eval_n 60"):
        pin_eval_sets(tmp_path, [BUILTIN["math"]], 60)


def test_a_stratum_that_runs_out_is_recorded_and_warned(tmp_path: Path) -> None:
    # math's one-operation stratum holds about 360 eval prompts: at n = 1000 its 2/3 share cannot hold.
    with pytest.warns(UserWarning, match="domain math: at n = 1000 the stratum mix differs"):
        manifest = write_eval_sets(tmp_path, [BUILTIN["math"]], 1000)
    m = manifest["domains"]["math"]
    assert m["mix_shift"] > 0.2 and m["strata"]["1 ops"] < 400


def test_a_small_pool_is_pinned_whole_with_a_warning(tmp_path: Path) -> None:
    small = Domain("small", "t", fixed=[Example(f"q{i}", "1", split="eval") for i in range(7)], kind="exact")
    with pytest.warns(UserWarning, match="domain small: only 7 eval prompts"):
        write_eval_sets(tmp_path, [small], 100)
    assert len(read_eval_set(tmp_path, "small") or []) == 7
    assert pin_eval_sets(tmp_path, [small], 100)[0].eval_fixed is not None  # not refused: the pool is 7


def test_builtin_qa_and_cw_hold_at_least_1000_eval_prompts() -> None:
    for name in ("qa", "cw"):
        small, large = BUILTIN[name].examples("eval", 100), BUILTIN[name].examples("eval", 1000)
        assert len(large) == 1000, name
        # no stratum runs out below 1000: its share at n = 1000 is its share at n = 100
        strat = BUILTIN[name].stratum
        assert strat is not None
        a, b = Counter(strat(e) for e in small), Counter(strat(e) for e in large)
        assert all(abs(a[k] / 100 - b[k] / 1000) <= 0.02 for k in set(a) | set(b)), (name, a, b)


def test_with_eval_sets_leaves_unpinned_domains_alone_and_rejects_a_corrupt_file(tmp_path: Path) -> None:
    write_eval_sets(tmp_path, [BUILTIN["math"]], 5)
    out = with_eval_sets(tmp_path, [BUILTIN["math"], BUILTIN["code"]])
    assert out[0].eval_fixed is not None and out[1] is BUILTIN["code"]
    (tmp_path / "eval_sets" / "math.jsonl").write_text("{not json\n")
    with pytest.raises(CrossrouteError, match=r"math.jsonl:1: invalid JSON"):
        with_eval_sets(tmp_path, [BUILTIN["math"]])


def test_a_messages_row_round_trips(tmp_path: Path) -> None:
    ex = Example("hi", "yo", None, "eval", ("yo", "hey"), "", "", ({"role": "user", "content": "hi"},), "r1",
                 "f:1", "s")
    d = Domain("chat", "t", fixed=[ex], kind="exact")
    pin_eval_sets(tmp_path, [d], 5)
    assert read_eval_set(tmp_path, "chat") == [ex]
