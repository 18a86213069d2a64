"""CPU smoke test of benchmarks/bench_gpu.py on the "tiny" shape (the real run needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"
ONLY_OUTCOME = {"sdpa_double_backward"}  # may fail on purpose (no double backward through fused SDPA)
CPU_SKIPPED = {"diff_naive_gpu"}


def load_bench() -> ModuleType:
    """The script as a module (registered in sys.modules: its dataclasses need that)."""
    if "bench_gpu" in sys.modules:
        return sys.modules["bench_gpu"]
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """Run the script as a child process (the GRPO trainer sets process-wide state) on tiny, CPU, 1 thread."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out = tmp / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--out", str(out), "--device", "cpu", "--threads", "1",
         "--hvp-micro", "1", "--workdir", str(tmp), "--budget-s", "600"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not [p for p in tmp.iterdir() if p.name.startswith("bench_gpu_")], "checkpoints were not deleted"
    return json.loads(out.read_text()), proc.stdout


def test_every_part_measured_or_explained(tiny_run: tuple[dict, str]) -> None:
    data, _ = tiny_run
    parts = data["shapes"]["tiny"]["parts"]
    assert set(parts) == set(load_bench().PARTS)
    for name, rec in parts.items():
        assert "error" not in rec, (name, rec)
        if name in CPU_SKIPPED:
            assert rec["skipped"] == "no cuda" and rec["seconds"] is None
        elif name in ONLY_OUTCOME:
            assert rec["outcome"], rec
        else:
            assert isinstance(rec["seconds"], float) and rec["seconds"] > 0, (name, rec)
    assert parts["fwd_bwd"]["ratio"] == 1.0
    assert parts["hvp"]["ratio"] > 0 and parts["hvp"]["finite"] is True
    assert parts["hvp"]["micro_batches"] == 2
    assert parts["hvp_lean"]["finite"] is True and parts["hvp_lean"]["rel_diff_vs_fp32"] < 1e-5  # fp32 on CPU
    assert parts["grpo_step"]["ratio"] > 0 and len(parts["grpo_step"]["step_times"]) == 3
    assert parts["rollback_point"]["units"] >= 1 and parts["rollback_point"]["forward_s"] > 0


def test_diff_finds_the_planted_update(tiny_run: tuple[dict, str]) -> None:
    parts = tiny_run[0]["shapes"]["tiny"]["parts"]
    planted = parts["diff_write"]["planted_fraction"]
    assert abs(planted - 0.01) < 0.003
    for name in ("diff_crossroute", "diff_naive_cpu"):
        assert math.isclose(parts[name]["changed_fraction"], planted, rel_tol=1e-9), name
    assert parts["diff_crossroute"]["planted_fraction"] == planted
    assert parts["diff_raw_read"]["ratio"] == 1.0
    assert parts["diff_raw_read"]["bytes"] == parts["diff_write"]["bytes"]


def test_meta_and_table(tiny_run: tuple[dict, str]) -> None:
    data, stdout = tiny_run
    for key in ("date", "torch", "transformers", "trl", "device_name", "cuda_total_gib"):
        assert key in data["meta"]
    assert data["shapes"]["tiny"]["params"] > 0
    assert "| shape | part | seconds | ratio | peak GPU GiB | note |" in stdout
    assert "| tiny | hvp |" in stdout and "| tiny | diff_naive_gpu |" in stdout


def test_budget_spent_skips_everything(tmp_path: Path) -> None:
    bench = load_bench()
    data = bench.main(["--shapes", "tiny", "--out", str(tmp_path / "r.json"), "--device", "cpu", "--budget-s", "0"])
    parts = data["shapes"]["tiny"]["parts"]
    assert set(parts) == set(bench.PARTS)
    assert all(r["skipped"] == "budget" and r["seconds"] is None for r in parts.values())
    assert json.loads((tmp_path / "r.json").read_text())["shapes"] == data["shapes"]
