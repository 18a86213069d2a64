"""A sandbox for model-generated Python whose verdict is decided outside it.

`run_sandboxed(code, tests)` runs `code` (the model's program) in a throwaway, kernel-isolated child
interpreter and judges it by `tests` without ever letting the program see or touch the verdict.

**The verdict.** The child holding the model's code ("the solution") is treated as fully hostile: it
may run native code, rewrite its own interpreter, write anything to any file descriptor it holds. So
nothing it *says* about the tests is believed; it can only answer questions of the form "call your
function `f` with these plain arguments" or "what is your global `X`", and every answer is decoded as
plain data (exact `int float complex str bytes bool None list tuple dict set frozenset`, JSON-tagged,
never pickle; anything else, e.g. an object with a custom `__eq__`, is `not_plain_data`). Two forms:

* **values** (most MBPP/HumanEval rows): tests made only of `assert <expr>` statements (plus
  `import math`, `NAME = <constant expression>`, docstrings, `pass`, and a HumanEval-style
  `def check(candidate)` whose body is only such asserts, called as `check(fn)`), where each call of a
  solution function has arguments the trainer can compute itself. The trainer parses the tests with
  `ast`, sends the child only the list of calls (function name + argument values), and evaluates
  every assertion itself over the returned values. Expected values and comparisons never enter the
  sandbox.
* **tester** (anything else, e.g. loops or helpers in `check`): the tests run in a *second* sandbox of
  the same kind, holding only the standard library and the tests, where each free name the tests use
  that the solution defines becomes a proxy: a call sends plain arguments over a pipe and gets a plain
  value (or a builtin exception) back. The verdict is what that process writes on its own status pipe,
  which the solution's process cannot reach (separate user, PID, mount, IPC and network namespaces,
  and a separate uid when the trainer is root).

Either way the solution can only choose the return values of the calls made to it, which an honest
program could equally return, so the reward is what the tests conclude about those values.

**The boundary** is the kernel, not Python. Each child runs in a jail built by bubblewrap (`bwrap`)
when it works here, else by util-linux `unshare` plus a small trusted setup script (`mount(2)` via
ctypes, then chroot): fresh user/PID/mount/IPC/UTS/network namespaces, a read-only root holding only
the interpreter binary, the standard library (its `site-packages` hidden), the shared-library
directories the interpreter loads, `/etc/ld.so.cache`, a minimal `/dev`, its own `/proc` (with
`/proc/sys` read-only), the run's files read-only at `/sbx`, and a size-limited tmpfs at `/work` (the
cwd and `TMPDIR`) as the only writable place; no network at all. As root, each child drops to a
fresh unprivileged uid, so RLIMIT_NPROC applies and no host file is owned by it. Kept layers: rlimits
(CPU, address space, file size, open files, processes, no core), the wall-clock timeout, session and
process-group kill, a per-run pids cgroup (cgroup v1) when writable, output caps, and, in the
solution's process only, an audit hook refusing sockets, processes, ctypes, rlimit changes and file
access outside the sandbox (an extra tripwire: a refusal makes the reward 0 with `escape_attempt`).

Each backend is probed once per process by starting a jail and checking from inside (not root, only
`lo`, nothing writable but /work, nothing unexpected at /). Without any working kernel isolation the
sandbox refuses to run code (reason `no_isolation`, one warning) unless
`SandboxLimits(allow_unisolated=True)` or `CROSSROUTE_ALLOW_UNISOLATED_CODE=1` opts in to the weak mode
(the same verdict logic, but the processes share the trainer's filesystem and user, so a hostile
program can read files and interfere with the test process).

Not covered: kernel exploits (the jail shares the host kernel; no seccomp or Landlock filter is
installed), timing side channels, and tests that hand the solution anything but plain data (lambdas,
objects, in-place mutation of an argument): those fail with `not_plain_data` rather than run. The
tests' builtins are always the real ones, never names the solution redefines. With bwrap as root,
nested user namespaces stay possible inside the jail (its mounts are locked, so this widens the kernel
surface but reveals no file). Linux only.
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from crossroute.core.errors import CrossrouteError

MB = 1024 * 1024

REASONS = ("ok", "timeout", "cpu_limit", "memory", "crash", "assertion", "syntax_error",
           "escape_attempt", "output_limit", "not_plain_data", "no_isolation")

ALLOW_UNISOLATED_ENV = "CROSSROUTE_ALLOW_UNISOLATED_CODE"
ISOLATIONS = ("auto", "bwrap", "unshare")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits and isolation choices.

    `allow_subprocesses` lifts only the audit-hook guard on fork/exec (the jail still holds).
    `isolation`: "auto" (bwrap, else unshare), or force "bwrap" / "unshare". `namespaces=False` asks
    for no kernel isolation at all, which, like a machine without any, needs `allow_unisolated`.
    """

    wall_seconds: float = 5.0
    cpu_seconds: int = 4
    memory_bytes: int = 512 * MB
    file_size_bytes: int = 1 * MB
    open_files: int = 64
    processes: int = 16
    output_bytes: int = 64 * 1024  # cap on stdout and on stderr, each
    allow_subprocesses: bool = False
    namespaces: bool = True
    isolation: str = "auto"
    allow_unisolated: bool = False  # also enabled by CROSSROUTE_ALLOW_UNISOLATED_CODE=1
    disk_bytes: int = 16 * MB  # size of the writable /work tmpfs


@dataclass(frozen=True)
class SandboxResult:
    """What one run did; `reason` is in REASONS ('output_limit' also means the file-size limit).

    `verdict` says who judged: "values" (the trainer, over returned values), "tester" (the separate
    test process), or "" (no verdict: the run failed first). `isolation` is the backend used.
    """

    passed: bool
    reason: str
    returncode: int | None
    wall_seconds: float
    stdout: str
    stderr: str
    detail: str = ""  # e.g. the refused operation for 'escape_attempt', the failing assert
    verdict: str = ""
    isolation: str = ""


# ----------------------------------------------------------------------------- code shared with children

# Plain-data codec: used by the trainer (decoding only what this accepts) and by both children.
_CODEC = r'''
import json as _json
import os, sys

_MAX_DEPTH = 100
_SEQ = {list: "l", tuple: "t", set: "s", frozenset: "f"}
_UNSEQ = {"l": list, "t": tuple, "s": set, "f": frozenset}


class NotPlain(Exception):
    """A value that is not plain builtin data, or is too deep or too large to carry."""


def to_plain(v, depth=0):
    """`v` as JSON-ready data; exact builtin types only (subclasses are refused)."""
    if depth > _MAX_DEPTH:
        raise NotPlain("nested more than %d levels" % _MAX_DEPTH)
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t in _SEQ:
        return {_SEQ[t]: [to_plain(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[to_plain(k, depth + 1), to_plain(x, depth + 1)] for k, x in v.items()]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    raise NotPlain("a %s object" % getattr(t, "__name__", "?"))


def from_plain(x, depth=0):
    """The value `to_plain` encoded; anything else raises NotPlain."""
    if depth > _MAX_DEPTH:
        raise NotPlain("nested more than %d levels" % _MAX_DEPTH)
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is dict and len(x) == 1:
        tag, body = next(iter(x.items()))
        try:
            if tag in _UNSEQ and type(body) is list:
                return _UNSEQ[tag](from_plain(y, depth + 1) for y in body)
            if tag == "d" and type(body) is list:
                out = {}
                for pair in body:
                    if type(pair) is not list or len(pair) != 2:
                        raise NotPlain("a malformed dict")
                    out[from_plain(pair[0], depth + 1)] = from_plain(pair[1], depth + 1)
                return out
            if tag == "b" and type(body) is str:
                return bytes.fromhex(body)
            if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) in (int, float) for p in body):
                return complex(body[0], body[1])
        except (TypeError, ValueError, OverflowError) as e:
            raise NotPlain("an undecodable value (%s)" % type(e).__name__) from None
    raise NotPlain("not an encoded plain value")


def dumps(obj):
    """One ASCII JSON line."""
    try:
        return _json.dumps(obj, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError) as e:
        raise NotPlain(str(e)[:200]) from None


def loads(text, cap):
    """Parse one JSON message of at most `cap` characters."""
    if len(text) > cap:
        raise NotPlain("a message over %d bytes" % cap)
    try:
        return _json.loads(text)
    except (ValueError, RecursionError, MemoryError) as e:
        raise NotPlain("malformed JSON (%s)" % type(e).__name__) from None


def enter_jail(status_fd):
    """First thing in a child: drop to the run's uid when asked (bwrap as root), then refuse to go on
    if any privilege is left inside a kernel jail."""
    drop = os.environ.pop("CR_DROP_UID", "")
    isolated = os.environ.pop("CR_ISOLATED", "") == "1"
    if drop:
        uid = int(drop)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if not isolated:
        return
    cap = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    cap = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    if os.getuid() == 0 or cap:
        os.write(status_fd, b"error no_isolation the sandbox still has privileges\n")
        os._exit(3)
'''

