"""`crossroute train` under a real 2-process launch (torchrun, gloo on CPU), as README's multi-GPU command runs it.

Every process imports a `sitecustomize` (PYTHONPATH) that logs its start (rank, pid) and every `os.replace` (the
last step of each atomic write: one line per file written) to a JSONL file, so the test sees which process wrote
what and how often, without changing the command: `torchrun --standalone --nproc_per_node 2 -m crossroute.cli train
CFG --out RUN`. Tiny model (conftest.make_tiny), built-in math and qa, a few GRPO steps, `threads: 1`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import make_tiny
from crossroute.core.rundir import RunDir

pytestmark = pytest.mark.slow

EVAL_N = 8
DOMAINS = ["math", "qa"]
HOOK = '''
import atexit, json, os
_log = os.environ.get("CROSSROUTE_TEST_LOG")
if _log and os.environ.get("RANK") is not None:
    def _write(**rec):
        with open(_log, "a") as fh:
            fh.write(json.dumps({"rank": int(os.environ["RANK"]), "pid": os.getpid(), **rec}) + "\\n")
    _write(event="start", world=int(os.environ.get("WORLD_SIZE", "1")))
    atexit.register(lambda: _write(event="exit"))
    _real = os.replace
    def _replace(src, dst, *a, **k):
        _real(src, dst, *a, **k)
        _write(event="replace", dst=os.fspath(dst))
    os.replace = _replace
'''
LAUNCH_TIMEOUT_S = 300


def write_config(path: Path, model: Path, second_steps: int, eval_n: int = EVAL_N) -> Path:
    """A 2-stage config (math, then qa) on the tiny model; `second_steps` sets how long stage 2 trains."""
    cfg = {"model": str(model), "domains": DOMAINS, "eval_n": eval_n, "train_prompts": 40, "threads": 1,
           "grpo": {"num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 6,
                    "learning_rate": 1e-2, "logging_steps": 1, "temperature": 1.0},
           "stages": [{"domain": "math", "steps": 2}, {"domain": "qa", "steps": second_steps}]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Launch:
    """One torchrun launch: its process, its console output and the hook's log."""

    proc: subprocess.Popen
    out_file: Path
    log_file: Path
    started: float = field(default_factory=time.monotonic)

    def output(self) -> str:
        return self.out_file.read_text(errors="replace") if self.out_file.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip()]

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, LAUNCH_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"torchrun ran past {LAUNCH_TIMEOUT_S} s (a deadlock?); output tail:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the launcher's process group and every worker (torchrun starts each in a session of its own),
        as a preempted job or a crashed node ends: no handler, no cleanup runs."""
        for pid in [self.proc.pid, *(r["pid"] for r in self.records() if r["event"] == "start")]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.workers_alive() and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
            time.sleep(0.05)

    def workers_alive(self) -> list[int]:
        """Worker PIDs still running (a killed worker whose launcher died is a zombie until reaped: not running)."""
        return [r["pid"] for r in self.records() if r["event"] == "start" and running(r["pid"])]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    return {"root": root, "model": make_tiny(root / "ckpt"), "hook": hook}


def _killing(got: list[Launch]) -> Iterator[list[Launch]]:
    """Collects launches and kills any still running at teardown (a failed assertion leaves no processes)."""
    yield got
    for job in got:
        if job.proc.poll() is None or job.workers_alive():
            job.kill()


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    yield from _killing([])


@pytest.fixture(scope="module")
def module_launches() -> Iterator[list[Launch]]:
    yield from _killing([])


@pytest.fixture(scope="module")
def once(env: dict[str, Any], module_launches: list[Launch]) -> tuple[Launch, Path, int]:
    """One uninterrupted 2-stage run under two processes: (launch, run directory, exit code)."""
    run = env["root"] / "run_once"
    cfg = write_config(env["root"] / "once.yaml", env["model"], second_steps=2)
    job = launch(env, cfg, run, "once", module_launches)
    return job, run, job.wait()


def launch(env: dict[str, Any], cfg: Path, out: Path, tag: str, launches: list[Launch]) -> Launch:
    """Start `torchrun --standalone --nproc_per_node 2 -m crossroute.cli train CFG --out OUT` in its own session."""
    log_file, out_file = env["root"] / f"{tag}.jsonl", env["root"] / f"{tag}.out"
    pythonpath = os.pathsep.join(p for p in (str(env["hook"]), os.environ.get("PYTHONPATH", "")) if p)
    proc_env = {**os.environ, "PYTHONPATH": pythonpath, "CROSSROUTE_TEST_LOG": str(log_file),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "crossroute.cli", "train", str(cfg), "--out", str(out)]
    with open(out_file, "w") as fh:
        proc = subprocess.Popen(cmd, env=proc_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=env["root"])
    got = Launch(proc, out_file, log_file)
    launches.append(got)
    return got


def writes(launch_: Launch, run: Path) -> list[tuple[int, str]]:
    """(rank, path relative to the run) of every file a launch renamed into place under the run directory."""
    return [(r["rank"], str(Path(r["dst"]).relative_to(run))) for r in launch_.records()
            if r["event"] == "replace" and Path(r["dst"]).is_relative_to(run)]


def expected_writes(stages: list[str]) -> set[str]:
    """Every file crossroute's train writes into a fresh run of `stages` (the CLI's report.html aside)."""
    rows = ["base", *stages]
    return ({"run.yaml", "eval_sets/manifest.json", "results/forgetting.json"}
            | {f"eval_sets/{d}.jsonl" for d in DOMAINS} | {f"checkpoints/{s}" for s in stages}
            | {f"results/train_{s}.json" for s in stages} | {f"results/kl_{s}.json" for s in stages}
            | {f"results/eval_{r}{ext}" for r in rows for ext in (".json", ".jsonl")})


KEPT = {".lock", ".crossroute"}  # crossroute's own lasting files: the run's lock, a checkpoint's "crossroute wrote it"


def leftovers(run: Path) -> list[str]:
    """Hidden entries anywhere in the run (RUN/.work, atomic-write temporaries, .old directories) but KEPT."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name not in KEPT)


