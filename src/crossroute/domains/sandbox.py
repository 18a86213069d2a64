"""A sandbox for model-generated Python, and the `code` domain (prompt + tests) that uses it.

`run_sandboxed(code, tests)` runs the code followed by the tests (plain asserts) in a separate,
isolated interpreter (`python -I -S`) inside a throwaway temporary directory, and reports why it
stopped. Layers, from hardest to softest (see SAFETY.md):

* resource limits set in the child before exec: CPU seconds, address space, file size, open files,
  processes, no core dumps; a wall-clock timeout enforced by the parent;
* its own session / process group, killed as a whole when the run ends or overruns;
* when the `unshare` binary works (checked once): new network namespace (no network at all) and new
  PID namespace (every process of the run dies with it, even ones that left the process group);
* when a cgroup-v1 `pids` hierarchy is writable: a per-run cgroup whose `pids.max` caps processes
  (RLIMIT_NPROC is not enforced for root);
* a prelude in the child installs an audit hook (`sys.addaudithook`, which cannot be removed) that
  refuses sockets, process creation, signals, ctypes, rlimit changes, reads outside the sandbox
  directory and the standard library, and writes outside the sandbox directory.

The audit-hook guards are best-effort: they stop accidents and casual escapes by generated code,
not a determined attacker (CPython introspection can reach the runner's state). Without the network
namespace (no working `unshare`), "no network" rests on the hook alone. Run untrusted RL code
generation inside a container or VM as well.
"""

from __future__ import annotations

import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- the child's prelude



# ----------------------------------------------------------------------------- host-side isolation





MB = 1024 * 1024


REASONS = ("ok", "timeout", "cpu_limit", "memory", "crash", "assertion", "syntax_error",
           "escape_attempt", "output_limit")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `allow_subprocesses` lifts only the audit-hook guard on fork/exec."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 4
    memory_bytes: int = 512 * MB
    file_size_bytes: int = 1 * MB
    open_files: int = 64
    processes: int = 16
    output_bytes: int = 64 * 1024  # cap on stdout and on stderr, each
    allow_subprocesses: bool = False  # True: hook allows fork/exec; rlimits etc. still apply
    namespaces: bool = True  # use `unshare` (network + PID namespaces) when it works here


@dataclass(frozen=True)
class SandboxResult:
    """What one run did; `reason` is in REASONS ('output_limit' also means the file-size limit)."""

    passed: bool
    reason: str
    returncode: int | None
    wall_seconds: float
    stdout: str
    stderr: str
    detail: str = ""  # e.g. the refused operation for 'escape_attempt'