_codec: dict[str, Any] = {}
exec(compile(_CODEC, "<sandbox codec>", "exec"), _codec)
_NotPlain: type[Exception] = _codec["NotPlain"]
_to_plain: Callable[[Any], Any] = _codec["to_plain"]
_from_plain: Callable[[Any], Any] = _codec["from_plain"]
_dumps: Callable[[Any], str] = _codec["dumps"]
_loads: Callable[[str, int], Any] = _codec["loads"]

_REPLY_CAP = 8 * MB  # the solution's answers, in all (values form) or per reply (tester form)

# The solution's process: loads the code under an audit hook, then answers calls (a batch from
# /sbx/calls.json, or requests from the tester on CR_REQ_FD) on CR_RESP_FD.
_RUNNER = _CODEC + r'''
import errno, signal, traceback


def _main():
    status = int(os.environ.pop("CR_STATUS_FD"))
    resp = int(os.environ.pop("CR_RESP_FD"))
    req = os.environ.pop("CR_REQ_FD", "")
    allow_sub = os.environ.pop("CR_ALLOW_SUB", "0") == "1"
    enter_jail(status)
    here = os.path.realpath(os.getcwd())
    runner = os.path.realpath(sys.argv[0])
    code_path = os.path.realpath(sys.argv[1])
    with open(code_path, encoding="utf-8", errors="surrogatepass") as f:
        code = f.read()
    calls = None
    if not req:
        with open(sys.argv[2], encoding="utf-8") as f:
            calls = loads(f.read(), 1 << 28)
    del sys.argv[1:]
    read_roots = tuple({os.path.realpath(p) for p in sys.path if p})
    read_files = {runner, code_path, "/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"}
    escaped = []

    def report(msg):
        try:
            os.write(status, (msg.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    def inside(p, roots):
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def resolve(p):
        if p is None:
            p = "."
        if isinstance(p, int):
            return None
        return os.path.realpath(os.fsdecode(p))

    def refuse(what):
        if not escaped:
            report("escape " + what[:300])
        escaped.append(what)
        raise PermissionError(errno.EACCES, "sandbox: refused " + what)

    def check_read(p, event):
        r = resolve(p)
        if r is not None and r not in read_files and not inside(r, (here,) + read_roots):
            refuse(event + " " + r)

    def check_write(p, event):
        r = resolve(p)
        if r is not None and r != "/dev/null" and not inside(r, (here,)):
            refuse(event + " " + r)

    AF_UNIX = 1
    W = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    mutate = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod",
              "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr",
              "os.removexattr", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move",
              "shutil.copyfile", "shutil.copytree", "shutil.chown"}
    listing = {"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"}
    procs = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
             "subprocess.", "pty.spawn", "os.startfile")
    always = ("socket.", "ctypes.", "os.kill", "os.killpg", "resource.setrlimit", "sqlite3.enable_load_extension",
              "sqlite3.load_extension", "resource.prlimit", "sys.remote_exec", "webbrowser.")
    n_writes = [0]

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & W)
            if writing:
                check_write(path, "write")
                n_writes[0] += 1
                if n_writes[0] > 256:
                    refuse("write (too many files opened for writing)")
            else:
                check_read(path, "read")
        elif event in listing:
            check_read(args[0] if args else None, event)
        elif event in mutate:
            for a in args:
                if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__"):
                    check_write(a, event)
        elif event == "sqlite3.connect":
            db = args[0] if args else None
            if isinstance(db, (str, bytes)) or hasattr(db, "__fspath__"):
                if os.fsdecode(db) not in (":memory:", ""):
                    check_write(db, event)
        elif event == "socket.__new__" and len(args) > 1 and args[1] == AF_UNIX:
            pass  # socketpair() (asyncio's self-pipe); connect/bind/send are still refused
        elif event.startswith(always) or (not allow_sub and event.startswith(procs)):
            refuse(event)

    sys.addaudithook(hook)
    if not allow_sub:
        import _posixsubprocess  # fork_exec itself raises no audit event

        def _no_fork_exec(*a, **k):
            refuse("_posixsubprocess.fork_exec")

        _posixsubprocess.fork_exec = _no_fork_exec

    def flush():
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass

    def send(text):
        data = (text + "\n").encode("ascii")
        while data:
            data = data[os.write(resp, data):]

    def show(e):
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass

    def fail(reason, e=None):
        if e is not None:
            show(e)
        if escaped:
            reason = "escape_attempt"
        report("error " + reason)
        try:
            send(dumps({"error": reason}))
        except Exception:
            pass
        flush()
        os._exit(0)

    def on_xcpu(signum, frame):
        report("error cpu_limit")
        os._exit(1)

    signal.signal(signal.SIGXCPU, on_xcpu)
    try:
        unit = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None)
        fail("syntax_error")
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(unit, g)
    except AssertionError as e:
        fail("assertion", e)
    except MemoryError:
        fail("memory")
    except OSError as e:
        fail("output_limit" if e.errno == errno.EFBIG else "crash", e)
    except BaseException as e:
        fail("crash", e)

    def answer(c):
        try:
            if "get" in c:
                if c["get"] not in g:
                    return dumps({"raised": "NameError", "msg": "name %r is not defined" % c["get"]})
                v = g[c["get"]]
            else:
                f = g.get(c["call"])
                if f is None:
                    return dumps({"raised": "NameError", "msg": "name %r is not defined" % c["call"]})
                args = [from_plain(a) for a in c["args"]]
                kwargs = {k: from_plain(a) for k, a in c["kwargs"].items()}
                v = f(*args, **kwargs)
        except MemoryError:
            return dumps({"raised": "MemoryError", "msg": ""})
        except BaseException as e:
            show(e)
            try:
                msg = str(e)[:300]
            except BaseException:
                msg = ""
            return dumps({"raised": type(e).__name__, "msg": msg})
        try:
            return dumps({"ok": to_plain(v)})
        except NotPlain as e:
            return dumps({"bad": "%s, not plain data" % e})
        except RecursionError:
            return dumps({"bad": "too deeply nested"})

    def describe(names):
        out = {}
        for n in names:
            if type(n) is not str or n not in g:
                continue
            v = g[n]
            if callable(v):
                out[n] = ["callable"]
                continue
            try:
                out[n] = ["value", to_plain(v)]
            except (NotPlain, RecursionError):
                out[n] = ["other", type(v).__name__]
        return dumps({"names": out})

    send(dumps({"loaded": True}))
    if calls is not None:
        for c in calls:
            send(answer(c))
        flush()
        os._exit(0)
    with os.fdopen(int(req), "rb") as rf:
        while True:
            line = rf.readline(1 << 28)
            if not line:
                break
            try:
                msg = loads(line.decode("ascii"), 1 << 28)
                reply = describe(msg["names"]) if "names" in msg else answer(msg)
                flush()  # the run may end right after the reply: keep what the code printed
                send(reply)
            except BrokenPipeError:
                break
            except Exception as e:
                send(dumps({"bad": "a malformed request (%s)" % type(e).__name__}))
    flush()
    os._exit(0)


_main()
'''

