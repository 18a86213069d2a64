"""Every result file carries one envelope (kind, schema version, crossroute version, full config) beside its data."""

from __future__ import annotations

import json
from pathlib import Path

import crossroute
from crossroute.core.envelope import ENVELOPE_KEY, SCHEMA_VERSION, result_kind, unwrap, wrap
from crossroute.core.rundir import open_run


def test_write_result_wraps_with_the_run_config(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", {"model": "default", "eval_n": 7}, kind="damage")
    run.write_result("damage_math", {"measured": 0.5, "units": {"neuron": [[1.0]]}}, config={"k": 3})
    raw = json.loads((run.results / "damage_math.json").read_text())
    env = raw[ENVELOPE_KEY]
    assert env["kind"] == "damage" and env["name"] == "damage_math"
    assert env["schema_version"] == SCHEMA_VERSION and env["crossroute_version"] == crossroute.__version__
    assert env["config"]["eval_n"] == 7 and env["config"]["k"] == 3 and env["config"]["kind"] == "damage"
    assert run.read_result("damage_math") == {"measured": 0.5, "units": {"neuron": [[1.0]]}}
    assert run.read_envelope("damage_math") == env


def test_results_written_before_envelopes_still_read(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", {"model": "default"}, kind="train")
    (run.results / "eval_base.json").write_text(json.dumps({"scores": {"math": 40.0}}))
    assert run.read_result("eval_base") == {"scores": {"math": 40.0}}
    assert run.read_envelope("eval_base") is None


def test_non_dict_data_and_rewrapping() -> None:
    env, data = unwrap(wrap("conflict_math_qa", [1, 2], {"a": 1}))
    assert data == [1, 2] and env is not None and env["kind"] == "conflict"
    twice = wrap("x", wrap("x", {"v": 1}, {}), {"b": 2})
    assert unwrap(twice) == (twice[ENVELOPE_KEY], {"v": 1}) and twice[ENVELOPE_KEY]["config"] == {"b": 2}
    assert result_kind("eval_01_math") == "eval" and result_kind("forgetting") == "forgetting"
