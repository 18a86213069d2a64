"""The CLI: bad input gives one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crossroute", *args], capture_output=True, text=True,
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


def _planted(tiny: Path, dst: Path, edit: str) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, dst)
    f = dst / "model.safetensors"
    if edit == "nan":
        w = load_file(str(f))
        w["model.layers.1.mlp.up_proj.weight"][0, :3] = float("nan")
        save_file(w, str(f), metadata={"format": "pt"})
    elif edit == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 100])
    elif edit == "vocab":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["vocab_size"] = 10
        (dst / "config.json").write_text(json.dumps(cfg))
        w = load_file(str(f))
        w = {k: (v[:10].contiguous() if v.shape[0] == 83 else v) for k, v in w.items()}
        save_file(w, str(f), metadata={"format": "pt"})
    assert torch  # imported for the tensor edits above
    return dst


@pytest.mark.parametrize(
    "edit, needle",
    [
        ("nan", "tensor 'model.layers.1.mlp.up_proj.weight' has 3 NaN and 0 inf values"),
        ("truncate", "model.safetensors"),
        ("vocab", "83"),
    ],
)
def test_bad_checkpoints_exit_2_with_one_line(tmp_path: Path, tiny_ckpt: Path, edit: str, needle: str) -> None:
    bad = _planted(tiny_ckpt, tmp_path / "bad", edit)
    p = run_cli("eval", "--model", str(bad), "--domains", "math", "--n", "4", "--out", str(tmp_path / "run"))
    assert_one_line_error(p, needle)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_disk_full_during_save_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_ckpt: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import errno
    import os as os_mod

    import crossroute.core.atomic as atomic
    from crossroute.cli import main as cli

    real_fdopen = os_mod.fdopen

    class FullDisk:
        def __init__(self, fh: object) -> None:
            self.fh = fh

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *a: object) -> None:
            self.fh.close()  # type: ignore[attr-defined]

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["crossroute", "eval", "--model", str(tiny_ckpt), "--domains", "math",
                                      "--n", "2", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "No space left on device" in err[0] and "Traceback" not in err[0]
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert leftovers == []  # neither run.yaml nor a temp file survived
