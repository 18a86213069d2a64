"""The sandbox for model-generated code and the JSONL code domain (fast: a few seconds in all)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains.code import code_reward, extract_code, score_code
from crossroute.domains.files import load_jsonl_domain as load_code_domain
from crossroute.domains.sandbox import SandboxLimits, run_sandboxed, sandbox_info

SOLUTION = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\nassert double(-3) == -6\n"


def _strays() -> list[str]:
    """Live processes still running a sandbox runner (their command line names its temp dir)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"crossroute-sbx-" in cmd and state != "Z":
            found.append(f"{d}: {cmd[:120]!r}")
    return found


def _assert_no_strays() -> None:
    deadline = time.monotonic() + 3
    while _strays() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _strays() == []


def test_correct_solution_passes() -> None:
    res = run_sandboxed(SOLUTION, TESTS)
    assert (res.passed, res.reason, res.returncode) == (True, "ok", 0)
    assert score_code(f"Here you go:\n```python\n{SOLUTION}```\nDone.", TESTS) == (1.0, "ok")


def test_wrong_solution_gets_zero_with_assertion() -> None:
    assert score_code("def double(x):\n    return 3 * x", TESTS) == (0.0, "assertion")
    res = run_sandboxed("def double(x):\n    return 3 * x", TESTS)
    assert "AssertionError" in res.stderr


def test_syntax_error() -> None:
    assert score_code("def double(x) return 2 * x", TESTS) == (0.0, "syntax_error")


def test_exiting_early_is_not_a_pass() -> None:
    assert score_code("import os\nos._exit(0)", "assert False") == (0.0, "crash")
    assert score_code("raise SystemExit(0)", "assert False") == (0.0, "crash")


HOSTILE = {
    "read_outside": ("print(open('/etc/passwd').read())", "escape_attempt"),
    "read_tests_file": ("print(open('../tests.py').read())", "escape_attempt"),
    "list_outside": ("import os\nprint(os.listdir('/'))", "escape_attempt"),
    "write_outside": ("open('/tmp/crossroute-escaped.txt', 'w').write('x')", "escape_attempt"),
    "connect": ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "escape_attempt"),
    "socket": ("import socket\ns = socket.socket()", "escape_attempt"),
    "unix_connect": ("import socket\nsocket.socket(socket.AF_UNIX).connect('/run/x.sock')",
                     "escape_attempt"),
    "fork_bomb": ("import os\nwhile True: os.fork()", "escape_attempt"),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])", "escape_attempt"),
    "ctypes": ("import ctypes\nctypes.CDLL(None)", "escape_attempt"),
    "raise_rlimit": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                     "escape_attempt"),
    "allocate_10gb": ("x = bytearray(10 * 1024**3)", "memory"),
    "write_100mb": ("open('big.bin', 'wb').write(b'0' * 100 * 1024**2)", "output_limit"),
    "print_10mb": ("print('x' * 10 * 1024**2)", "output_limit"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_stopped(name: str) -> None:
    code, reason = HOSTILE[name]
    res = run_sandboxed(code, "pass")
    assert (res.passed, res.reason) == (False, reason), res
    assert res.wall_seconds < 3
    assert len(res.stdout.encode()) <= SandboxLimits().output_bytes
    assert score_code(code, "pass") == (0.0, reason)
    assert not Path("/tmp/crossroute-escaped.txt").exists()
    _assert_no_strays()


def test_socket_refused_without_network_namespace() -> None:
    res = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9))", "pass",
                        SandboxLimits(namespaces=False))
    assert (res.passed, res.reason) == (False, "escape_attempt")


@pytest.mark.parametrize("name", ["read_outside", "fork_bomb", "allocate_10gb", "print_10mb"])
def test_guards_hold_without_namespaces(name: str) -> None:
    code, reason = HOSTILE[name]
    res = run_sandboxed(code, "pass", SandboxLimits(namespaces=False))
    assert (res.passed, res.reason) == (False, reason)
    _assert_no_strays()


