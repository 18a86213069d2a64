"""The exit-code contract of every command (crossroute.core.errors): bad input exits 2 with exactly one stderr line
`crossroute: error: ...` naming the option, file or field, and no traceback; Ctrl-C and SIGTERM exit 130 with one
line; success exits 0.

The bad-input matrix runs in one helper process (this file run as a script) that imports the heavy modules once and
forks one child per case, two at a time: each child runs the real `crossroute.cli.main.main()` with its own argv,
stderr and exit status, so no case pays torch's import. The entry points themselves (`python -m crossroute.cli`,
`python -m crossroute`), the signals and a success run are real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
WORKERS = 2
CASE_TIMEOUT_S = 90.0  # one bad input that runs longer hangs instead of refusing (a failure, not a wait)
INTERRUPTED = "crossroute: interrupted; what finished is kept, rerun the same command to resume."


@dataclass(frozen=True)
class Case:
    """One bad input: the arguments ({D}: the data directory, {T}: the tiny checkpoint) and a substring the error
    line must hold (the option, file or field it names)."""

    id: str
    args: tuple[str, ...]
    needle: str


def case(id: str, line: str, needle: str) -> Case:
    return Case(id, tuple(line.split()), needle)


CKPTS = "--before {T} --after {D}/other"
ROLL = "rollback --from {D}/other --to {T} --domain math --others qa"
CIRC = "circuits --base default --models rl={T}"

CASES: list[Case] = [
    # eval
    case("eval-unknown-option", "eval --nn 3", "No such option: --nn"),
    case("eval-n-not-int", "eval --n abc", "'--n'"),
    case("eval-n-zero", "eval --n 0", "'--n'"),
    case("eval-n-negative", "eval --n -5", "'--n'"),
    case("eval-n-huge", "eval --n 100000000", "10000"),
    case("eval-k-zero", "eval --k 0", "'--k'"),
    case("eval-k-greedy", "eval --k 2 --out {D}/r", "k > 1 samples need temperature > 0"),
    case("eval-top-p-zero", "eval --top-p 0 --out {D}/r", "--top-p: Input should be greater than 0"),
    case("eval-temperature-negative", "eval --temperature -1 --out {D}/r", "--temperature"),
    case("eval-pass-at-text", "eval --pass-at x --out {D}/r", "--pass-at 'x'"),
    case("eval-out-is-file", "eval --out {D}/afile", "'--out'"),
    case("eval-extra-argument", "eval stray", "stray"),
    case("eval-unknown-domain", "eval --domains math,chess --out {D}/r", "unknown domain 'chess'"),
    case("eval-domain-twice", "eval --domains math,math --out {D}/r", "given twice"),
    case("eval-no-domains", "eval --domains , --out {D}/r", "no domains given"),
    case("eval-missing-model", "eval --model {D}/nope --out {D}/r", "no such checkpoint directory"),
    case("eval-model-is-file", "eval --model {D}/afile --out {D}/r", "afile"),
    case("eval-deep-jsonl", "eval --domains {D}/deep.jsonl --out {D}/r", "deep.jsonl:1: nested too deeply"),
    case("eval-invalid-jsonl", "eval --domains {D}/bad.jsonl --out {D}/r", "bad.jsonl:2: invalid JSON"),
    case("eval-no-eval-rows", "eval --domains {D}/noeval.jsonl --out {D}/r", "domain noeval: no eval rows"),
    case("eval-10mb-prompt", "eval --model {T} --domains {D}/long.jsonl --out {D}/r", "long.jsonl:1"),
    case("eval-eval-set-unpinned", "eval --eval-set {D}/emptyrun --domains math --out {D}/r", "--eval-set"),
    # train
    case("train-missing-config", "train", "Missing argument"),
    case("train-no-such-config", "train {D}/nope.yaml", "no such config file"),
    case("train-config-is-dir", "train {D}", "is a directory"),
    case("train-out-is-file", "train {D}/steps0.yaml --out {D}/afile", "'--out'"),
    case("train-unknown-option", "train {D}/steps0.yaml --outt x", "No such option: --outt"),
    case("train-invalid-yaml", "train {D}/badyaml.yaml --out {D}/r", "invalid YAML"),
    case("train-not-a-mapping", "train {D}/list.yaml --out {D}/r", "expected a mapping"),
    case("train-unknown-field", "train {D}/stage_lr.yaml --out {D}/r", "field stages.0.lr"),
    case("train-steps-zero", "train {D}/steps0.yaml --out {D}/r", "field stages.0.steps"),
    case("train-no-stages", "train {D}/nostages.yaml --out {D}/r", "field stages"),
    case("train-eval-n-text", "train {D}/evaln_text.yaml --out {D}/r", "field eval_n"),
    case("train-eval-n-huge", "train {D}/evaln_huge.yaml --out {D}/r", "field eval_n"),
    case("train-learning-rate-fast", "train {D}/lr_fast.yaml --out {D}/r", "field grpo.learning_rate"),
    case("train-learning-rate-text", "train {D}/lr_text.yaml --out {D}/r", "field stages.0.grpo.learning_rate"),
    case("train-completion-length-zero", "train {D}/mcl0.yaml --out {D}/r", "field grpo.max_completion_length"),
    case("train-temperature-zero", "train {D}/temp0.yaml --out {D}/r", "field grpo.temperature"),
    case("train-grpo-typo", "train {D}/grpo_typo.yaml --out {D}/r", "grpo.learnin_rate"),
    case("train-deep-yaml", "train {D}/deep.yaml --out {D}/r", "deep.yaml"),
    # diff
    case("diff-missing-paths", "diff", "Missing argument"),
    case("diff-not-a-run", "diff {D}/emptyrun", "not a crossroute run directory"),
    case("diff-top-k-zero", "diff {T} {D}/other --top-k 0", "--top-k"),
    case("diff-out-is-file", "diff {T} {D}/other --out {D}/afile", "'--out'"),
    case("diff-bad-as-dtype", "diff {T} {D}/other --as-dtype int8", "unknown storage dtype 'int8'"),
    # routes
    case("routes-missing-model", "routes", "Missing argument"),
    case("routes-n-zero", "routes default --n 0", "'--n'"),
    case("routes-batch-size-zero", "routes default --batch-size 0", "'--batch-size'"),
    case("routes-q-zero", "routes default --q 0", "--q"),
    case("routes-q-above-100", "routes default --q 150", "--q"),
    case("routes-out-is-file", "routes default --out {D}/afile", "'--out'"),
    # conflict
    case("conflict-one-domain", "conflict default --domains math", "exactly two domains"),
    case("conflict-bad-layers", "conflict default --layers x", "--layers"),
    case("conflict-n-zero", "conflict default --n 0", "'--n'"),
    case("conflict-batch-size-negative", "conflict default --batch-size -1", "'--batch-size'"),
    # damage
    case("damage-before-equals-after", "damage --before default --after default --domain math", "same checkpoint"),
    case("damage-missing-domain", f"damage {CKPTS}", "--domain"),
    case("damage-k-zero", f"damage {CKPTS} --domain math --k 0", "'--k'"),
    case("damage-empty-layers", f"damage {CKPTS} --domain math --layers 5-2", "--layers"),
    case("damage-threads-zero", f"damage {CKPTS} --domain math --threads 0", "'--threads'"),
    case("damage-batch-size-zero", f"damage {CKPTS} --domain math --batch-size 0", "'--batch-size'"),
    # rollback
    case("rollback-fractions-text", f"{ROLL} --fractions abc", "--fractions"),
    case("rollback-fractions-zero", f"{ROLL} --fractions 0", "--fractions"),
    case("rollback-eval-n-zero", f"{ROLL} --eval-n 0", "'--eval-n'"),
    case("rollback-from-equals-to", "rollback --from {T} --to {T} --domain math --others qa", "same checkpoint"),
    case("rollback-save-best-is-file", f"{ROLL} --save-best {{D}}/afile", "'--save-best'"),
    case("rollback-missing-others", "rollback --from {D}/other --to {T} --domain math", "--others"),
    case("rollback-full-at-malformed", f"{ROLL} --full-at mlp/2", "full-eval point 'mlp/2': write VARIANT/SELECTOR"),
    # circuits
    case("circuits-missing-base", "circuits --models rl={T}", "--base"),
    case("circuits-target-zero", f"{CIRC} --target 0", "--target"),
    case("circuits-n-zero", f"{CIRC} --n 0", "'--n'"),
    case("circuits-max-fraction-above-1", f"{CIRC} --max-fraction 2", "--max-fraction"),
    case("circuits-delta-negative", f"{CIRC} --delta -1", "--delta"),
    # cpift
    case("cpift-no-such-config", "cpift {D}/nope.yaml --out {D}/r", "no such config file"),
    case("cpift-one-task", "cpift {D}/cp_tasks1.yaml --out {D}/r", "field tasks"),
    case("cpift-eval-n-zero", "cpift {D}/cp_evaln0.yaml --out {D}/r", "field eval_n"),
    case("cpift-sft-max-length-zero", "cpift {D}/cp_sft_len.yaml --out {D}/r", "field sft.max_length"),
    case("cpift-out-is-file", "cpift {D}/cp_tasks1.yaml --out {D}/afile", "'--out'"),
    # merge
    case("merge-unknown-method", "merge bogus default {T}", "merge method 'bogus'"),
    case("merge-missing-models", "merge slerp default", "Missing argument"),
    case("merge-out-is-file", "merge slerp default {T} --out {D}/afile", "'--out'"),
    case("merge-top-percent-zero", "merge transplant default {T} --top-percent 0", "--top-percent"),
    case("merge-missing-model", "merge slerp default {D}/nope --out {D}/m", "no such checkpoint directory"),
    # report
    case("report-missing-run", "report", "Missing argument"),
    case("report-not-a-run", "report {D}/emptyrun", "not a crossroute run directory"),
    case("report-run-is-file", "report {D}/afile", "'run_dir'"),
    case("report-result-missing-keys", "report {D}/rep_missing", "results"),
    case("report-result-invalid-json", "report {D}/rep_badjson", "eval.json"),
    # rescore
    case("rescore-missing-records", "rescore", "Missing argument"),
    case("rescore-no-such-records", "rescore {D}/nope.jsonl --domain math", "no such records file"),
    case("rescore-deep-jsonl", "rescore {D}/deep.jsonl --domain math", "deep.jsonl:1: nested too deeply"),
    case("rescore-unknown-domain", "rescore {D}/records.jsonl --domain chess", "unknown domain 'chess'"),
    case("rescore-missing-domain", "rescore {D}/records.jsonl", "--domain"),
    case("rescore-no-completion", "rescore {D}/norecords.jsonl --domain math", "'completion'"),
    # pretrain
    case("pretrain-steps-zero", "pretrain --steps 0", "'--steps'"),
    case("pretrain-eval-n-zero", "pretrain --eval-n 0", "'--eval-n'"),
    case("pretrain-unknown-preset", "pretrain --preset bogus --out {D}/p", "unknown preset 'bogus'"),
    case("pretrain-out-is-file", "pretrain --out {D}/afile", "'--out'"),
    # demo
    case("demo-eval-n-zero", "demo --eval-n 0", "'--eval-n'"),
    case("demo-eval-n-huge", "demo --eval-n 1000000000", "'--eval-n'"),
    case("demo-unknown-preset", "demo --preset bogus --out {D}/dm", "unknown preset 'bogus'"),
    case("demo-out-is-file", "demo --out {D}/afile", "'--out'"),
    case("demo-seeds-not-ints", "demo --seeds 0,x --out {D}/dm", "--seeds '0,x': give integers"),
    case("demo-seeds-twice", "demo --seeds 1,1 --out {D}/dm", "give each seed once"),
    case("demo-workers-zero", "demo --workers 0", "'--workers'"),
    # the app itself
    case("unknown-command", "evaluate", "No such command 'evaluate'"),
    case("unknown-global-option", "--verbose", "No such option: --verbose"),
]

COMMANDS = {"eval", "train", "diff", "routes", "conflict", "damage", "rollback", "circuits", "cpift", "merge",
            "report", "rescore", "pretrain", "demo"}

TRAIN = "model: default\nstages:\n  - {domain: math, steps: 1}\n"


def rows(*objs: dict) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


FILES: dict[str, str] = {
    "afile": "not a directory\n",
    "bad.jsonl": '{"prompt": "a", "answer": "1"}\n{"prompt": \n',
    "noeval.jsonl": rows({"prompt": "a", "answer": "1", "split": "train"},
                         {"prompt": "b", "answer": "2", "split": "train"}),
    "oneeval.jsonl": rows({"prompt": "a", "answer": "1", "split": "eval"},
                          {"prompt": "b", "answer": "2", "split": "train"}),
    "deep.jsonl": '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}\n',
    "long.jsonl": rows({"prompt": "x" * 10_000_000, "answer": "1", "split": "eval"},
                       {"prompt": "b", "answer": "2", "split": "train"}),
    "records.jsonl": rows({"domain": "math", "prompt": "M:1+1=", "completion": "2", "answer": "2", "score": 1.0}),
    "norecords.jsonl": rows({"domain": "math", "prompt": "M:1+1=", "answer": "2"}),
    "badyaml.yaml": "model: default\nstages: [\n",
    "list.yaml": "- model\n- default\n",
    "stage_lr.yaml": "model: default\nstages:\n  - {domain: math, steps: 1, lr: 3}\n",
    "steps0.yaml": "model: default\nstages:\n  - {domain: math, steps: 0}\n",
    "nostages.yaml": "model: default\nstages: []\n",
    "evaln_text.yaml": TRAIN + "eval_n: 1e9\n",
    "evaln_huge.yaml": TRAIN + "eval_n: 1000000000\n",
    "lr_fast.yaml": TRAIN + "grpo: {learning_rate: fast}\n",
    "lr_text.yaml": "model: default\nstages:\n  - {domain: math, steps: 1, grpo: {learning_rate: 1e-5}}\n",
    "mcl0.yaml": TRAIN + "grpo: {max_completion_length: 0}\n",
    "temp0.yaml": TRAIN + "grpo: {temperature: 0}\n",
    "grpo_typo.yaml": TRAIN + "grpo: {learnin_rate: 0.1}\n",
    "deep.yaml": "model: default\nstages: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "cp_tasks1.yaml": "model: default\ntasks: [math]\n",
    "cp_evaln0.yaml": "model: default\ntasks: [math, qa]\neval_n: 0\n",
    "cp_sft_len.yaml": "model: default\ntasks: [math, qa]\nsft: {max_length: 0}\n",
    "emptyrun/.keep": "",
    "rep_missing/run.yaml": "kind: eval\n",
    "rep_missing/results/eval.json": '{"model": "x"}\n',
    "rep_badjson/run.yaml": "kind: eval\n",
    "rep_badjson/results/eval.json": "{bad\n",
}


# ----------------------------------------------------------------------------- the forking helper process

PRELOAD = ("crossroute.cli.main", "crossroute.measure.evaluate", "crossroute.experiments.sequence",
           "crossroute.experiments.demo", "crossroute.repair.cpift", "crossroute.repair.merge",
           "crossroute.repair.rollback", "crossroute.report.build", "crossroute.analyze.diff",
           "crossroute.analyze.routes", "crossroute.analyze.conflict", "crossroute.analyze.damage",
           "crossroute.analyze.circuits", "crossroute.train.pretrain", "trl")


def _child(args: list[str], err: Path) -> NoReturn:
    """Run `crossroute ARGS` in this forked process with stderr to `err`; never returns."""
    code = 1
    try:
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        from crossroute.cli.main import main

        sys.argv = ["crossroute", *args]
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(running: dict[int, tuple[int, float]], results: list[dict | None], errs: Path) -> None:
    """Wait for one child (killing one past CASE_TIMEOUT_S) and record its exit status and stderr."""
    while True:
        for pid, (i, started) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - started > CASE_TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            if done:
                del running[pid]
                results[i] = {"rc": os.waitstatus_to_exitcode(status),
                              "stderr": (errs / f"{i}.txt").read_text(errors="replace"),
                              "seconds": round(time.monotonic() - started, 2)}
                return
        time.sleep(0.02)


def serve(cases_file: str, results_file: str) -> None:
    """Import the heavy modules once, then fork one child per case (WORKERS at a time); write the results."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    cases: list[list[str]] = json.loads(Path(cases_file).read_text())
    errs = Path(results_file).parent / "stderr"
    errs.mkdir(exist_ok=True)
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, tuple[int, float]] = {}
    for i, args in enumerate(cases):
        while len(running) >= WORKERS:
            _reap(running, results, errs)
        pid = os.fork()
        if pid == 0:
            _child(args, errs / f"{i}.txt")
        running[pid] = (i, time.monotonic())
    while running:
        _reap(running, results, errs)
    Path(results_file).write_text(json.dumps(results))


