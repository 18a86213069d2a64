"""The CLI: bad input gives one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crossroute.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess[str], needle: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0]


def test_eval_missing_model(tmp_path: Path) -> None:
    p = run_cli("eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert_one_line_error(p, "no such checkpoint directory")
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_eval_unknown_domain(tmp_path: Path) -> None:
    p = run_cli("eval", "--domains", "math,chess", "--out", str(tmp_path / "run"))
    assert_one_line_error(p, "unknown domain 'chess'")


def test_train_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: default\nstages:\n  - {domain: math, steps: 1, lr: 3}\n")
    assert_one_line_error(run_cli("train", str(cfg), "--out", str(tmp_path / "run")), "field stages.0.lr")


def test_report_not_a_run(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("report", str(tmp_path)), "not a crossroute run directory")


def test_eval_writes_json_and_report(tmp_path: Path, tiny_ckpt: Path) -> None:
    out = tmp_path / "run"
    p = run_cli("eval", "--model", str(tiny_ckpt), "--domains", "math,cw", "--n", "6", "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "results" / "eval.json").read_text())
    assert set(res["scores"]) == {"math", "cw"}
    assert all(0.0 <= v <= 100.0 for v in res["scores"].values())
    assert res["details"]["math"]["n"] == 6
    assert run_cli("report", str(out)).returncode == 0
    html = (out / "report.html").read_text()
    assert "<h2>Evaluation</h2>" in html and "<h2>Domains</h2>" in html
    # same directory, different config: refused, one line
    p = run_cli("eval", "--model", str(tiny_ckpt), "--domains", "math", "--n", "6", "--out", str(out))
    assert_one_line_error(p, "different config")


@pytest.mark.parametrize("cmd", ["eval", "train", "pretrain", "report", "demo"])
def test_help_has_an_example(cmd: str) -> None:
    p = run_cli(cmd, "--help")
    assert p.returncode == 0 and "Example:" in p.stdout