def assert_finished_run(run: Path, stages: list[str]) -> None:
    """The forgetting matrix has every row, each evaluation holds every example, nothing is left behind."""
    data = RunDir(run).read_result("forgetting")
    assert data["rows"] == ["base", *stages] and data["domains"] == DOMAINS
    assert len(data["matrix"]) == 1 + len(stages) and all(len(r) == len(DOMAINS) for r in data["matrix"])
    for row in ["base", *stages]:
        lines = (run / "results" / f"eval_{row}.jsonl").read_text().splitlines()
        assert len(lines) == EVAL_N * len(DOMAINS), (row, len(lines))
    for s in stages:
        assert (run / "checkpoints" / s / "model.safetensors").is_file()
    assert leftovers(run) == [], leftovers(run)


def stage_log(run: Path, stage: str) -> list[dict[str, Any]]:
    return RunDir(run).read_result(f"train_{stage}")["log"]


def test_two_processes_train_evaluate_and_write_once(once: tuple[Launch, Path, int]) -> None:
    job, run, rc = once
    out = job.output()
    assert rc == 0, out[-4000:]
    starts = [r for r in job.records() if r["event"] == "start"]
    assert sorted(r["rank"] for r in starts) == [0, 1] and {r["world"] for r in starts} == {2}
    assert sorted(r["rank"] for r in job.records() if r["event"] == "exit") == [0, 1]  # both ran to the end

    stages = ["01_math", "02_qa"]
    got = writes(job, run)
    counts = Counter(path for _, path in got if path != "report.html")
    assert set(counts) == expected_writes(stages), sorted(set(counts) ^ expected_writes(stages))
    assert {p: n for p, n in counts.items() if n != 1} == {}  # checkpoints, evaluations, matrix: written once
    assert {rank for rank, path in got if path != "report.html"} == {0}  # by the main process only
    assert_finished_run(run, stages)
    # one global batch spans both processes: 1 prompt (4 completions / 4 generations) per process per step
    assert stage_log(run, "01_math")[0]["epoch"] == pytest.approx(2 / 40)
    assert out.count("stage 1/2: 01_math") == 1 and out.count("stage 2/2: 02_qa") == 1  # progress: main only