# The test process (trusted code only): runs the tests with the solution's names bound to proxies,
# and writes its verdict as one JSON line on CR_STATUS_FD, which only it holds.
_TESTER = _CODEC + r'''
import builtins, importlib, symtable, traceback


class Harness(BaseException):
    """A failure of the test harness itself (a BaseException, so `except Exception` in tests cannot hide it)."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def free_names(src):
    """Names the tests read but never bind, builtins excluded: the ones the solution may provide."""
    top = symtable.symtable(src, "<tests>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    found = set()

    def walk(t):
        for s in t.get_symbols():
            if t.get_type() == "module":
                if s.is_referenced() and not (s.is_assigned() or s.is_imported()):
                    found.add(s.get_name())
            elif s.is_global() and s.is_referenced():
                found.add(s.get_name())
        for c in t.get_children():
            walk(c)

    walk(top)
    return sorted(n for n in found - bound if not hasattr(builtins, n))


def _main():
    status = int(os.environ.pop("CR_STATUS_FD"))
    to_solution = int(os.environ.pop("CR_REQ_FD"))
    from_solution = int(os.environ.pop("CR_RESP_FD"))
    enter_jail(status)
    with open(sys.argv[1], encoding="utf-8", errors="surrogatepass") as f:
        tests = f.read()
    del sys.argv[1:]
    reader = os.fdopen(from_solution, "rb")
    cap = int(os.environ.pop("CR_REPLY_CAP"))
    failures = []

    def finish(reason, detail=""):
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os.write(status, (dumps({"result": reason, "detail": detail[-2000:]}) + "\n").encode("ascii"))
        os._exit(0)

    def mark(h):
        failures.append(h)
        return h

    def recv():
        line = reader.readline(cap + 1)
        if not line.endswith(b"\n"):
            if len(line) > cap:
                raise mark(Harness("output_limit", "a reply from the solution is over %d bytes" % cap))
            raise mark(Harness("lost", "the solution process ended"))
        try:
            msg = loads(line.decode("ascii"), cap)
        except (UnicodeDecodeError, NotPlain) as e:
            raise mark(Harness("crash", "a garbled reply from the solution (%s)" % e)) from None
        if type(msg) is not dict:
            raise mark(Harness("crash", "a garbled reply from the solution"))
        return msg

    def send(msg):
        data = (dumps(msg) + "\n").encode("ascii")
        try:
            while data:
                data = data[os.write(to_solution, data):]
        except OSError:
            raise mark(Harness("lost", "the solution process ended")) from None

    def unpack(msg, what):
        if "ok" in msg:
            try:
                return from_plain(msg["ok"])
            except (NotPlain, RecursionError) as e:
                raise mark(Harness("not_plain_data", "%s returned %s" % (what, e))) from None
        if "raised" in msg:
            name, text = str(msg["raised"])[:100], str(msg.get("msg", ""))[:300]
            cls = getattr(builtins, name, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                raise RuntimeError("%s raised %s: %s" % (what, name, text))
            try:
                exc = cls(text)
            except Exception:
                exc = RuntimeError("%s raised %s: %s" % (what, name, text))
            raise exc
        if "bad" in msg:
            raise mark(Harness("not_plain_data", "%s returned %s" % (what, str(msg["bad"])[:200])))
        raise mark(Harness("crash", "a garbled reply from the solution"))

    class Remote:
        """A function of the solution: plain arguments go out, a plain value comes back."""

        def __init__(self, name):
            self.__name__ = self.__qualname__ = name

        def __repr__(self):
            return "<solution function %s>" % self.__name__

        def __call__(self, *args, **kwargs):
            try:
                msg = {"call": self.__name__, "args": [to_plain(a) for a in args],
                       "kwargs": {k: to_plain(v) for k, v in kwargs.items()}}
            except (NotPlain, RecursionError) as e:
                raise mark(Harness("not_plain_data", "the tests pass %s to %s(); only plain data crosses into "
                                   "the sandbox" % (e, self.__name__))) from None
            send(msg)
            return unpack(recv(), self.__name__ + "()")

    class Opaque:
        """A solution global that is not plain data: any use fails the run."""

        def __init__(self, name, kind):
            self._why = "the tests use %s, a %s object of the solution; only plain data crosses the sandbox" % (
                name, kind)

        def _fail(self, *a, **k):
            raise mark(Harness("not_plain_data", self._why))

        __call__ = __getattr__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _fail
        __iter__ = __len__ = __bool__ = __hash__ = __getitem__ = __contains__ = _fail

    try:
        tree = compile(tests, "<tests>", "exec")
        free = free_names(tests)
    except (SyntaxError, ValueError) as e:
        finish("syntax_error", "the tests are not valid Python: %s" % e)
    g = {"__name__": "__main__", "__builtins__": builtins}
    try:
        first = recv()
        if "error" in first:
            finish(str(first["error"])[:40], "the solution failed before the tests ran")
        if first.get("loaded") is not True:
            raise mark(Harness("crash", "a garbled first reply from the solution"))
        send({"names": free})
        info = recv().get("names")
        if type(info) is not dict:
            raise mark(Harness("crash", "a garbled reply from the solution"))
        for name in free:
            kind = info.get(name)
            kind = kind if type(kind) is list and kind else ["missing"]
            if kind[0] == "callable":
                g[name] = Remote(name)
            elif kind[0] == "value" and len(kind) == 2:
                try:
                    g[name] = from_plain(kind[1])
                except (NotPlain, RecursionError):
                    g[name] = Opaque(name, "malformed")
            elif name in sys.stdlib_module_names:
                try:
                    g[name] = importlib.import_module(name)
                except ImportError:
                    pass
            elif kind[0] == "other":
                g[name] = Opaque(name, str(kind[1:2])[:60])
        exec(tree, g)
    except Harness as e:
        finish(e.reason, e.detail)
    except AssertionError as e:
        finish("assertion", "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next)))
    except MemoryError:
        finish("memory")
    except BaseException as e:
        finish("crash", "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next)))
    if failures:
        finish(failures[0].reason, failures[0].detail)
    finish("ok")


_main()
'''

# Checks a jail from inside: who it runs as, what it sees, what it can write, what it can import.
_PROBE = _CODEC + r'''
import socket


def _probe():
    enter_jail(int(os.environ.pop("CR_STATUS_FD")))

    def writable(p):
        try:
            with open(p, "a"):  # opening only: nothing is written
                pass
            return True
        except OSError:
            return False

    missing = []
    for m in filter(None, sys.argv[1].split(",")):
        try:
            __import__(m)
        except Exception:
            missing.append(m)
    print(dumps({"uid": os.getuid(), "ifaces": len(socket.if_nameindex()), "root": sorted(os.listdir("/")),
                 "writable": [p for p in ("/x", "/sbx/x", "/dev/x", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger",
                                          os.__file__, "/work/x") if writable(p)],
                 "missing": missing, "proc": os.path.isdir("/proc/self")}))


_probe()
'''

# The trusted setup of the `unshare` backend: runs as root of the new namespaces, builds the jail's
# root with mount(2), then drops every privilege and execs the child.
_JAIL_SETUP = r'''
import ctypes, json, os, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
ST_TO_MS = {1: 1, 2: 2, 4: 4, 8: 8, 16: 16, 1024: 1024, 2048: 2048, 4096: 1 << 21}
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
libc = ctypes.CDLL(None, use_errno=True)


def _b(s):
    return None if s is None else s.encode()


def mount(src, dst, fstype, flags, data=None):
    if libc.mount(_b(src), _b(dst), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s on %s: %s" % (src or fstype, dst, os.strerror(e)))


def kept(path):
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in ST_TO_MS.items() if f & st)


def bind(src, dst, flags, rec=False):
    if not os.path.lexists(dst):
        if os.path.isdir(src):
            os.makedirs(dst)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
    mount(src, dst, None, MS_BIND | (MS_REC if rec else 0))
    mount(None, dst, None, MS_BIND | MS_REMOUNT | kept(dst) | flags)


def own_userns():
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", "1000 %d 1" % uid), ("gid_map", "1000 %d 1" % gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)


def main():
    os.umask(0o022)
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    new = cfg["root"]
    ro = MS_RDONLY | MS_NOSUID | MS_NODEV
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for d in cfg["dirs"]:
        os.makedirs(new + d, exist_ok=True)
    for p in cfg["ro"]:
        bind(p, new + p, ro)
    for m in cfg["masks"]:
        mount("tmpfs", new + m, "tmpfs", ro | MS_NOEXEC, "mode=0755,size=4k")
    for link, target in cfg["symlinks"]:
        os.symlink(target, new + link)
    bind(cfg["sbx"], new + "/sbx", ro | MS_NOEXEC)
    os.mkdir(new + "/work")
    owner = ",uid=%d,gid=%d" % (cfg["uid"], cfg["gid"]) if cfg["uid"] is not None else ""
    mount("tmpfs", new + "/work", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "mode=0700,size=%d,nr_inodes=4096%s" % (cfg["disk"], owner))
    os.mkdir(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=4k")
    for n in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + n):
            bind("/dev/" + n, new + "/dev/" + n, MS_NOSUID | MS_NOEXEC)
    mount(None, new + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    os.mkdir(new + "/proc")
    try:
        mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # e.g. a masked /proc on the host: the jail then has no /proc at all
    else:
        for sub in ("sys", "sysrq-trigger", "irq", "bus"):
            if os.path.lexists(new + "/proc/" + sub):
                bind(new + "/proc/" + sub, new + "/proc/" + sub, ro | MS_NOEXEC, rec=True)
    mount(None, new, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    fds = [int(x) for x in os.listdir("/proc/self/fd")]
    if cfg["uid"] is None:
        own_userns()
    os.chroot(new)
    os.chdir("/work")
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    keep = set(cfg["keep"]) | {0, 1, 2}
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.execve(cfg["argv"][0], cfg["argv"], dict(os.environ))


main()
'''

