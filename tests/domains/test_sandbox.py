"""The sandbox for model-generated code (verdict forms, isolation, codec) and the JSONL code domain."""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains import sandbox
from crossroute.domains.code import code_reward, extract_code, score_code
from crossroute.domains.files import load_jsonl_domain as load_code_domain
from crossroute.domains.sandbox import SandboxLimits, run_sandboxed, sandbox_info

SOLUTION = "def double(x):\n    return 2 * x\n"
TESTS = "assert double(2) == 4\nassert double(-3) == -6\n"


_MARKS = (b"crossroute-sbx-", b"/sbx/runner.py", b"/sbx/tester.py")


def _strays() -> list[str]:
    """Live processes of a sandbox run (the jail's command line names the temp dir, the child /sbx/)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(m in cmd for m in _MARKS) and state != "Z":
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
    assert (res.verdict, res.detail) == ("values", "failed: assert double(2) == 4")


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
    assert not Path("/tmp/crossroute-escaped.txt").exists()
    _assert_no_strays()


WEAK = SandboxLimits(namespaces=False, allow_unisolated=True)


@pytest.mark.filterwarnings("ignore:crossroute sandbox")
def test_socket_refused_without_network_namespace() -> None:
    res = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9))", "pass", WEAK)
    assert (res.passed, res.reason, res.isolation) == (False, "escape_attempt", "weak")


@pytest.mark.filterwarnings("ignore:crossroute sandbox")
@pytest.mark.parametrize("name", ["read_outside", "fork_bomb", "allocate_10gb", "print_10mb"])
def test_guards_hold_without_namespaces(name: str) -> None:
    code, reason = HOSTILE[name]
    res = run_sandboxed(code, "pass", WEAK)
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


def test_temp_dir_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    res = run_sandboxed("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('hi')", "pass")
    assert (res.passed, res.stdout.strip()) == (True, "/work")  # the jail's cwd, a tmpfs
    assert made and all("crossroute-sbx-" in d and not os.path.exists(d) for d in made)  # (+ a first probe)


def test_environment_is_minimal() -> None:
    os.environ["CROSSROUTE_SECRET_TEST"] = "leak"
    try:
        res = run_sandboxed("import os\nprint(sorted(os.environ))", "pass")
    finally:
        del os.environ["CROSSROUTE_SECRET_TEST"]
    assert res.passed
    assert set(eval(res.stdout)) <= {"PATH", "LANG", "LC_CTYPE", "TMPDIR", "PWD"}


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


# ----------------------------------------------------------------------------- the verdict

ADD_PROMPT = 'def add(x: int, y: int) -> int:\n    """Add two numbers."""\n'
ADD_TESTS = ("def check(candidate):\n    assert candidate(2, 3) == 5\n"
             "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n")
LOOP_TESTS = "def check(candidate):\n    for i in range(4):\n        assert candidate(i) == 2 * i\ncheck(double)\n"


def test_humaneval_rows_are_checked_in_the_trainer() -> None:
    assert score_code("    return x + y\n", ADD_TESTS, prompt=ADD_PROMPT, entry_point="add") == (1.0, "ok")
    assert score_code("    return x - y\n", ADD_TESTS, prompt=ADD_PROMPT, entry_point="add") == (0.0, "assertion")
    res = run_sandboxed(ADD_PROMPT + "    return x + y\n", ADD_TESTS + "check(add)\n")
    assert (res.passed, res.verdict) == (True, "values")


def test_tests_with_statements_run_in_a_separate_tester() -> None:
    ok = run_sandboxed(SOLUTION, LOOP_TESTS)
    bad = run_sandboxed("def double(x):\n    return x + x * (x > 2)\n", LOOP_TESTS)
    assert (ok.passed, ok.reason, ok.verdict) == (True, "ok", "tester")
    assert (bad.passed, bad.reason, bad.verdict) == (False, "assertion", "tester")


def test_the_tester_gets_the_solution_exceptions() -> None:
    code = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n"
    tests = ("try:\n    root(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
             "    assert 'negative' in str(e)\nassert root(4) == 2.0\n")
    assert run_sandboxed(code, tests).verdict == "tester"
    assert score_code(code, tests) == (1.0, "ok")
    assert score_code("def root(x):\n    return 2.0\n", tests) == (0.0, "assertion")


def test_an_exception_in_a_checked_call_is_a_crash() -> None:
    res = run_sandboxed("def double(x):\n    raise KeyError(x)\n", TESTS)
    assert (res.passed, res.reason, res.verdict) == (False, "crash", "values")
    assert "double() raised KeyError" in res.detail


NOT_PLAIN = ("class Liar:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
             "class Text(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n")


@pytest.mark.parametrize("tests", [TESTS, LOOP_TESTS], ids=["values", "tester"])
@pytest.mark.parametrize("value", ["Liar()", "[1, Text('x')]", "iter([2])"])
def test_returned_values_must_be_plain_data(tests: str, value: str) -> None:
    res = run_sandboxed(NOT_PLAIN + f"def double(x):\n    return {value}\n", tests)
    assert (res.passed, res.reason) == (False, "not_plain_data"), res


def test_huge_arithmetic_on_returned_values_is_refused_quickly() -> None:
    res = run_sandboxed("def big():\n    return 10 ** 7\n", "assert 2 ** big() > 0")
    assert (res.passed, res.reason, res.verdict) == (False, "crash", "values")
    assert "too large" in res.detail and res.wall_seconds < 3


@pytest.mark.parametrize("tests, checked_here", [
    ("assert f(1) == 2", True),
    ("assert set(f((3, 4))) == set((4,))", True),
    ("import math\nassert math.isclose(f(0.1), 0.2, rel_tol=1e-9)", True),
    ("from math import isclose\nassert isclose(f(0.1), 0.2)", True),
    ("assert f(None) is None and not f(0)", True),
    ("M = {'k': [1, 2]}\nassert f(M['k'])[0] == -1", True),
    ("assert sorted(f([3, 1]), reverse=True) == [3, 1]", True),
    ("assert ANSWER == 42", True),
    ("def check(candidate):\n    assert candidate(1) == 2\ncheck(f)", True),
    ("for i in range(3):\n    assert f(i) == i", False),
    ("assert f(g(1)) == 2", False),  # a solution value as an argument: the tester form
    ("assert all(f(i) for i in [1, 2])", False),
    ("assert sum(f(1), []) == [1]", False),
    ("assert f(1) is 1", False),
    ("assert pow(f(1), 2) == 4", False),
    ("assert f(1).strip() == 'a'", False),
    ("x = f(1)\nassert x == 1", False),
    ("import re\nassert re.match('a', f(1))", False),
])
def test_which_tests_the_trainer_checks_itself(tests: str, checked_here: bool) -> None:
    assert (sandbox._plan_values(ast.parse(tests)) is not None) == checked_here


_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary()
            | st.complex_numbers(allow_nan=False))
_plain = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=3) | st.tuples(kids, kids)
                      | st.frozensets(st.integers() | st.text(), max_size=3) | st.sets(st.integers(), max_size=3)
                      | st.dictionaries(st.integers() | st.text(), kids, max_size=3), max_leaves=12)


def _shape(v: object) -> object:
    """`v` with every type made explicit (== alone would equate 1, 1.0, True and lists with tuples)."""
    if isinstance(v, (list, tuple)):
        return type(v).__name__, [_shape(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return type(v).__name__, sorted(repr(_shape(x)) for x in v)
    if isinstance(v, dict):
        return "dict", sorted((repr(_shape(k)), repr(_shape(x))) for k, x in v.items())
    return type(v).__name__, repr(v)


@given(_plain)
def test_plain_data_crosses_the_boundary_exactly(value: object) -> None:
    back = sandbox._from_plain(sandbox._loads(sandbox._dumps(sandbox._to_plain(value)), 1 << 20))
    assert _shape(back) == _shape(value)


@pytest.mark.parametrize("bad", [[1, 2], {"l": 1}, {"x": []}, {"l": [], "t": []}, {"d": [[{"l": [1]}, 2]]},
                                 {"d": [[1]]}, {"c": ["1", 2]}, {"b": "zz"}, {"s": [{"l": []}]}, "nest"])
def test_only_encoded_plain_data_is_decoded(bad: object) -> None:
    if bad == "nest":
        bad = 7
        for _ in range(150):
            bad = {"l": [bad]}
    with pytest.raises(sandbox._NotPlain):
        sandbox._from_plain(bad)


def test_subclasses_and_objects_are_not_plain() -> None:
    class Text(str):
        pass

    for v in (Text("x"), object(), [1, {2: Text("y")}], (1, range(3)), {1: [{2: lambda: 0}]}):
        with pytest.raises(sandbox._NotPlain):
            sandbox._to_plain(v)


# ----------------------------------------------------------------------------- isolation

def test_a_kernel_jail_is_the_default_here() -> None:
    info = sandbox_info()
    assert info["isolation"] in ("bwrap", "unshare"), info
    assert run_sandboxed(SOLUTION, TESTS).isolation == info["isolation"]


@pytest.mark.parametrize("backend", ["bwrap", "unshare"])
def test_both_forms_on_each_backend(backend: str) -> None:
    if isinstance(sandbox._backend(backend), str):
        pytest.skip(f"{backend} does not work here: {sandbox._backend(backend)}")
    limits = SandboxLimits(isolation=backend)
    for tests in (TESTS, LOOP_TESTS):
        assert run_sandboxed(SOLUTION, tests, limits).reason == "ok"
        assert run_sandboxed("def double(x):\n    return 3 * x\n", tests, limits).reason == "assertion"
    assert run_sandboxed("open('/etc/passwd')", "pass", limits).reason == "escape_attempt"


@pytest.mark.parametrize("backend, flaw", [("bwrap", "network"), ("unshare", "network"), ("unshare", "root")])
def test_an_unsound_jail_is_rejected(backend: str, flaw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    found = sandbox._backend(backend)
    if isinstance(found, str):
        pytest.skip(f"{backend} does not work here: {found}")
    if flaw == "network" and backend == "bwrap":
        argv = sandbox._bwrap_argv
        monkeypatch.setattr(sandbox, "_bwrap_argv", lambda *a: [x for x in argv(*a) if x != "--unshare-net"])
    elif flaw == "network":
        command = sandbox._Run._command

        def without_netns(*a: object) -> tuple[list[str], str]:
            cmd, cwd = command(*a)  # type: ignore[arg-type]
            return [x for x in cmd if x != "--net"], cwd

        monkeypatch.setattr(sandbox._Run, "_command", without_netns)
    else:  # the child owns its root (a user namespace as the trainer's own uid): only the ro remount protects it
        monkeypatch.setattr(sandbox, "_run_ids", lambda kind: None)
        setup = sandbox._JAIL_SETUP.replace("mount(None, new, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)", "")
        assert setup != sandbox._JAIL_SETUP
        monkeypatch.setattr(sandbox, "_JAIL_SETUP", setup)
    problem = sandbox._probe(found)
    expected = "a network interface besides lo" if flaw == "network" else "can write ['/x', '/work/x']"
    assert isinstance(problem, str) and expected in problem, problem


def test_no_kernel_isolation_means_no_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_backend", lambda kind: f"{kind} broken for the test")
    monkeypatch.setattr(sandbox, "_warned", set())
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="refuses to run code"):
        res = run_sandboxed("open('/tmp/crossroute-escaped.txt', 'w').write('x')\n" + SOLUTION, TESTS)
    assert (res.passed, res.reason) == (False, "no_isolation")
    assert "bwrap broken" in res.detail and sandbox.ALLOW_UNISOLATED_ENV in res.detail
    assert not Path("/tmp/crossroute-escaped.txt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per completion
        assert score_code(SOLUTION, TESTS) == (0.0, "no_isolation")


@pytest.mark.parametrize("opt_in", ["env", "limits"])
def test_the_weak_mode_needs_an_explicit_opt_in(monkeypatch: pytest.MonkeyPatch, opt_in: str) -> None:
    monkeypatch.setattr(sandbox, "_backend", lambda kind: "broken")
    monkeypatch.setattr(sandbox, "_warned", set())
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED_ENV, raising=False)
    limits = SandboxLimits(allow_unisolated=opt_in == "limits")
    if opt_in == "env":
        monkeypatch.setenv(sandbox.ALLOW_UNISOLATED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT kernel isolation"):
        res = run_sandboxed(SOLUTION, TESTS, limits)
    assert (res.passed, res.isolation, res.verdict) == (True, "weak", "values")


def test_unknown_isolation_is_a_usage_error() -> None:
    with pytest.raises(CrossrouteError, match="isolation must be one of"):
        run_sandboxed(SOLUTION, TESTS, SandboxLimits(isolation="docker"))


def test_symlink_chain_records_every_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "lib.so").write_text("x")
    os.symlink("real", tmp_path / "dir")
    os.symlink(tmp_path / "dir" / "lib.so", tmp_path / "link")
    assert sandbox._symlink_chain(str(tmp_path / "link")) == [
        (str(tmp_path / "link"), str(tmp_path / "dir" / "lib.so")), (str(tmp_path / "dir"), "real")]


def test_elf_interpreter_is_read_from_the_binary() -> None:
    loader = sandbox._elf_interpreter(os.path.realpath(sys.executable))
    assert loader is not None and os.path.exists(loader) and os.path.basename(loader).startswith("ld")
    assert sandbox._elf_interpreter(__file__) is None


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