def test_missing_tests_is_an_error_not_a_pass() -> None:
    with pytest.raises(CrossrouteError, match="no tests"):
        code_reward(["p"], [SOLUTION], tests=[""])


def test_refused_escape_is_zero_even_if_caught() -> None:
    code = "try:\n    open('/etc/passwd').read()\nexcept OSError:\n    pass\n" + SOLUTION
    assert score_code(code, TESTS) == (0.0, "escape_attempt")


def test_infinite_loop_stopped_by_cpu_limit() -> None:
    res = run_sandboxed("while True: pass", "pass", SandboxLimits(cpu_seconds=1, wall_seconds=4))
    assert (res.passed, res.reason) == (False, "cpu_limit")
    assert res.wall_seconds < 3.5


def test_infinite_loop_stopped_by_wall_clock() -> None:
    res = run_sandboxed("while True: pass", "pass", SandboxLimits(cpu_seconds=30, wall_seconds=1))
    assert (res.passed, res.reason) == (False, "timeout")
    assert res.wall_seconds < 2.5
    _assert_no_strays()


def test_sleeping_forever_stopped_by_wall_clock() -> None:
    res = run_sandboxed("import time\ntime.sleep(60)", "pass", SandboxLimits(wall_seconds=0.5))
    assert (res.passed, res.reason) == (False, "timeout")


def test_children_that_leave_the_process_group_are_killed() -> None:
    # A bounded fan-out (8 processes), forks allowed by the hook: each child starts its own session
    # to dodge the process-group kill; the PID namespace or pids cgroup must still reap them.
    code = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\ntime.sleep(60)"
    info = sandbox_info()
    if not (info["namespaces"] or info["pids_cgroup"]):
        pytest.skip("no PID namespace or pids cgroup here: setsid() escapes the process group")
    res = run_sandboxed(code, "pass", SandboxLimits(allow_subprocesses=True, wall_seconds=1))
    assert (res.passed, res.reason) == (False, "timeout")
    _assert_no_strays()


def test_unguarded_fork_bomb_is_contained() -> None:
    info = sandbox_info()
    if not (info["pids_cgroup"] or info["nproc_rlimit_enforced"]):
        pytest.skip("process count not bounded here (root without a pids cgroup); guard-only")
    res = run_sandboxed("import os\nwhile True: os.fork()", "pass",
                        SandboxLimits(allow_subprocesses=True, wall_seconds=2))
    assert not res.passed and res.reason in {"crash", "timeout", "cpu_limit"}
    _assert_no_strays()


def test_ordinary_stdlib_use_is_not_an_escape() -> None:
    code = ("import asyncio, tempfile, threading, logging, uuid, datetime\n"
            "async def main():\n    return 42\n"
            "with tempfile.TemporaryDirectory() as d:\n    open(d + '/x', 'w').write('1')\n"
            "logging.getLogger().warning('hi')\nANSWER = asyncio.run(main())\n")
    res = run_sandboxed(code, "assert ANSWER == 42")
    assert (res.passed, res.reason) == (True, "ok"), res


def test_temp_dir_is_removed() -> None:
    res = run_sandboxed("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('hi')", "pass")
    assert res.passed
    work = Path(res.stdout.strip())
    assert "crossroute-sbx-" in str(work)
    assert not work.exists() and not work.parent.exists()


def test_environment_is_minimal() -> None:
    os.environ["CROSSROUTE_SECRET_TEST"] = "leak"
    try:
        res = run_sandboxed("import os\nprint(sorted(os.environ))", "pass")
    finally:
        del os.environ["CROSSROUTE_SECRET_TEST"]
    assert res.passed
    assert set(eval(res.stdout)) <= {"PATH", "LANG", "LC_CTYPE", "TMPDIR"}