# ----------------------------------------------------------------------------- fixtures and checks

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs")
    for name, text in FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def expand(args: tuple[str, ...], data: Path, tiny: Path) -> list[str]:
    return [a.replace("{D}", str(data)).replace("{T}", str(tiny)) for a in args]


@pytest.fixture(scope="module")
def matrix(data: Path, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case's {rc, stderr, seconds}, run by the forking helper (this file as a script)."""
    import shutil

    shutil.copytree(tiny_ckpt, data / "other", dirs_exist_ok=True)  # a second checkpoint path for --after / --from
    work = tmp_path_factory.mktemp("matrix")
    cases = work / "cases.json"
    cases.write_text(json.dumps([expand(c.args, data, tiny_ckpt) for c in CASES]))
    p = subprocess.run([sys.executable, __file__, str(cases), str(work / "results.json")], cwd=data, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if os.environ.get("CROSSROUTE_SHOW_MATRIX"):
        for c, r in zip(CASES, json.loads((work / "results.json").read_text()), strict=True):
            print(f"{c.id} rc={r['rc']} {r['seconds']}s: {r['stderr'].strip()[-400:]}")
    return dict(zip([c.id for c in CASES], json.loads((work / "results.json").read_text()), strict=True))


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def assert_one_line_error(rc: int, stderr: str, needle: str) -> None:
    """Exit 2, no traceback, exactly one stderr line, `crossroute: error: ` first and `needle` in it."""
    lines = error_lines(stderr)
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("crossroute: error: "), lines[0]
    assert needle in lines[0], lines[0]


def test_matrix_covers_every_command() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert COMMANDS <= {c.args[0] for c in CASES}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(c: Case, matrix: dict[str, dict]) -> None:
    res = matrix[c.id]
    assert res["seconds"] < CASE_TIMEOUT_S, f"{c.id} ran {res['seconds']} s instead of refusing"
    assert_one_line_error(res["rc"], res["stderr"], c.needle)


def test_bad_input_leaves_no_run_directory(matrix: dict[str, dict], data: Path) -> None:
    assert not (data / "r").exists()  # every refusal came before a run directory was created


# ----------------------------------------------------------------------------- real processes

def run_cli(*args: str, module: str = "crossroute.cli", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=300)


def test_entry_points_keep_the_contract(tmp_path: Path) -> None:
    calls = [(("eval", "--nn", "3"), "crossroute.cli", "No such option: --nn"),
             (("eval", "--n", "0"), "crossroute", "'--n'"),
             (("damage", "--before", "default", "--after", "default", "--domain", "math"), "crossroute.cli",
              "same checkpoint")]
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda c: run_cli(*c[0], module=c[1], cwd=tmp_path), calls))
    for (_, _, needle), p in zip(calls, done, strict=True):
        assert_one_line_error(p.returncode, p.stderr, needle)
    p = run_cli(cwd=tmp_path)  # no arguments: the help, exit 0
    assert p.returncode == 0 and "Usage" in p.stdout and p.stderr == "", p.stderr


