"""Atomic writes and the run directory convention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from crossroute.core.atomic import atomic_dir, atomic_write_json, atomic_write_text
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import load_run, open_run


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "r.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    atomic_write_text(p, "old")
    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": object()})
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_atomic_dir_swaps_or_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed mid-save")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(f.name for f in target.iterdir()) == [".crossroute", "b"]  # + its marker
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]


def test_run_dir_refuses_a_different_config(tmp_path: Path) -> None:
    run = open_run(tmp_path / "r", {"model": "m", "n": 1}, kind="eval")
    assert run.config_path.exists() and run.results.is_dir() and run.checkpoints.is_dir()
    open_run(tmp_path / "r", {"model": "m", "n": 1}, kind="eval")  # same config: reopened
    with pytest.raises(CrossrouteError, match="field 'n' differs"):
        open_run(tmp_path / "r", {"model": "m", "n": 2}, kind="eval")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(CrossrouteError, match="not empty and has no run.yaml"):
        open_run(tmp_path / "other", {}, kind="eval")
    with pytest.raises(CrossrouteError, match="not a crossroute run directory"):
        load_run(tmp_path / "other")


def test_corrupt_result_is_named(tmp_path: Path) -> None:
    run = open_run(tmp_path / "r", {}, kind="eval")
    (run.results / "eval.json").write_text("{")
    with pytest.raises(CrossrouteError, match="eval.json: corrupt JSON"):
        run.read_result("eval")
