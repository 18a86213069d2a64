"""The run directory convention: run.yaml (resolved config), checkpoints/<stage>/, results/*.json.

Everything the report draws comes from these files; every write is atomic (temp file + rename). A run directory is
recognised by its run.yaml; `.lock` (flock'd by the one live process using the run, holding its PID) and `.work/`
(scratch of the stage in progress, removed when it ends) are crossroute's too. Reopening a run removes what a dead
process left: temporaries (`.NAME.*.tmp`) in the run directory and its sub-directories, and `.work/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crossroute.core.atomic import atomic_write_json, atomic_write_yaml, is_temp, remove_dead_temps
from crossroute.core.envelope import unwrap, wrap
from crossroute.core.errors import CrossrouteError


@dataclass(frozen=True)
class RunDir:
    """Paths and atomic readers/writers of one run directory."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "run.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    @property
    def work(self) -> Path:
        """RUN/.work: scratch directories of stages in progress (trainer output_dir), never results."""
        return self.root / WORK

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def work_dir(self, name: str) -> Path:
        """A fresh, empty RUN/.work/<name> for a stage's scratch (a killed stage's leftovers removed first)."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def remove_work(self, name: str | None = None) -> None:
        """Remove RUN/.work/<name> (all of .work when None), and .work itself once empty: nothing is left over."""
        if name is not None:
            shutil.rmtree(self.work / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            if name is None:
                shutil.rmtree(self.work)
            else:
                self.work.rmdir()  # only when empty: another stage's scratch stays

    def has_checkpoint(self, name: str) -> bool:
        """A checkpoint counts only once complete: its directory is renamed into place last."""
        return (self.checkpoint(name) / "config.json").exists()

    def write_result(self, name: str, obj: Any, config: dict[str, Any] | None = None) -> Path:
        """Write results/<name>.json atomically inside its envelope (crossroute.core.envelope); `config` is the
        analysis's own configuration, merged over the run's run.yaml."""
        full = {**(self.read_config() or {}), **(config or {})}
        return atomic_write_json(self.results / f"{name}.json", wrap(name, obj, full))

    def read_envelope(self, name: str) -> dict[str, Any] | None:
        """The envelope of results/<name>.json (None when absent or written before envelopes)."""
        raw = self._read_json(name)
        return None if raw is None else unwrap(raw)[0]

    def read_result(self, name: str) -> Any | None:
        """The data of results/<name>.json (without its envelope), None when absent."""
        raw = self._read_json(name)
        return None if raw is None else unwrap(raw)[1]

    def _read_json(self, name: str) -> Any | None:
        path = self.results / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CrossrouteError(f"{path}: corrupt JSON (line {e.lineno}); delete it to recompute.") from None
        except RecursionError:
            raise CrossrouteError(f"{path}: JSON nested too deeply to read; delete it to recompute.") from None

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        try:
            return yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as e:
            raise CrossrouteError(f"{self.config_path}: invalid YAML ({str(e).splitlines()[0]}).") from None


def result_name(kind: str, *parts: str) -> str:
    """A results/<name>.json name: `kind` then the parts (domain names, JSONL specs) made file-name safe."""
    return "_".join([kind, *(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)])


def open_run(path: str | Path, config: dict[str, Any], kind: str) -> RunDir:
    """Create or reopen a run directory for `config`; refuse one that holds a different config, one that is not a
    run directory, and one another live process is using (lock_run). Reopening removes a dead run's leftovers."""
    run = RunDir(Path(path).expanduser())
    check_run_root(run)
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    try:
        if lock_run(run.root):
            remove_leftovers(run)
        resolved = {"kind": kind, **config}
        existing = run.read_config()
        if existing is not None and existing != resolved:
            changed = sorted(k for k in set(existing) | set(resolved) if existing.get(k) != resolved.get(k))
            raise CrossrouteError(
                f"{run.config_path}: this run directory holds a different config (field "
                f"{changed[0]!r} differs); pass a new output directory or delete the old run."
            )
        if existing is None:
            atomic_write_yaml(run.config_path, resolved)  # first, so a directory with content always has one
    except BaseException:
        if created:
            _unmake(run.root)  # a new run that never got its run.yaml (a full disk): leave no directory behind
        raise
    run.results.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    return run