def _interrupted_eval(tiny: Path, out: Path, sig: signal.Signals) -> subprocess.Popen[str]:
    """A long eval (64 samples per prompt) on the tiny model, sent `sig` once its run directory exists."""
    p = subprocess.Popen([sys.executable, "-m", "crossroute.cli", "eval", "--model", str(tiny), "--domains", "math",
                          "--n", "200", "--k", "64", "--temperature", "1", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=out.parent)
    deadline = time.monotonic() + 240
    while not (out / "run.yaml").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "eval ended before it could be interrupted"
    time.sleep(0.3)
    p.send_signal(sig)
    return p


def _signals(tiny: Path, root: Path) -> Iterator[tuple[signal.Signals, subprocess.Popen[str]]]:
    for sig in (signal.SIGINT, signal.SIGTERM):
        yield sig, _interrupted_eval(tiny, root / sig.name, sig)


def test_ctrl_c_and_sigterm_exit_130_with_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    procs = list(_signals(tiny_ckpt, tmp_path))
    for sig, p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130, (sig.name, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        ours = [ln for ln in error_lines(err) if ln.startswith("crossroute:")]
        assert ours == [INTERRUPTED], err[-3000:]
        assert error_lines(err)[-1] == INTERRUPTED
        assert (tmp_path / sig.name / "run.yaml").exists()  # what finished is kept


def test_success_exits_0_and_a_short_domain_is_evaluated_whole(tiny_ckpt: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = run_cli("eval", "--model", str(tiny_ckpt), "--domains", f"math,{data / 'oneeval.jsonl'}", "--n", "4",
                "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "error" not in p.stderr and "Traceback" not in p.stderr
    assert "crossroute: warning: domain oneeval: only 1 eval prompt (--n 4); evaluating all 1." in p.stderr
    res = json.loads((out / "results" / "eval.json").read_text())
    assert res["n"] == {"math": 4, "oneeval": 1}


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