# Runs outside any jail (trusted): which files the interpreter maps once it has loaded every
# extension module of its standard library.
_HOST_PROBE = r'''
import json, os, sys, sysconfig
skip = {"_tkinter", "readline", "_curses", "_curses_panel"}
mods = []
for d in sys.path:
    if os.path.basename(d) == "lib-dynload" and os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            name = f.split(".", 1)[0]
            if f.endswith(".so") and name not in skip and not name.startswith(("_test", "_xx", "xx", "_ctypes_test")):
                try:
                    __import__(name)
                    mods.append(name)
                except Exception:
                    pass
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].strip())
print(json.dumps({"path": [p for p in sys.path if p], "maps": sorted(maps), "modules": mods,
                  "site": sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}),
                  "prefix": sys.base_prefix}))
'''


# ----------------------------------------------------------------------------- the jail's layout

@dataclass(frozen=True)
class _Layout:
    """What a jail shows of the host, all read-only and at the same paths."""

    exe: str  # the interpreter binary
    ro: tuple[str, ...]  # files and directories bound read-only
    masks: tuple[str, ...]  # directories inside `ro` hidden behind an empty tmpfs (site-packages)
    symlinks: tuple[tuple[str, str], ...]  # (link, target) recreated inside
    dirs: tuple[str, ...]  # directories created to hold the above
    modules: tuple[str, ...]  # extension modules the interpreter imports on the host


def _base_python() -> str:
    """The real interpreter binary behind this (possibly virtual-env) Python."""
    exe = getattr(sys, "_base_executable", "") or sys.executable
    return os.path.realpath(exe)


def _elf_interpreter(path: str) -> str | None:
    """The program interpreter (dynamic loader) an ELF executable names, if any."""
    try:
        data = Path(path).read_bytes()[:1 << 20]
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or len(data) < 64:
        return None
    wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
    phoff = struct.unpack_from(order + ("Q" if wide else "I"), data, 0x20 if wide else 0x1C)[0]
    phsize, phnum = struct.unpack_from(order + "HH", data, 0x36 if wide else 0x2A)
    for i in range(phnum):
        at = phoff + i * phsize
        if at + phsize > len(data) or struct.unpack_from(order + "I", data, at)[0] != 3:  # PT_INTERP
            continue
        off, size = struct.unpack_from(order + "QxxxxxxxxxxxxxxxxQ", data, at + 8) if wide else \
            struct.unpack_from(order + "IxxxxxxxxI", data, at + 4)
        return data[off:off + size].rstrip(b"\0").decode(errors="replace") or None
    return None


def _symlink_chain(path: str) -> list[tuple[str, str]]:
    """Every symlink met while resolving `path`, as (link, target), so a jail can recreate the path."""
    links: list[tuple[str, str]] = []
    todo, cur = path.split("/"), "/"
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt) and len(links) < 40:
            target = os.readlink(nxt)
            links.append((nxt, target))
            cur = "/" if target.startswith("/") else cur
            todo = target.split("/") + todo
        else:
            cur = nxt
    return links


def _within(p: str, roots: set[str] | tuple[str, ...]) -> bool:
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def _ancestors(p: str) -> list[str]:
    out, cur = [], os.path.dirname(p)
    while cur not in ("/", ""):
        out.append(cur)
        cur = os.path.dirname(cur)
    return out[::-1]


@lru_cache(maxsize=1)
def _layout() -> _Layout | str:
    """The jail layout for this interpreter (from one trusted probe run), or why there is none."""
    exe = _base_python()
    try:
        out = subprocess.run([exe, "-I", "-S", "-c", _HOST_PROBE], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, env=_base_env(), cwd="/")
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return f"could not inspect the interpreter {exe}: {e}"
    prefix = os.path.realpath(info["prefix"])
    wanted = {exe} | {os.path.realpath(p) for p in info["path"] if os.path.exists(p)}
    for f in info["maps"]:
        real = os.path.realpath(f)
        if os.path.isfile(real):
            wanted.add(real if _within(real, (prefix,)) else os.path.dirname(real))
    if os.path.isfile("/etc/ld.so.cache"):
        wanted.add("/etc/ld.so.cache")
    ro: list[str] = []
    for p in sorted(wanted, key=len):
        if not _within(p, tuple(ro)):
            ro.append(p)
    masks = tuple(sorted(os.path.realpath(s) for s in info["site"]
                         if os.path.isdir(s) and _within(os.path.realpath(s), tuple(ro))))
    links = {e.path: os.readlink(e.path) for e in os.scandir("/") if e.is_symlink()}
    interp = _elf_interpreter(exe)
    links.update(_symlink_chain(interp) if interp else [])
    links = {k: v for k, v in links.items() if not _within(k, tuple(ro))}
    dirs = sorted({a for p in [*ro, *links] for a in _ancestors(p)} - set(links))
    return _Layout(exe, tuple(ro), masks, tuple(sorted(links.items())), tuple(dirs), tuple(info["modules"]))


def _bwrap_argv(tool: str, layout: _Layout, sbx: str, limits: SandboxLimits, privileged: bool) -> list[str]:
    """bubblewrap's command line for one jail (the child's own argv follows)."""
    a = [tool, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
         "--die-with-parent", "--new-session"]
    # As root bwrap runs privileged: all capabilities go but the two the child needs to drop to its uid.
    a += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if privileged \
        else ["--unshare-user", "--disable-userns"]
    for d in layout.dirs:
        a += ["--perms", "0755", "--dir", d]
    for p in layout.ro:
        a += ["--ro-bind", p, p]
    for m in layout.masks:
        a += ["--perms", "0755", "--tmpfs", m, "--remount-ro", m]
    for link, target in layout.symlinks:
        a += ["--symlink", target, link]
    a += ["--ro-bind", sbx, "/sbx", "--perms", "0777" if privileged else "0700", "--size", str(limits.disk_bytes),
          "--tmpfs", "/work", "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc", "--chdir", "/work",
          "--remount-ro", "/", "--"]
    return a


# ----------------------------------------------------------------------------- host-side helpers

