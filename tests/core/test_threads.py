"""The thread policy (crossroute.core.threads): decided from cores, processes and overrides, applied before torch
loads, and recorded in every result's envelope. The lean-import bar of `diff`, `merge`, `report` and `--help` too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.core.threads import WAIT_POLICY, decide

BASE_ENV = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "CROSSROUTE_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}


def test_cores_are_shared_by_the_local_processes() -> None:
    assert decide(None, local_world=1, cores=16, env={}).threads == 16
    assert decide(None, local_world=4, cores=16, env={}).threads == 4
    assert decide(None, local_world=8, cores=2, env={}).threads == 1
    assert decide(None, cores=12, env={"LOCAL_WORLD_SIZE": "3"}).threads == 4


def test_overrides_in_order_flag_then_crossroute_then_openmp() -> None:
    env = {"CROSSROUTE_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert (decide(2, cores=8, env=env).threads, decide(2, cores=8, env=env).source) == (2, "flag")
    assert (decide(None, cores=8, env=env).threads, decide(None, cores=8, env=env).source) == (3, "CROSSROUTE_THREADS")
    only_omp = decide(None, cores=8, env={"OMP_NUM_THREADS": "5"})
    assert (only_omp.threads, only_omp.source) == (5, "OMP_NUM_THREADS")
    assert decide(None, cores=8, env={}).source == "cores"


def test_wait_policy_is_passive_unless_the_environment_says_otherwise() -> None:
    assert decide(None, cores=2, env={}).wait_policy == WAIT_POLICY == "PASSIVE"
    assert decide(None, cores=2, env={"OMP_WAIT_POLICY": "ACTIVE"}).wait_policy == "ACTIVE"


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_variable_names_itself(raw: str) -> None:
    with pytest.raises(CrossrouteError, match=f"CROSSROUTE_THREADS='{raw}': must be a whole number >= 1"):
        decide(None, env={"CROSSROUTE_THREADS": raw})


def _child(code: str, env: dict[str, str]) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_applied_before_torch_sets_openmp_and_torch_follows() -> None:
    code = ("import json, os; from crossroute.core.threads import apply_policy, current_policy; apply_policy(1); "
            "import torch; rec = current_policy(); "
            "print(json.dumps({**rec, 'omp': os.environ['OMP_NUM_THREADS'], 'wait': os.environ['OMP_WAIT_POLICY'], "
            "'torch_now': torch.get_num_threads()}))")
    rec = _child(code, BASE_ENV)
    assert rec["before_torch"] is True and rec["source"] == "flag"
    assert rec["omp"] == "1" and rec["wait"] == "PASSIVE" and rec["wait_policy"] == "PASSIVE"
    assert rec["torch_now"] == 1 == rec["torch_threads"]  # torch read OMP_NUM_THREADS when it loaded


def test_applied_after_torch_records_that_the_wait_policy_is_unknown() -> None:
    code = ("import json, torch; from crossroute.core.threads import apply_policy, current_policy; "
            "apply_policy(1); print(json.dumps(current_policy()))")
    rec = _child(code, BASE_ENV)
    assert rec["before_torch"] is False and rec["wait_policy"] is None and rec["torch_threads"] == 1


def test_every_result_records_the_policy_it_ran_under(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "crossroute", "--threads", "1", "eval", "--model", str(tiny),
                        "--domains", "math", "--n", "2", "--out", str(out)], capture_output=True, text=True,
                       env={**BASE_ENV, "CROSSROUTE_THREADS": "2"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "results" / "eval.json").read_text())["envelope"]["threads"]
    assert (rec["threads"], rec["source"], rec["torch_threads"], rec["wait_policy"]) == (1, "flag", 1, "PASSIVE")
    assert rec["before_torch"] is True


# The trainer stack: TRL, transformers' Trainer and what it drags in (trainer_utils alone is a seeding/enum helper
# module that mergekit uses for set_seed).
HEAVY = ("'trl', 'transformers.trainer', 'transformers.training_args', 'transformers.trainer_callback', "
         "'transformers.trainer_pt_utils'")
LEAN = ("import sys; from crossroute.cli.main import run_app; rc = run_app(sys.argv[1:]); "
        f"heavy = sorted(m for m in sys.modules if m in ({HEAVY}) or m.startswith('trl.')); "
        "print(__import__('json').dumps({'rc': rc, 'heavy': heavy}))")


def test_diff_merge_report_and_help_never_import_trl_or_the_trainer_stack(tmp_path: Path) -> None:
    a, b = make_tiny(tmp_path / "a", seed=0), make_tiny(tmp_path / "b", seed=1)
    env = {**BASE_ENV, "OMP_NUM_THREADS": "1"}
    for args in (["diff", "--help"], ["diff", str(a), str(b), "--out", str(tmp_path / "d")],
                 ["merge", "linear", str(a), str(b), "--out", str(tmp_path / "m")], ["report", str(tmp_path / "d")]):
        p = subprocess.run([sys.executable, "-c", LEAN, *args], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        assert rec == {"rc": 0, "heavy": []}, args


def test_reading_a_run_config_does_not_import_the_trainer_stack() -> None:
    """`crossroute diff RUN` resolves a run's checkpoints through experiments.sequence (TrainConfig)."""
    code = ("import json, sys; import crossroute.experiments.sequence; "
            f"print(json.dumps(sorted(m for m in sys.modules if m in ({HEAVY}) or m.startswith('trl.'))))")
    assert _child(code, {**BASE_ENV, "OMP_NUM_THREADS": "1"}) == []
