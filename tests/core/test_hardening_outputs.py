"""Outputs never delete what crossroute did not write; a full disk is one line naming the output; killed writes leave
nothing behind on the next run; one live process per run directory; NaN never written as a valid value."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from crossroute.analyze.diff import diff_checkpoints
from crossroute.core import atomic
from crossroute.core.atomic import MARKER, atomic_dir, atomic_write_json, temp_prefix
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, lock_run, open_run, release_run
from crossroute.measure.evaluate import DomainScore, scores_json
from crossroute.model.load import load_model, save_model
from crossroute.repair import merge as merge_mod
from crossroute.repair.merge import run_merge

ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("outputs") / "ckpt")


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("outputs2") / "ckpt", seed=1)


def _foreign(path: Path) -> Path:
    """A user's directory crossroute did not write: two files of their own."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "model.safetensors").write_bytes(b"their weights")
    return path


def _untouched(path: Path) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "notes.txt"]
    assert (path / "notes.txt").read_text() == "mine"


def _no_temps(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _tagged(name: str, pid: int) -> str:
    """The name core.atomic gives a temporary of `name` made by process `pid` on this host."""
    return f".{name}.{pid}@{socket.gethostname().replace('.', '-')}.abc123.tmp"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


# ----------------------------------------------------------------------------- no deletions


def test_foreign_directory_is_refused_untouched_unless_forced(tmp_path: Path) -> None:
    out = _foreign(tmp_path / "out")
    with pytest.raises(CrossrouteError) as ei, atomic_dir(out) as tmp:
        (tmp / "x").write_text("new")
    msg = str(ei.value)
    assert "not written by crossroute" in msg and "'model.safetensors' and more" in msg and "--force" in msg
    _untouched(out)
    _no_temps(tmp_path)
    with atomic_dir(out, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "x"]


def test_file_as_output_directory_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_text("keep")
    for force in (False, True):
        with pytest.raises(CrossrouteError, match=r"weights\.bin: is a file, not a directory"), atomic_dir(f, force):
            pass
    assert f.read_text() == "keep"
    _no_temps(tmp_path)


def test_own_and_empty_directories_are_replaced(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(empty) as tmp:  # marked now: crossroute's own, replaced whole
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in empty.iterdir()) == [MARKER, "b"]
    _no_temps(tmp_path)


def test_save_model_and_pretrain_refuse_a_foreign_out(tiny: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from crossroute.train import pretrain as pretrain_mod

    loaded = load_model(tiny, device="cpu")
    out = _foreign(tmp_path / "out")
    with pytest.raises(CrossrouteError, match="not written by crossroute"):
        save_model(loaded.model, loaded.tokenizer, out)
    _untouched(out)

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("pretrain trained before checking --out")

    monkeypatch.setattr(pretrain_mod, "build_default_model", no_training)
    with pytest.raises(CrossrouteError, match="not written by crossroute"):
        pretrain_mod.pretrain(pretrain_mod.PretrainConfig(steps=1), out=out, show_progress=False)
    _untouched(out)
    with pytest.raises(AssertionError, match="trained before"):  # force: the check passes, training starts
        pretrain_mod.pretrain(pretrain_mod.PretrainConfig(steps=1), out=out, show_progress=False, force=True)


def test_merge_out_guards(tiny: Path, tiny2: Path, tmp_path: Path) -> None:
    out = _foreign(tmp_path / "out")
    with pytest.raises(CrossrouteError, match="not written by crossroute"):
        run_merge("linear", tiny, [tiny2], out, t=0.5)
    _untouched(out)
    f = tmp_path / "merged.safetensors"
    f.write_text("keep")
    with pytest.raises(CrossrouteError, match="is a file"):
        run_merge("linear", tiny, [tiny2], f, t=0.5)
    assert f.read_text() == "keep"
    with pytest.raises(CrossrouteError, match="is an input checkpoint"):
        run_merge("linear", tiny, [tiny2], tiny2, t=0.5)
    mine = tmp_path / "mine"
    run_merge("linear", tiny, [tiny2], mine, t=0.5)
    run_merge("linear", tiny, [tiny2], mine, t=0.25)  # its own output: replaced
    assert json.loads((mine / "merge.json").read_text())["t_schedule"] == 0.25
    run_merge("linear", tiny, [tiny2], out, t=0.5, force=True)
    assert not (out / "notes.txt").exists() and (out / MARKER).exists()
    _no_temps(tmp_path)


# ----------------------------------------------------------------------------- full disk


def test_full_disk_during_save_is_one_line(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.modeling_utils as mu

    loaded = load_model(tiny, device="cpu")
    out = tmp_path / "ckpt"
    save_model(loaded.model, loaded.tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*a: object, **k: object) -> None:
        raise safetensors.SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(CrossrouteError) as ei:
        save_model(loaded.model, loaded.tokenizer, out)
    msg = str(ei.value)
    assert msg.startswith(f"{out}: the disk is full (No space left on device)") and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint intact
    _no_temps(tmp_path)

    def read_only(*a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))

    monkeypatch.setattr(mu, "safe_save_file", read_only)
    with pytest.raises(CrossrouteError, match=r"ckpt2: the filesystem is read-only.*writable disk"):
        save_model(loaded.model, loaded.tokenizer, tmp_path / "ckpt2")
    assert not (tmp_path / "ckpt2").exists()
    _no_temps(tmp_path)


def test_full_disk_during_merge_says_so(tiny: Path, tiny2: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit.io.tensor_writer import TensorWriter

    class FullAfterTwo(merge_mod.SafetensorsWriter):  # crossroute's streamed writer (transplant)
        def write(self, name: str, tensor: torch.Tensor) -> None:
            if self.next >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(tiny / "model.safetensors"))
            super().write(name, tensor)

    def full(self: TensorWriter, shard_data: dict, shard_path: str) -> None:  # mergekit's writer (every other method)
        raise safetensors.SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(merge_mod, "SafetensorsWriter", FullAfterTwo)
    monkeypatch.setattr(TensorWriter, "_save_st", full)
    for method, kw in (("transplant", {}), ("slerp", {"t": 0.5})):
        out = tmp_path / f"merged_{method}"
        with pytest.raises(CrossrouteError) as ei:
            run_merge(method, tiny, [tiny2], out, **kw)
        msg = str(ei.value)
        assert msg.startswith(f"{out}: the disk is full") and "internal" not in msg and str(tiny) not in msg
        assert not out.exists()
    _no_temps(tmp_path)


# ----------------------------------------------------------------------------- leftovers


def test_dead_save_temps_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / _tagged("ckpt", _dead_pid())
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a checkpoint")
    live = tmp_path / f"{temp_prefix('ckpt')}live99.tmp"  # this process's: in flight
    live.mkdir()
    legacy = tmp_path / ".ckpt.oldstyle.tmp"  # no PID: cannot tell, kept outside a locked run
    legacy.mkdir()
    other = tmp_path / _tagged("other", _dead_pid())  # another output's: not this write's business
    other.write_text("x")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a").write_text("1")
    assert not dead.exists() and live.exists() and legacy.exists() and other.exists()


def test_reopened_run_drops_a_dead_runs_leftovers(tmp_path: Path) -> None:
    run = open_run(tmp_path / "r", {"n": 1}, kind="eval")
    release_run(run.root)  # as if the process had died
    killed = [run.checkpoints / ".01_math.abcd1234.tmp", run.results / ".eval.json.xyz.tmp",
              run.root / ".run.yaml.q.tmp"]  # untagged (older) temporaries: the lock says their writer is dead
    killed[0].mkdir()
    (killed[0] / "model.safetensors").write_bytes(b"partial")
    for f in killed[1:]:
        f.write_text("partial")
    (run.work / "01_math" / "checkpoint-5").mkdir(parents=True)
    (run.results / "notes.txt").write_text("mine")
    run = open_run(tmp_path / "r", {"n": 1}, kind="eval")
    assert not any(p.exists() for p in killed) and not run.work.exists()
    assert (run.results / "notes.txt").read_text() == "mine" and run.config_path.exists()


def test_work_dir_helpers(tmp_path: Path) -> None:
    run = open_run(tmp_path / "r", {}, kind="train")
    w = run.work_dir("01_math")
    (w / "x").write_text("1")
    assert run.work_dir("01_math") == w and not any(w.iterdir())  # fresh each time
    run.work_dir("02_code")
    run.remove_work("01_math")
    assert not w.exists() and run.work.exists()  # another stage's scratch stays
    run.remove_work("02_code")
    assert not run.work.exists()


def test_new_run_on_a_full_disk_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: object, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("crossroute.core.rundir.atomic_write_yaml", full)
    with pytest.raises(OSError, match="No space left"):
        open_run(tmp_path / "r", {}, kind="eval")
    assert list(tmp_path.iterdir()) == []  # neither run.yaml nor .lock nor the directory


def test_open_run_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "run"
    f.write_text("keep")
    with pytest.raises(CrossrouteError, match="is a file, not a run directory"):
        open_run(f, {}, kind="eval")
    assert f.read_text() == "keep"


# ----------------------------------------------------------------------------- one live process per run

HOLDER = """
import sys, time
from crossroute.core.rundir import open_run
open_run(sys.argv[1], {"n": 1}, kind="train")
print("locked", flush=True)
time.sleep(120)
"""


def test_second_live_process_is_refused_dead_lock_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(CrossrouteError) as ei:
            open_run(root, {"n": 1}, kind="train")
        msg = str(ei.value)
        assert f"(PID {proc.pid}@" in msg and f"kill {proc.pid}" in msg and "\n" not in msg
    finally:
        proc.kill()
        proc.wait()
    run = open_run(root, {"n": 1}, kind="train")  # the holder died: its lock is free
    assert (run.root / ".lock").read_text().startswith(f"{os.getpid()}@")
    open_run(root, {"n": 1}, kind="train")  # this process again: fine


def test_non_main_rank_neither_locks_nor_cleans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    root.mkdir()
    monkeypatch.setenv("RANK", "1")
    assert lock_run(root) is False and not (root / ".lock").exists()


# ----------------------------------------------------------------------------- NaN never written as valid


def _strict(path: Path) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path}: bare {token} in JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_is_strict_nan_becomes_null(tmp_path: Path) -> None:
    p = atomic_write_json(tmp_path / "r.json", {"a": math.nan, "b": [math.inf, 1.5], "c": np.array([np.nan, 2.0]),
                                                  "d": torch.tensor([float("-inf")]), "e": np.float64("nan")})
    assert _strict(p) == {"a": None, "b": [None, 1.5], "c": [None, 2.0], "d": [None], "e": None}
    run = open_run(tmp_path / "run", {}, kind="eval")
    score = DomainScore("math", 0.0, 0)  # no examples: the CI is undefined (NaN in memory)
    run.write_result("eval", scores_json({"math": score}))
    assert run.read_result("eval")["ci"] == {"math": [None, None]}
    _strict(run.results / "eval.json")
    assert atomic.strict_json_dumps({"x": 1.0}) == '{\n  "x": 1.0\n}'


@pytest.mark.parametrize("t", [math.nan, 1.5, -0.1, math.inf])
def test_merge_refuses_t_outside_unit_interval(tiny: Path, tiny2: Path, tmp_path: Path, t: float) -> None:
    with pytest.raises(CrossrouteError, match=r"is outside \[0, 1\]"):
        run_merge("slerp", tiny, [tiny2], tmp_path / "m", t=t)
    assert not (tmp_path / "m").exists()


def test_merge_refuses_bad_t_schedules(tiny: Path, tiny2: Path, tmp_path: Path) -> None:
    sched = tmp_path / "t.yaml"
    cases = (("t: [0.0, 2.0]", r"t\[1\]"), ("t: [{filter: mlp, value: .nan}, {value: 0.5}]", r"t\[0\]\.value"))
    for text, where in cases:
        sched.write_text(text)
        with pytest.raises(CrossrouteError, match=where + r": .* is outside \[0, 1\]"):
            run_merge("linear", tiny, [tiny2], tmp_path / "m", t_schedule_yaml=sched)
    assert not (tmp_path / "m").exists()


def _with_nan(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_merge_refuses_to_write_nan_tensors(tiny: Path, tiny2: Path, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _with_nan(tiny2, tmp_path / "bad", name)
    out = tmp_path / "m"
    with pytest.raises(CrossrouteError, match=f"merged tensor '{name}' has 1 NaN or inf values"):
        merge_mod.merge_checkpoints("linear", tiny, [bad], out, t=0.5)
    assert not out.exists()
    _no_temps(tmp_path)


def test_diff_refuses_a_nan_checkpoint(tiny: Path, tmp_path: Path) -> None:
    name = "model.norm.weight"
    bad = _with_nan(tiny, tmp_path / "bad", name)
    with pytest.raises(CrossrouteError) as ei:
        diff_checkpoints(tiny, bad, workers=1)
    msg = str(ei.value)
    assert msg.startswith(f"{bad / 'model.safetensors'}: tensor '{name}' holds NaN or inf") and "\n" not in msg
    with pytest.raises(CrossrouteError, match=f"{tmp_path / 'bad'}.*'{name}' holds NaN"):
        diff_checkpoints(bad, tiny, workers=1)


def test_run_dir_results_stay_readable(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text('{"x": NaN}')  # written before strict JSON: still read
    assert math.isnan(run.read_result("old")["x"])