def test_code_reward_trl_shape_and_reasons() -> None:
    completions = [
        f"```python\n{SOLUTION}```",
        [{"role": "assistant", "content": f"```py\n{SOLUTION}\n```"}],
        "def double(x): return x",
        "import socket; socket.socket()",
    ]
    reasons: list[str] = []
    out = code_reward(["p"] * 4, completions, tests=[TESTS] * 4, reasons=reasons, answer=[""] * 4)
    assert out == [1.0, 1.0, 0.0, 0.0]
    assert reasons == ["ok", "ok", "assertion", "escape_attempt"]


# ----------------------------------------------------------------------------- code domain

def _write(tmp_path: Path, rows: list[object]) -> Path:
    p = tmp_path / "code.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_code_domain_loads_and_scores(tmp_path: Path) -> None:
    rows = [{"prompt": f"Write double (v{i}).", "tests": TESTS, "answer": SOLUTION,
             "split": "train" if i % 2 else "eval"} for i in range(4)]
    dom = load_code_domain(_write(tmp_path, rows), name="mycode")
    assert dom.kind == "code" and dom.name == "mycode"
    train, evals = dom.examples("train"), dom.examples("eval")
    assert len(train) == 2 and len(evals) == 2
    ex = train[0]
    assert ex.tests == TESTS and ex.rubric is None
    assert dom.score(ex, ex.answer) == 1.0
    assert dom.score(ex, "def double(x): return 0") == 0.0
    row = ex.row()  # what TRL sees: the tests travel as their own column
    f = dom.reward_func()
    assert f.__name__ == "reward_mycode"
    assert f([row["prompt"]] * 2, [ex.answer, "oops("], answer=[row["answer"]] * 2,
             tests=[row["tests"]] * 2) == [1.0, 0.0]


@pytest.mark.parametrize("bad, where", [
    ({"prompt": "p2"}, ":2: field 'tests' must be a non-empty string"),
    ({"prompt": "p2", "tests": "  "}, ":2: field 'tests' must be a non-empty string"),
    ({"prompt": "p2", "tests": "assert (("}, ":2: field 'tests' is not valid Python"),
    ({"prompt": "", "tests": "pass"}, ":2: field 'prompt' must be a non-empty string"),
    ({"prompt": "p2", "tests": "pass", "split": "dev"}, ":2: field 'split' must be"),
    ({"prompt": "p2", "tests": "pass", "answer": 3}, ":2: field 'answer' must be a string"),
    ({"prompt": "p2", "tests": "pass", "rubric": {}}, ":2: unknown field 'rubric'"),
    ({"prompt": "p1", "tests": "pass"}, ":2: field 'prompt' repeats the prompt of line 1"),
    ('{"prompt": "p2", ', ":2: invalid JSON"),
])
def test_code_domain_validation_names_file_line_field(tmp_path: Path, bad: object, where: str) -> None:
    path = _write(tmp_path, [{"prompt": "p1", "tests": "pass"}, bad])
    with pytest.raises(CrossrouteError) as e:
        load_code_domain(path)
    assert f"{path}{where}" in str(e.value)


def test_code_domain_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="no such JSONL file"):
        load_code_domain(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CrossrouteError, match="empty"):
        load_code_domain(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- extraction

_code = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def _clean(code: str) -> str:
    assume("```" not in code and code == code.strip("\r\n"))
    return code


@given(_code)
def test_extract_plain_text_is_the_code(code: str) -> None:
    code = _clean(code)
    assert extract_code(code) == code
    assert extract_code(f"\n\n{code}\n") == code


@given(_code, st.sampled_from(["python", "py", "Python3", ""]), _code, _code)
def test_extract_fenced_block(code: str, tag: str, before: str, after: str) -> None:
    code, before, after = _clean(code), _clean(before), _clean(after)
    assert extract_code(f"{before}\n```{tag}\n{code}\n```\n{after}") == code
    assert extract_code(f"{before}\n```{tag}\n{code}") == code  # unclosed fence runs to the end


@given(_code, _code)
def test_extract_prefers_python_block(code: str, other: str) -> None:
    code, other = _clean(code), _clean(other)
    text = f"Output:\n```text\n{other}\n```\nSolution:\n```python\n{code}\n```\n"
    assert extract_code(text) == code