_RUNNER = r'''
import os, sys, errno, signal

def _main():
    fd = int(os.environ.pop("CR_STATUS_FD"))
    nonce = os.environ.pop("CR_NONCE")
    allow_sub = os.environ.pop("CR_ALLOW_SUB") == "1"
    here = os.path.realpath(os.getcwd())
    runner = os.path.realpath(sys.argv[0])
    with open(sys.argv[1], encoding="utf-8") as f:
        code = f.read()
    with open(sys.argv[2], encoding="utf-8") as f:
        tests = f.read()
    del sys.argv[1:]
    read_roots = tuple({os.path.realpath(p) for p in sys.path if p})
    read_files = {runner, "/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"}
    escaped = []

    def report(msg):
        try:
            os.write(fd, (msg + "\n").encode("utf-8", "replace"))
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
            report("escape " + what.replace("\n", " ")[:300])
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
    always = ("socket.", "ctypes.", "os.kill", "os.killpg", "resource.setrlimit",
              "resource.prlimit", "sys.remote_exec", "webbrowser.")
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

    def done(reason):
        if escaped:
            reason = "escape_attempt"
        report("result " + nonce + " " + reason)
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        os._exit(0)

    def on_xcpu(signum, frame):
        report("result " + nonce + " cpu_limit")
        os._exit(1)

    signal.signal(signal.SIGXCPU, on_xcpu)
    try:
        unit_code = compile(code, "<solution>", "exec")
        unit_tests = compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as e:
        import traceback
        traceback.print_exception(type(e), e, None)
        done("syntax_error")
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    import traceback

    def show(e):
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass

    try:
        exec(unit_code, g)
        exec(unit_tests, g)
    except AssertionError as e:
        show(e)
        done("assertion")
    except MemoryError:
        done("memory")
    except OSError as e:
        show(e)
        done("output_limit" if e.errno == errno.EFBIG else "crash")
    except BaseException as e:
        show(e)
        done("crash")
    done("ok")

_main()
'''


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The `unshare` command giving a run its own network + PID namespaces; () if none works."""
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


def _base_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8")}


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

    def kill_and_remove(self) -> None:
        deadline = time.monotonic() + 2.0
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
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


def run_sandboxed(code: str, tests: str,
                  limits: SandboxLimits = SandboxLimits()) -> SandboxResult:  # noqa: B008
    """Run `code` then `tests` in an isolated child interpreter; passed only if all tests ran."""
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="crossroute-sbx-")
    cgroup: _Cgroup | None = None
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        Path(root, "runner.py").write_text(_RUNNER, encoding="utf-8")
        Path(root, "code.py").write_text(code, encoding="utf-8", errors="surrogatepass")
        Path(root, "tests.py").write_text(tests, encoding="utf-8", errors="surrogatepass")
        prefix = _unshare_prefix() if limits.namespaces else ()
        cg_root = _pids_cgroup_root()
        if cg_root is not None:
            try:
                cgroup = _Cgroup(cg_root, limits.processes + 3)
            except OSError:
                cgroup = None
        nproc = limits.processes + 3 + (0 if os.geteuid() == 0 else _user_tasks(os.getuid()))
        status_r, status_w = os.pipe()
        nonce = secrets.token_hex(16)
        env = {**_base_env(), "TMPDIR": work, "CR_STATUS_FD": str(status_w), "CR_NONCE": nonce,
               "CR_ALLOW_SUB": "1" if limits.allow_subprocesses else "0"}
        cmd = [*prefix, sys.executable, "-I", "-S", os.path.join(root, "runner.py"),
               os.path.join(root, "code.py"), os.path.join(root, "tests.py")]
        try:
            preexec = _preexec(limits, nproc, cgroup.procs if cgroup else None)
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(status_w,), start_new_session=True,
                                    preexec_fn=preexec)
        except (OSError, subprocess.SubprocessError) as e:
            os.close(status_r)
            os.close(status_w)
            return SandboxResult(False, "crash", None, time.monotonic() - start, "", "",
                                 f"could not start the sandbox: {e}")
        os.close(status_w)
        return _supervise(proc, status_r, nonce, limits, start, cgroup)
    finally:
        if cgroup is not None:
            cgroup.kill_and_remove()
        _rmtree(root)


def _supervise(proc: subprocess.Popen[bytes], status_r: int, nonce: str, limits: SandboxLimits,
               start: float, cgroup: _Cgroup | None) -> SandboxResult:
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    caps = {out_fd: limits.output_bytes, err_fd: limits.output_bytes, status_r: 64 * 1024}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline = start + limits.wall_seconds
    timed_out = over = False
    exit_seen: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exit_seen is None and _exited(proc.pid):
                exit_seen = now
                _kill_group(proc.pid)  # stragglers that still hold the pipes
            elif exit_seen is not None and now - exit_seen > 0.5:
                break
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                room = caps[fd] - len(bufs[fd])
                bufs[fd] += chunk[:max(room, 0)]
                if len(chunk) > room and fd != status_r:
                    over = True
            if over:
                break
    finally:
        _kill_group(proc.pid)
        if cgroup is not None:
            for pid in cgroup.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        sel.close()
        try:
            rc: int | None = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
    wall = time.monotonic() - start
    status = bufs[status_r].decode("utf-8", "replace")
    reason, detail = _classify(status, nonce, rc, timed_out, over)
    stdout = bytes(bufs[out_fd]).decode("utf-8", "replace")
    stderr = bytes(bufs[err_fd]).decode("utf-8", "replace")
    return SandboxResult(reason == "ok", reason, rc, wall, stdout, stderr, detail)


def _classify(status: str, nonce: str, rc: int | None, timed_out: bool,
              over: bool) -> tuple[str, str]:
    escape = result = None
    for line in status.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "escape" and escape is None:
            escape = rest
        elif kind == "result" and result is None:
            got, _, reason = rest.partition(" ")
            if got == nonce and reason in REASONS:
                result = reason
    if escape is not None:
        return "escape_attempt", escape
    if over:
        return "output_limit", "stdout/stderr over the cap"
    if result == "cpu_limit":
        return "cpu_limit", ""
    if timed_out:
        return "timeout", ""
    if result is not None:
        if result == "ok" and rc != 0:
            return "crash", f"exit status {rc} after the tests"
        return result, ""
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and rc > 128 else 0)
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "cpu_limit", f"killed by signal {sig}"
    if sig == signal.SIGXFSZ:
        return "output_limit", "file size limit"
    return "crash", f"exit status {rc} without a result"


def sandbox_info() -> dict[str, Any]:
    """Which layers apply on this machine (for logs, tests and SAFETY.md)."""
    prefix = _unshare_prefix()
    return {
        "namespaces": bool(prefix),  # network + PID namespaces via unshare
        "user_namespace": "--user" in prefix,
        "pids_cgroup": _pids_cgroup_root() is not None,
        "nproc_rlimit_enforced": os.geteuid() != 0,
        "network_guard": "namespace+audit-hook" if prefix else "audit-hook (best-effort)",
    }


















# ----------------------------------------------------------------------------- running







# ----------------------------------------------------------------------------- rewards













# ----------------------------------------------------------------------------- the code domain