def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8")}


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` command giving a weak-mode run its own network + PID namespaces; () if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    base = ("--net", "--pid", "--fork", "--kill-child")
    candidates = [(exe, *base)] if os.geteuid() == 0 else []
    candidates.append((exe, "--user", "--map-root-user", *base))
    probe = "import socket; print(len(socket.if_nameindex()))"  # a fresh netns has only lo
    for cand in candidates:
        try:
            out = subprocess.run([*cand, sys.executable, "-I", "-S", "-c", probe],
                                 capture_output=True, text=True, timeout=10,
                                 stdin=subprocess.DEVNULL, env=_base_env())
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == "1":
            return cand
    return ()


@lru_cache(maxsize=1)
def _pids_cgroup_root() -> str | None:
    """A writable cgroup-v1 `pids` directory to make per-run cgroups in; None if absent."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "pids" in parts[1].split(","):
            root = os.path.join("/sys/fs/cgroup/pids", parts[2].lstrip("/"))
            test = os.path.join(root, f"crossroute-probe-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(test)
                os.rmdir(test)
                return root
            except OSError:
                return None
    return None


def _user_tasks(uid: int) -> int:
    """Tasks (processes and threads) owned by `uid`: RLIMIT_NPROC counts them all."""
    n = 0
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


_UID_BASE = 1 << 30
_uid_lock = threading.Lock()
_uid_next = [0]


def _run_ids(kind: str) -> tuple[int, int] | None:
    """A fresh unprivileged uid (= gid) for one jailed child when the trainer is root, else None
    (the child then keeps the trainer's own, non-root, uid inside a user namespace)."""
    if kind == "weak" or os.geteuid() != 0:
        return None
    with _uid_lock:
        n = _uid_next[0]
        _uid_next[0] += 1
    uid = _UID_BASE + (os.getpid() % 8192) * 8192 + n % 8192
    return uid, uid


def _clamped(limits: SandboxLimits, nproc: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard), lowered to this process's hard limits (raising one would fail).
    CPU: SIGXCPU at the soft limit, SIGKILL one second later."""
    cpu = max(1, int(limits.cpu_seconds))
    wanted = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits.memory_bytes),
              (resource.RLIMIT_FSIZE, limits.file_size_bytes),
              (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_NPROC, nproc),
              (resource.RLIMIT_CORE, 0)]
    out = []
    for res, value in wanted:
        cur = resource.getrlimit(res)[1]
        hard = value + 1 if res == resource.RLIMIT_CPU else value
        if cur != resource.RLIM_INFINITY:
            value, hard = min(value, cur), min(hard, cur)
        out.append((res, value, hard))
    return out


def _preexec(limits: SandboxLimits, nproc: int, cgroup_procs: str | None) -> Callable[[], None]:
    """Runs in the child between fork and exec: only syscalls, no Python-level locks."""
    values = _clamped(limits, nproc)

    def f() -> None:
        if cgroup_procs is not None:
            try:
                fd = os.open(cgroup_procs, os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            except OSError:
                pass
        for res, soft, hard in values:
            resource.setrlimit(res, (soft, hard))

    return f


class _Cgroup:
    """A per-run pids cgroup (cgroup v1): caps processes and lists every process of the run."""

    def __init__(self, root: str, max_pids: int) -> None:
        self.path = os.path.join(root, f"crossroute-sbx-{os.getpid()}-{secrets.token_hex(6)}")
        os.mkdir(self.path)
        Path(self.path, "pids.max").write_text(str(max_pids))
        self.procs = os.path.join(self.path, "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in Path(self.procs).read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def kill_and_remove(self) -> None:
        deadline = time.monotonic() + 2.0
        while True:
            self.kill()
            try:
                os.rmdir(self.path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _exited(pid: int) -> bool:
    """True once `pid` has exited, without reaping it (its pid cannot be reused before killpg)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _rmtree(path: str) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


# ----------------------------------------------------------------------------- choosing the isolation

@dataclass(frozen=True)
class _Iso:
    """How children are started: 'bwrap' or 'unshare' (kernel jails) or 'weak' (no jail)."""

    kind: str
    tool: str = ""
    layout: _Layout | None = None


_state_lock = threading.Lock()
_probe_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One loud warning per process and kind (the sandbox runs thousands of times)."""
    with _state_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@lru_cache(maxsize=4)
def _backend(kind: str) -> _Iso | str:
    """The kernel backend `kind` if it builds a sound jail here (probed once), else why not."""
    tool = shutil.which(kind)
    if tool is None:
        return f"no `{kind}` binary on PATH"
    layout = _layout()
    if isinstance(layout, str):
        return layout
    iso = _Iso(kind, tool, layout)
    return _probe(iso)


def _probe(iso: _Iso) -> _Iso | str:
    """Start one jail and check from inside that it is what the docstring promises."""
    assert iso.layout is not None
    limits = SandboxLimits(wall_seconds=20.0, cpu_seconds=10)
    with _Run(iso, limits, time.monotonic()) as run:
        child = run.spawn("probe", {"probe.py": _PROBE}, "probe.py", [",".join(iso.layout.modules)], {})
        run.pump(child, {child.out: (64 * 1024, False), child.err: (64 * 1024, False),
                         child.status: (64 * 1024, False)})
        rc = child.proc.returncode
        out, err = run.text(child.out), run.text(child.err) + run.text(child.status)
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"the {iso.kind} jail did not start (exit status {rc}): {err.strip()[-300:]}"
    expected_top = {p.split("/")[1] for p in [*iso.layout.ro, *dict(iso.layout.symlinks)]}
    expected_top |= {"dev", "proc", "sbx", "work"}
    problems = []
    if info.get("uid") == 0:
        problems.append("it runs as root")
    if info.get("ifaces") != 1:
        problems.append("it has a network interface besides lo")
    if info.get("writable") != ["/work/x"]:
        problems.append(f"it can write {info.get('writable')}")
    if not set(info.get("root", [])) <= expected_top:
        problems.append(f"it sees {sorted(set(info.get('root', [])) - expected_top)} at /")
    if problems:
        return f"the {iso.kind} jail is not sound here: {'; '.join(problems)}"
    missing = info.get("missing") or []
    if missing:
        _warn_once(f"missing-{iso.kind}", f"crossroute sandbox ({iso.kind}): these standard-library modules do not "
                   f"import inside the jail: {', '.join(missing)}.")
    return iso


def _allow_unisolated(limits: SandboxLimits) -> bool:
    return limits.allow_unisolated or os.environ.get(ALLOW_UNISOLATED_ENV, "") not in ("", "0")


def _select(limits: SandboxLimits) -> _Iso | str:
    """The isolation a run gets, or the message of a refusal (no kernel jail and no opt-in)."""
    if limits.isolation not in ISOLATIONS:
        raise CrossrouteError(f"SandboxLimits.isolation must be one of {', '.join(ISOLATIONS)}, got "
                              f"{limits.isolation!r}; use 'auto' unless testing a backend.")
    kinds = () if not limits.namespaces else ("bwrap", "unshare") if limits.isolation == "auto" \
        else (limits.isolation,)
    problems = []
    for kind in kinds:
        with _probe_lock:
            found = _backend(kind)
        if isinstance(found, _Iso):
            return found
        problems.append(f"{kind}: {found}")
    why = "; ".join(problems) or "SandboxLimits(namespaces=False)"
    if _allow_unisolated(limits):
        _warn_once("weak", f"crossroute sandbox: running model-generated code WITHOUT kernel isolation ({why}), as "
                   f"allowed by {ALLOW_UNISOLATED_ENV} / allow_unisolated; a hostile program can read the trainer's "
                   "files and forge the test process. Install bubblewrap to isolate it.")
        return _Iso("weak")
    message = (f"no kernel isolation for model-generated code here ({why}); install bubblewrap "
               f"(apt-get install bubblewrap) or allow unprivileged user namespaces, or set "
               f"{ALLOW_UNISOLATED_ENV}=1 to run it with the weaker in-process guards.")
    _warn_once("refused", f"crossroute sandbox refuses to run code: {message}")
    return message


def sandbox_info() -> dict[str, Any]:
    """Which layers apply on this machine (for logs, tests and the README)."""
    found = {kind: _backend(kind) for kind in ("bwrap", "unshare")}
    iso = next((v for v in found.values() if isinstance(v, _Iso)), None)
    prefix = _unshare_prefix() if iso is None else ()
    return {
        "isolation": iso.kind if iso else None,  # the backend `auto` uses; None: refused unless opted in
        "backends": {k: "ok" if isinstance(v, _Iso) else v for k, v in found.items()},
        "namespaces": iso is not None or bool(prefix),  # network + PID namespaces
        "user_namespace": iso is not None and os.geteuid() != 0 or "--user" in prefix,
        "per_run_uid": iso is not None and os.geteuid() == 0,
        "pids_cgroup": _pids_cgroup_root() is not None,
        "nproc_rlimit_enforced": os.geteuid() != 0 or iso is not None,
        "network_guard": "namespace+audit-hook" if iso or prefix else "audit-hook (best-effort)",
    }


# ----------------------------------------------------------------------------- running children

@dataclass
class _Child:
    """One started child: its process, and the read ends of its stdout, stderr and status pipes."""

    proc: subprocess.Popen[bytes]
    out: int
    err: int
    status: int
    cgroup: _Cgroup | None

    def close(self) -> None:
        """Close the parent's ends of the child's pipes."""
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        os.close(self.status)


class _Run:
    """One sandbox run: a temp dir, the children started in it, their output; cleans up on exit."""

    def __init__(self, iso: _Iso, limits: SandboxLimits, start: float) -> None:
        self.iso, self.limits, self.start = iso, limits, start
        self.deadline = start + limits.wall_seconds
        self.children: list[_Child] = []
        self.bufs: dict[int, bytearray] = {}
        self.over = self.timed_out = False
        self.root = ""

    def __enter__(self) -> _Run:
        self.root = tempfile.mkdtemp(prefix="crossroute-sbx-")
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.children:
            if c.proc.returncode is None:  # never killpg a reaped pid: it may belong to someone else now
                _kill_group(c.proc.pid)
            if c.cgroup is not None:
                c.cgroup.kill_and_remove()
            if c.proc.returncode is None:
                try:
                    c.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            c.close()
        _rmtree(self.root)

    def spawn(self, role: str, files: dict[str, str], script: str, args: list[str],
              fds: dict[str, int], env_extra: dict[str, str] | None = None) -> _Child:
        """Start one child running /sbx/`script` `args` (inside the jail), passing `fds` by env name."""
        home = os.path.join(self.root, role)
        sbx = os.path.join(home, "sbx")
        os.makedirs(sbx)
        os.chmod(sbx, 0o755)
        for name, text in files.items():
            Path(sbx, name).write_text(text, encoding="utf-8", errors="surrogatepass")
            os.chmod(os.path.join(sbx, name), 0o644)
        status_r, status_w = os.pipe()
        env = {**_base_env(), **(env_extra or {}), "CR_STATUS_FD": str(status_w),
               **{k: str(v) for k, v in fds.items()}}
        keep = [status_w, *fds.values()]
        ids = _run_ids(self.iso.kind)
        try:
            cmd, cwd = self._command(home, sbx, script, args, ids, keep, env)
        except BaseException:
            os.close(status_r)
            os.close(status_w)
            raise
        cgroup = None
        cg_root = _pids_cgroup_root()
        if cg_root is not None:
            try:
                cgroup = _Cgroup(cg_root, self.limits.processes + 5)
            except OSError:
                cgroup = None
        nproc = self.limits.processes + 5 + (0 if ids or os.geteuid() == 0 else _user_tasks(os.getuid()))
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=tuple(keep), start_new_session=True,
                                    preexec_fn=_preexec(self.limits, nproc, cgroup.procs if cgroup else None))
        except BaseException:
            os.close(status_r)
            if cgroup is not None:
                cgroup.kill_and_remove()
            raise
        finally:
            os.close(status_w)
        assert proc.stdout is not None and proc.stderr is not None
        child = _Child(proc, proc.stdout.fileno(), proc.stderr.fileno(), status_r, cgroup)
        self.children.append(child)
        return child

    def _command(self, home: str, sbx: str, script: str, args: list[str], ids: tuple[int, int] | None,
                 keep: list[int], env: dict[str, str]) -> tuple[list[str], str]:
        """The command line starting `script` under this run's isolation, and its host cwd."""
        if self.iso.kind == "weak":
            work = os.path.join(home, "work")
            os.mkdir(work)
            env["TMPDIR"] = work
            host_args = [a.replace("/sbx/", sbx + "/") for a in args]
            return [*_unshare_prefix(), _base_python(), "-I", "-S", os.path.join(sbx, script), *host_args], work
        layout = self.iso.layout
        assert layout is not None
        env.update(TMPDIR="/work", CR_ISOLATED="1")
        inner = [layout.exe, "-I", "-S", "/sbx/" + script, *args]
        if self.iso.kind == "bwrap":
            privileged = os.geteuid() == 0
            if ids is not None:
                env["CR_DROP_UID"] = str(ids[0])
            return [*_bwrap_argv(self.iso.tool, layout, sbx, self.limits, privileged), *inner], home
        cfg = {"root": os.path.join(home, "root"), "dirs": layout.dirs, "ro": layout.ro, "masks": layout.masks,
               "symlinks": layout.symlinks, "sbx": sbx, "disk": self.limits.disk_bytes, "keep": keep,
               "uid": ids[0] if ids else None, "gid": ids[1] if ids else None, "argv": inner}
        os.mkdir(cfg["root"])
        Path(home, "jail.json").write_text(json.dumps(cfg), encoding="utf-8")
        Path(home, "jail.py").write_text(_JAIL_SETUP, encoding="utf-8")
        userns = ["--user", "--map-root-user"] if ids is None else []
        return [self.iso.tool, *userns, "--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts",
                "--", layout.exe, "-I", "-S", os.path.join(home, "jail.py"), os.path.join(home, "jail.json")], home

    def pump(self, primary: _Child, streams: dict[int, tuple[int, bool]]) -> None:
        """Collect `streams` (fd: (cap, over-cap fails the run)) until `primary` has exited and its
        pipes drained, the wall clock runs out, or a strict stream overflows; then kill everything."""
        for fd in streams:
            self.bufs.setdefault(fd, bytearray())
        sel = selectors.DefaultSelector()
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        exit_seen: float | None = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= self.deadline:
                    self.timed_out = exit_seen is None
                    break
                if exit_seen is None and _exited(primary.proc.pid):
                    exit_seen = now
                    for c in self.children:
                        _kill_group(c.proc.pid)  # stragglers that still hold the pipes
                elif exit_seen is not None and now - exit_seen > 0.5:
                    break
                for key, _ in sel.select(timeout=min(0.05, self.deadline - now)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    cap, strict = streams[key.fd]
                    buf = self.bufs[key.fd]
                    room = cap - len(buf)
                    buf += chunk[:max(room, 0)]
                    if len(chunk) > room and strict:
                        self.over = True
                if self.over:
                    break
        finally:
            sel.close()
            for c in self.children:
                _kill_group(c.proc.pid)
                if c.cgroup is not None:
                    c.cgroup.kill()
            for c in self.children:
                try:
                    c.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass

    def text(self, fd: int) -> str:
        return bytes(self.bufs.get(fd, b"")).decode("utf-8", "replace")

    def result(self, child: _Child, reason: str, detail: str = "", verdict: str = "") -> SandboxResult:
        """The SandboxResult of a run whose solution process is `child`."""
        return SandboxResult(reason == "ok", reason, child.proc.returncode, time.monotonic() - self.start,
                             self.text(child.out), self.text(child.err), detail, verdict, self.iso.kind)


def _solution_failure(status: str, rc: int | None, run: _Run) -> tuple[str, str] | None:
    """Why the solution's run failed on its own (escape, output cap, CPU, wall clock, an error while
    loading), from what it and the kernel said; None if nothing did. These only ever lower the reward."""
    escape = error = None
    for line in status.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "escape" and escape is None:
            escape = rest
        elif kind == "error" and error is None:
            error = rest.partition(" ")[0]
    if escape is not None:
        return "escape_attempt", escape
    if run.over:
        return "output_limit", "stdout/stderr or the returned values over the cap"
    if error == "cpu_limit":
        return "cpu_limit", ""
    if run.timed_out:
        return "timeout", ""
    if error is not None:
        return (error if error in REASONS and error != "ok" else "crash"), "the solution failed before the tests ran"
    return None


def _exit_reason(rc: int | None) -> tuple[str, str]:
    """Why a process that stopped answering ended, from its exit status."""
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and rc > 128 else 0)
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "cpu_limit", f"killed by signal {sig}"
    if sig == signal.SIGXFSZ:
        return "output_limit", "file size limit"
    return "crash", f"exit status {rc} without a result"


# ----------------------------------------------------------------------------- the values form

class _NotValues(Exception):
    """The tests are outside the subset the trainer checks itself (the tester form takes them)."""


class _Verdict(Exception):
    """A decided failure while checking values: (reason, detail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_BIG = 1_000_000  # bits of an int / items of a sequence the trainer computes at most


def _sized(n: int) -> int:
    if n > _BIG:
        raise _Verdict("crash", "the test's arithmetic on the returned values is too large to check")
    return n


def _safe_mult(a: Any, b: Any) -> Any:
    seq = (str, bytes, list, tuple)
    if isinstance(a, seq) and type(b) is int:
        _sized(len(a) * max(b, 0))
    elif isinstance(b, seq) and type(a) is int:
        _sized(len(b) * max(a, 0))
    elif type(a) is int and type(b) is int:
        _sized(a.bit_length() + b.bit_length())
    return a * b


def _safe_pow(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int and b > 0:
        _sized(max(a.bit_length(), 1) * b)
    return a ** b


def _safe_lshift(a: Any, b: Any) -> Any:
    if type(a) is int and type(b) is int:
        _sized(a.bit_length() + max(b, 0))
    return a << b


def _safe_mod(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        raise _Verdict("crash", "the test formats a returned value with %, which the trainer does not check")
    return a % b


def _safe_round(x: Any, ndigits: Any = None) -> Any:
    if ndigits is not None and (type(ndigits) is not int or abs(ndigits) > 400):
        raise _Verdict("crash", "round() with more than 400 digits is not checked")
    return round(x, ndigits)


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: _safe_mult,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: _safe_mod, ast.Pow: _safe_pow,
    ast.LShift: _safe_lshift, ast.RShift: lambda a, b: a >> b, ast.BitOr: lambda a, b: a | b,
    ast.BitXor: lambda a, b: a ^ b, ast.BitAnd: lambda a, b: a & b}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.UAdd: lambda a: +a, ast.USub: lambda a: -a, ast.Not: lambda a: not a, ast.Invert: lambda a: ~a}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: lambda a, b: a is b,
    ast.IsNot: lambda a, b: a is not b}
# Pure builtins the trainer applies to returned values (bounded cost on bounded data).
_PURE: dict[str, Any] = {n: getattr(builtins, n) for n in (
    "abs", "all", "any", "bool", "chr", "dict", "divmod", "float", "frozenset", "int", "isinstance", "len",
    "list", "max", "min", "ord", "repr", "reversed", "set", "sorted", "str", "sum", "tuple", "type")}
_PURE["round"] = _safe_round
_MATH: dict[str, Any] = {n: getattr(math, n) for n in (
    "isclose", "isnan", "isinf", "isfinite", "fabs", "floor", "ceil", "sqrt", "trunc", "copysign", "gcd", "log",
    "log2", "log10", "exp", "sin", "cos", "tan", "atan2", "hypot", "pi", "e", "inf", "nan", "tau")}


class _MathModule:
    """`math` as the tests see it in the trainer: only the names of _MATH."""


_MATH_MODULE = _MathModule()
_SINGLETONS = (None, True, False)


@dataclass
class _Values:
    """Tests the trainer checks itself: the asserts, their calls into the solution, and the names bound."""

    steps: list[tuple[ast.expr, dict[str, str], str]]  # (assert test, renames, source)
    calls: list[dict[str, Any]]  # requests for the solution, in evaluation order
    holes: dict[int, int]  # id(ast node) -> index into calls
    env: dict[str, Any]  # names the tests bind (constants, math)


class _Planner:
    """Builds a _Values plan from the tests' AST, or raises _NotValues."""

    def __init__(self) -> None:
        self.plan = _Values([], [], {}, {})
        self.renames: dict[str, str] = {}

    def name(self, n: str) -> tuple[str, Any]:
        """('env'|'pure'|'solution', value or name) for a name read by the tests."""
        n = self.renames.get(n, n)
        if n in self.plan.env:
            return "env", self.plan.env[n]
        if n in _PURE:
            return "pure", _PURE[n]
        if n == "math":
            return "env", _MATH_MODULE
        if hasattr(builtins, n):
            raise _NotValues(f"builtin {n}")
        return "solution", n

    def scan(self, node: ast.AST) -> None:
        """Check `node` is in the subset; register each call into the solution (in evaluation order)."""
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, ast.Name):
            kind, v = self.name(node.id)
            if kind == "solution":
                self.register(node, {"get": v})
            return
        if isinstance(node, ast.Call):
            self.scan_call(node)
            return
        if isinstance(node, ast.Attribute):
            self.math_attr(node)
            return
        if isinstance(node, ast.Compare):
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.Is, ast.IsNot)) and not any(
                        isinstance(x, ast.Constant) and x.value in _SINGLETONS and type(x.value) in (bool, type(None))
                        for x in (node.left, right)):
                    raise _NotValues("`is` with a value other than None/True/False")
        elif isinstance(node, ast.BinOp) and type(node.op) not in _BINOPS:
            raise _NotValues("operator")
        elif isinstance(node, ast.Dict) and any(k is None for k in node.keys):
            raise _NotValues("** in a dict")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Starred) for e in node.elts):
            raise _NotValues("starred")
        elif not isinstance(node, (ast.Compare, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.IfExp, ast.Subscript,
                                   ast.Slice, ast.Tuple, ast.List, ast.Set, ast.Dict)):
            raise _NotValues(type(node).__name__)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.expr_context, ast.cmpop, ast.operator, ast.unaryop, ast.boolop)):
                self.scan(child)

    def math_attr(self, node: ast.Attribute) -> Any:
        if not (isinstance(node.value, ast.Name) and self.name(node.value.id) == ("env", _MATH_MODULE)
                and node.attr in _MATH):
            raise _NotValues("attribute")
        return _MATH[node.attr]

    def scan_call(self, node: ast.Call) -> None:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise _NotValues("starred call")
        if isinstance(node.func, ast.Attribute):
            self.math_attr(node.func)
        elif not isinstance(node.func, ast.Name):
            raise _NotValues("call of an expression")
        else:
            kind, v = self.name(node.func.id)
            if kind == "solution":
                args = [self.constant(a) for a in node.args]
                kwargs = {k.arg: self.constant(k.value) for k in node.keywords if k.arg is not None}
                self.register(node, {"call": v, "args": args, "kwargs": kwargs})
                return
            if v is sum and len(node.args) + len(node.keywords) > 1:
                raise _NotValues("sum() with a start")
        for a in [*node.args, *(k.value for k in node.keywords)]:
            self.scan(a)

    def constant(self, node: ast.expr) -> Any:
        """A call argument the trainer computes itself, encoded for the solution."""
        try:
            return _to_plain(_evaluate(node, self.plan, self.renames, None))
        except (_NotValues, _Verdict, _NotPlain):
            raise
        except Exception as e:
            raise _NotValues(f"argument raised {type(e).__name__}") from None

    def register(self, node: ast.AST, request: dict[str, Any]) -> None:
        self.plan.holes[id(node)] = len(self.plan.calls)
        self.plan.calls.append(request)

    def statement(self, stmt: ast.stmt, checks: dict[str, ast.FunctionDef]) -> None:
        """Add one top-level statement of the tests to the plan."""
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            return
        if isinstance(stmt, ast.Import) and all(a.name == "math" for a in stmt.names):
            self.plan.env.update({a.asname or "math": _MATH_MODULE for a in stmt.names})
        elif isinstance(stmt, ast.ImportFrom) and stmt.module == "math" and not stmt.level \
                and all(a.name in _MATH for a in stmt.names):
            self.plan.env.update({a.asname or a.name: _MATH[a.name] for a in stmt.names})
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            before = len(self.plan.calls)
            self.scan(stmt.value)
            if len(self.plan.calls) != before:
                raise _NotValues("an assignment from the solution")
            self.plan.env[stmt.targets[0].id] = _evaluate(stmt.value, self.plan, self.renames, None)
        elif isinstance(stmt, ast.Assert):
            self.scan(stmt.test)
            self.plan.steps.append((stmt.test, dict(self.renames), ast.unparse(stmt)))
        elif isinstance(stmt, ast.FunctionDef) and _is_check(stmt):
            checks[stmt.name] = stmt
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) \
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in checks \
                and len(stmt.value.args) == 1 and not stmt.value.keywords \
                and isinstance(stmt.value.args[0], ast.Name):
            fn = checks[stmt.value.func.id]
            self.renames = {fn.args.args[0].arg: self.renames.get(stmt.value.args[0].id, stmt.value.args[0].id)}
            for inner in fn.body:
                self.statement(inner, {})
            self.renames = {}
        else:
            raise _NotValues(type(stmt).__name__)


def _is_check(fn: ast.FunctionDef) -> bool:
    """A HumanEval-style `def check(candidate):` whose body the values form can take."""
    a = fn.args
    simple = len(a.args) == 1 and not (a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg or a.defaults)
    body_ok = all(isinstance(s, (ast.Assert, ast.Pass))
                  or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                  or (isinstance(s, ast.Import) and all(x.name == "math" for x in s.names)) for s in fn.body)
    return simple and not fn.decorator_list and fn.returns is None and body_ok


def _plan_values(tree: ast.Module) -> _Values | None:
    """The values-form plan of the tests, or None when they need the tester form."""
    planner = _Planner()
    checks: dict[str, ast.FunctionDef] = {}
    try:
        for stmt in tree.body:
            planner.statement(stmt, checks)
        _to_plain(planner.plan.calls)  # every argument must travel as plain data
    except Exception:  # outside the subset, or a constant the tests compute raised: the tester decides
        return None
    return planner.plan


def _evaluate(node: ast.AST, plan: _Values, renames: dict[str, str], values: list[Any] | None) -> Any:
    """Evaluate a planned expression in the trainer; `values[i]` answers call i (None: none yet)."""

    def ev(n: ast.AST) -> Any:
        if id(n) in plan.holes:
            if values is None:
                raise _NotValues("needs the solution")
            got = values[plan.holes[id(n)]]
            if isinstance(got, _Verdict):
                raise got
            return got
        if isinstance(n, ast.Constant):
            return n.value
        if isinstance(n, ast.Name):
            name = renames.get(n.id, n.id)
            if name in plan.env:
                return plan.env[name]
            if name in _PURE:
                return _PURE[name]
            if name == "math":
                return _MATH_MODULE
            raise _NotValues(f"name {name}")
        if isinstance(n, ast.Attribute):
            if ev(n.value) is _MATH_MODULE and n.attr in _MATH:
                return _MATH[n.attr]
            raise _NotValues("attribute")
        if isinstance(n, ast.Call):
            fn = ev(n.func)
            return fn(*[ev(a) for a in n.args], **{k.arg: ev(k.value) for k in n.keywords if k.arg})
        if isinstance(n, ast.BinOp):
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp):
            return _UNARY[type(n.op)](ev(n.operand))
        if isinstance(n, ast.BoolOp):
            result: Any = None
            for v in n.values:
                result = ev(v)
                if bool(result) != isinstance(n.op, ast.And):
                    return result
            return result
        if isinstance(n, ast.Compare):
            left = ev(n.left)
            for op, right_node in zip(n.ops, n.comparators, strict=True):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(n, ast.IfExp):
            return ev(n.body) if ev(n.test) else ev(n.orelse)
        if isinstance(n, ast.Subscript):
            return ev(n.value)[ev(n.slice)]
        if isinstance(n, ast.Slice):
            return slice(*(None if x is None else ev(x) for x in (n.lower, n.upper, n.step)))
        if isinstance(n, ast.Tuple):
            return tuple(ev(e) for e in n.elts)
        if isinstance(n, ast.List):
            return [ev(e) for e in n.elts]
        if isinstance(n, ast.Set):
            return {ev(e) for e in n.elts}
        if isinstance(n, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(n.keys, n.values, strict=True) if k is not None}
        raise _NotValues(type(n).__name__)

    return ev(node)


def _decode_reply(line: str, call: dict[str, Any]) -> Any:
    """One answer of the solution as a value, or a _Verdict for a failed or non-plain one."""
    what = f"{call.get('call') or call.get('get')}{'()' if 'call' in call else ''}"
    try:
        msg = _loads(line, _REPLY_CAP)
        if type(msg) is not dict:
            raise _NotPlain("not a reply")
        if "ok" in msg:
            return _from_plain(msg["ok"])
        if "raised" in msg:
            name = str(msg["raised"])[:100]
            return _Verdict("memory" if name == "MemoryError" else "crash",
                            f"{what} raised {name}: {str(msg.get('msg', ''))[:300]}")
        return _Verdict("not_plain_data", f"{what} returned {str(msg.get('bad', 'a malformed reply'))[:200]}")
    except (_NotPlain, RecursionError) as e:
        return _Verdict("not_plain_data", f"{what} returned {e}")


def _judge_values(plan: _Values, lines: list[str]) -> tuple[str, str]:
    """(reason, detail) of the asserts, evaluated in the trainer over the solution's answers."""
    values = [_decode_reply(line, call) for line, call in zip(lines, plan.calls, strict=True)]
    for test, renames, source in plan.steps:
        try:
            ok = bool(_evaluate(test, plan, renames, values))
        except _Verdict as v:
            return v.reason, v.detail
        except (_NotValues, RecursionError, MemoryError) as e:
            return "crash", f"{source}: could not be checked ({type(e).__name__})"
        except Exception as e:
            return "crash", f"{source}: the test raised {type(e).__name__}: {str(e)[:200]}"
        if not ok:
            return "assertion", f"failed: {source}"[:500]
    return "ok", ""


# ----------------------------------------------------------------------------- running a program

def run_sandboxed(code: str, tests: str,
                  limits: SandboxLimits = SandboxLimits()) -> SandboxResult:  # noqa: B008
    """Run `code` in the sandbox and judge it by `tests` outside it; passed only if every test held."""
    start = time.monotonic()
    iso = _select(limits)
    if isinstance(iso, str):
        return SandboxResult(False, "no_isolation", None, 0.0, "", "", iso)
    try:
        tree = ast.parse(tests, "<tests>")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return SandboxResult(False, "syntax_error", None, time.monotonic() - start, "", "",
                             f"the tests are not valid Python: {e}", isolation=iso.kind)
    plan = _plan_values(tree)
    with _Run(iso, limits, start) as run:
        return _run_values(run, code, plan) if plan is not None else _run_tester(run, code, tests)


def _solution_streams(run: _Run, child: _Child) -> dict[int, tuple[int, bool]]:
    cap = run.limits.output_bytes
    return {child.out: (cap, True), child.err: (cap, True), child.status: (64 * 1024, False)}


def _run_values(run: _Run, code: str, plan: _Values) -> SandboxResult:
    """The values form: one jailed child answers the planned calls; the trainer checks the asserts."""
    resp_r, resp_w = os.pipe()
    try:
        child = run.spawn("solution", {"runner.py": _RUNNER, "code.py": code, "calls.json": _dumps(plan.calls)},
                          "runner.py", ["/sbx/code.py", "/sbx/calls.json"], {"CR_RESP_FD": resp_w},
                          {"CR_ALLOW_SUB": str(int(run.limits.allow_subprocesses))})
    finally:
        os.close(resp_w)
    try:
        run.pump(child, {**_solution_streams(run, child), resp_r: (_REPLY_CAP, True)})
    finally:
        os.close(resp_r)
    rc = child.proc.returncode
    failed = _solution_failure(run.text(child.status), rc, run)
    if failed is not None:
        return run.result(child, *failed)
    lines = bytes(run.bufs[resp_r]).decode("ascii", "replace").split("\n")
    if not lines or lines[0] != _dumps({"loaded": True}) or len(lines) < len(plan.calls) + 2:
        return run.result(child, *_exit_reason(rc))
    reason, detail = _judge_values(plan, lines[1:len(plan.calls) + 1])
    return run.result(child, reason, detail, "values")


def _run_tester(run: _Run, code: str, tests: str) -> SandboxResult:
    """The tester form: the tests run in a second jail, calling into the solution's jail over pipes."""
    to_sol_r, to_sol_w = os.pipe()
    to_tst_r, to_tst_w = os.pipe()
    try:
        sol = run.spawn("solution", {"runner.py": _RUNNER, "code.py": code}, "runner.py", ["/sbx/code.py", "-"],
                        {"CR_REQ_FD": to_sol_r, "CR_RESP_FD": to_tst_w},
                        {"CR_ALLOW_SUB": str(int(run.limits.allow_subprocesses))})
        tst = run.spawn("tests", {"tester.py": _TESTER, "tests.py": tests}, "tester.py", ["/sbx/tests.py"],
                        {"CR_REQ_FD": to_sol_w, "CR_RESP_FD": to_tst_r}, {"CR_REPLY_CAP": str(_REPLY_CAP)})
    finally:
        for fd in (to_sol_r, to_sol_w, to_tst_r, to_tst_w):
            os.close(fd)
    small = (64 * 1024, False)
    run.pump(tst, {**_solution_streams(run, sol), tst.out: small, tst.err: small, tst.status: small})
    failed = _solution_failure(run.text(sol.status), sol.proc.returncode, run)
    if failed is not None:
        return run.result(sol, *failed)
    try:
        verdict = json.loads(run.text(tst.status).splitlines()[0])
        reason, detail = str(verdict["result"]), str(verdict.get("detail", ""))
    except (ValueError, IndexError, KeyError, TypeError):
        return run.result(sol, "crash", f"the test process ended without a verdict (exit status "
                                        f"{tst.proc.returncode}): {run.text(tst.err)[-300:]}")
    if reason == "lost":
        return run.result(sol, *_exit_reason(sol.proc.returncode))
    if reason not in REASONS or (reason == "ok" and tst.proc.returncode != 0):
        return run.result(sol, "crash", f"the test process reported {reason[:40]!r}: {detail}")
    return run.result(sol, reason, detail, "tester")