def test_report_built_once_under_two_processes(once: tuple[Launch, Path, int]) -> None:
    job, run, rc = once
    assert rc == 0, job.output()[-4000:]
    assert [rank for rank, path in writes(job, run) if path == "report.html"] == [0]


def test_killed_during_second_stage_then_resumed(env: dict[str, Any], launches: list[Launch]) -> None:
    run = env["root"] / "run_kill"
    cfg = write_config(env["root"] / "kill.yaml", env["model"], second_steps=40)
    first = launch(env, cfg, run, "kill_1", launches)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    log = run / "logs" / "02_qa.jsonl"  # TRL's log of stage 2 (the terminal shows only a progress line)
    while not (log.exists() and log.read_text().strip()):  # stage 2 has logged an optimizer step
        assert first.proc.poll() is None, f"the run ended before it could be killed:\n{first.output()[-3000:]}"
        assert time.monotonic() < deadline, first.output()[-3000:]
        time.sleep(0.05)
    first.kill()
    assert first.workers_alive() == []
    assert not (run / "checkpoints" / "02_qa").exists(), "the kill landed after stage 2 was saved"
    ckpt = run / "checkpoints" / "01_math" / "model.safetensors"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    eval_before = (run / "results" / "eval_01_math.json").stat().st_mtime_ns
    # what a kill inside an atomic write leaves: resume must clear it (crossroute's own temporaries only)
    (run / "checkpoints" / ".02_qa.k1ll3d.tmp").mkdir()
    (run / "checkpoints" / ".02_qa.k1ll3d.tmp" / "model.safetensors").write_bytes(b"partial")
    (run / "results" / ".eval_02_qa.json.k1ll3d.tmp").write_text("{")

    second = launch(env, cfg, run, "kill_2", launches)
    rc = second.wait()
    assert rc == 0, second.output()[-4000:]
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before  # the finished stage is untouched
    assert (run / "results" / "eval_01_math.json").stat().st_mtime_ns == eval_before
    assert second.output().count("stage 01_math: done, skipped") == 1
    resumed = Counter(path for _, path in writes(second, run) if path != "report.html")
    assert resumed == Counter({"checkpoints/02_qa": 1, "results/train_02_qa.json": 1, "results/eval_02_qa.json": 1,
                               "results/eval_02_qa.jsonl": 1, "results/kl_02_qa.json": 1,
                               "results/forgetting.json": 1}), resumed
    every = Counter(path for job in (first, second) for _, path in writes(job, run) if path != "report.html")
    assert set(every) == expected_writes(["01_math", "02_qa"]) and set(every.values()) == {1}, every
    assert_finished_run(run, ["01_math", "02_qa"])
    assert len(stage_log(run, "02_qa")) == 40  # stage 2 trained all its steps from its initial checkpoint

    # a different config on the same directory: the main process refuses it, the other must not hang at a barrier
    other = write_config(env["root"] / "other.yaml", env["model"], second_steps=40, eval_n=6)
    t0 = time.monotonic()
    third = launch(env, other, run, "kill_3", launches)
    assert third.wait() != 0
    assert "holds a different config" in third.output(), third.output()[-3000:]
    assert "[rank1]: Traceback" not in third.output()  # the waiting process ends with one line, or by the launcher
    assert time.monotonic() - t0 < 120 and third.workers_alive() == []