def _unmake(root: Path) -> None:
    """Remove a run directory this process just created (holding only its .lock), releasing the lock."""
    release_run(root)
    with contextlib.suppress(OSError):
        (root / LOCK).unlink()
        root.rmdir()


WORK = ".work"
LOCK = ".lock"
_HELD: dict[Path, int] = {}  # run roots this process holds the lock of -> the open lock file descriptor


def check_run_root(run: RunDir) -> None:
    """Refuse a file as a run directory, and a non-empty directory without run.yaml (crossroute's own leftovers
    of a run killed before its run.yaml aside): nothing there is touched."""
    root = run.root
    if root.is_symlink() and not root.exists():
        raise CrossrouteError(f"{root}: a dangling symlink or a symlink loop; pass a real output directory.")
    if root.exists() and not root.is_dir():
        raise CrossrouteError(f"{root}: is a file, not a run directory; pass a new output directory.")
    if root.is_dir() and not run.config_path.exists():
        other = sorted(p.name for p in root.iterdir() if not is_temp(p) and p.name not in (LOCK, WORK))
        if other:
            raise CrossrouteError(f"{root}: exists, is not empty and has no run.yaml (it holds {other[0]!r}); pick a "
                                  "new output directory.")


def _main_rank() -> bool:
    """Whether this is the main process of a (torchrun / accelerate) launch, or a plain process: only it locks and
    cleans; the other ranks of the same launch share the run and follow the main one."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return rank.strip() in ("", "0")


def lock_run(root: Path) -> bool:
    """Hold RUN/.lock (fcntl.flock) for the rest of this process's life, refusing the run when another live process
    holds it (one line naming its PID). A dead holder's lock is free (the kernel drops it), so it is taken over.
    True when this call took the lock (the run's leftovers are then a dead process's); False when already held by
    this process, or on a non-main rank (which neither locks nor cleans)."""
    key = root.resolve()
    if key in _HELD or not _main_rank():
        return False
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        pid = holder.split("@")[0]
        stop = f"stop it (kill {pid})" if pid.isdigit() else "stop it"
        raise CrossrouteError(f"{root}: another crossroute process (PID {holder}) is using this run directory; wait "
                              f"for it to finish or {stop}, or pass a different --out.") from None
    except OSError as e:  # a filesystem without flock (some network mounts): run unlocked rather than not at all
        os.close(fd)
        warnings.warn(f"{root / LOCK}: cannot lock ({os.strerror(e.errno or 0)}); a second process on this run "
                      "directory would not be refused", stacklevel=2)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
    _HELD[key] = fd
    return True


def release_run(root: str | Path) -> None:
    """Release this process's lock on run `root` (it is released at exit anyway); the .lock file stays."""
    fd = _HELD.pop(Path(root).expanduser().resolve(), None)
    if fd is not None:
        os.close(fd)


def release_all() -> None:
    """Release every run lock this process holds (a pool process between tasks: the next task may be another
    process's run)."""
    for root in list(_HELD):
        release_run(root)


def remove_leftovers(run: RunDir) -> list[Path]:
    """Remove what a dead process left in a run this process just locked: temporaries (`.NAME.*.tmp`, a killed
    atomic write or checkpoint save) in the run directory and its direct sub-directories, and .work/. Temporaries
    of a live process on this host (tagged with its PID) are kept."""
    removed: list[Path] = []
    for folder in [run.root, *sorted(p for p in run.root.iterdir() if p.is_dir() and not is_temp(p))]:
        if folder.name != WORK:
            removed += remove_dead_temps(folder, untagged=True)
    if run.work.exists():
        run.remove_work()
        removed.append(run.work)
    return removed


def load_run(path: str | Path) -> RunDir:
    """Open an existing run directory for reading (report, diff), refusing anything else."""
    run = RunDir(Path(path).expanduser())
    if not run.config_path.exists():
        raise CrossrouteError(f"{run.root}: not a crossroute run directory (no run.yaml); pass the --out of a run.")
    return run
