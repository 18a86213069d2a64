"""Atomic writes: a temporary file (or directory) in the same folder, fsynced, then renamed into place.

Temporaries are named `.NAME.<pid>@<host>.<random>.tmp`, so a later write (or a resumed run) can tell the leftovers
of a killed process (same host, PID no longer alive) from those of a live one, and remove only the former.

Output directories (checkpoints, merges, pretrain outputs) carry a `.crossroute` marker file: atomic_dir replaces
an existing directory only when it is empty or holds that marker, i.e. crossroute wrote it; anything else (a user's
checkpoint, a run directory, a file) is refused unless `force=True`. JSON is strict: NaN and infinities are written
as null (the value is undefined), never as the bare `NaN` that other JSON parsers reject.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from crossroute.core.errors import CrossrouteError

MARKER = ".crossroute"  # written into every directory atomic_dir creates: "crossroute wrote this, may replace it"
MARKER_TEXT = "This directory was written by crossroute, which may replace it whole when asked to write here again.\n"
DISK_FULL = {errno.ENOSPC: "the disk is full (No space left on device)",
             errno.EDQUOT: "the disk quota is exceeded (Disk quota exceeded)",
             errno.EROFS: "the filesystem is read-only (Read-only file system)"}
_TAG = re.compile(r"\.(\d+)@([^.]*)\.[^.]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporaries for `name`: `.NAME.<pid>@<host>.` (then random, then `.tmp`)."""
    return f".{name}.{os.getpid()}@{_host()}."


def is_temp(path: Path) -> bool:
    """A temporary file or directory of this module (`.NAME.*.tmp`), possibly left by an interrupted write."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def owner_alive(path: Path) -> bool | None:
    """Whether the process that made temporary `path` still runs: None when the name carries no PID (written
    before PIDs were tagged), True when it runs or lives on another host (cannot tell: kept)."""
    m = _TAG.search(path.name)
    if m is None:
        return None
    if m.group(2) != _host():
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_dead_temps(folder: Path, name: str | None = None, untagged: bool = False) -> list[Path]:
    """Remove the temporaries in `folder` (of `name` only, when given) whose process is dead; `untagged` also
    removes those without a PID (only safe when no live process can own them, e.g. under a run's lock)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not is_temp(p) or (name is not None and not p.name.startswith(f".{name}.")):
            continue
        alive = owner_alive(p)
        if alive is False or (alive is None and untagged):
            _remove(p)
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as strict JSON (NaN and infinities become null) atomically."""
    return atomic_write_text(path, strict_json_dumps(obj) + "\n")


def strict_json_dumps(obj: Any) -> str:
    """`json.dumps` that never writes NaN/Infinity (invalid JSON): non-finite floats become null."""
    try:
        return json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError as e:
        if "not JSON compliant" not in str(e):
            raise
    return json.dumps(finite_or_none(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (also inside arrays and tensors) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return finite_or_none(obj.tolist())
    return obj


def atomic_write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return finite_or_none(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def is_marked(path: Path) -> bool:
    """Whether directory `path` carries crossroute's `.crossroute` marker (crossroute wrote it)."""
    return (path / MARKER).is_file()


def check_output_dir(path: str | Path, force: bool = False) -> Path:
    """Refuse an output directory crossroute may not replace: a file or symlink, or a non-empty directory without
    the `.crossroute` marker (unless `force`). Call it before long work, so nothing is computed in vain."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        what = "a symlink" if path.is_symlink() else "a file"
        raise CrossrouteError(f"{path}: is {what}, not a directory crossroute wrote; pass a new output directory "
                              "(crossroute writes a checkpoint directory there and never replaces files).")
    if not path.is_dir() or force or is_marked(path):
        return path
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        raise CrossrouteError(f"{path}: exists and was not written by crossroute (no {MARKER} marker; it holds "
                              f"{entries[0]!r}{' and more' if len(entries) > 1 else ''}); pass a new output "
                              "directory, or delete it yourself (or pass --force) to replace it.")
    return path


def disk_error_message(path: Path, code: int) -> str:
    """One line for a full, over-quota or read-only disk while writing output `path`."""
    fix = "pass an --out on a writable disk" if code == errno.EROFS else "free space"
    return (f"{path}: {DISK_FULL[code]} while writing it; nothing partial was kept (its temporary files were "
            f"removed): {fix}, then run the same command again.")


def _safetensors_errno(exc: BaseException) -> int | None:
    """The OS error code inside a safetensors SafetensorError (it wraps I/O errors as text), else None."""
    if type(exc).__name__ != "SafetensorError":
        return None
    text = str(exc)
    m = re.search(r"code:\s*(\d+)", text)
    if m:
        return int(m.group(1))
    for code, words in ((errno.ENOSPC, ("StorageFull", "No space left")),
                        (errno.EDQUOT, ("QuotaExceeded", "quota exceeded")),
                        (errno.EROFS, ("ReadOnlyFilesystem", "Read-only file system"))):
        if any(w in text for w in words):
            return code
    return None


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full / over-quota / read-only disk (OSError or safetensors' SafetensorError) while writing `path`
    into one CrossrouteError naming `path`; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise CrossrouteError(disk_error_message(path, e.errno)) from None
        raise
    except Exception as e:
        code = _safetensors_errno(e)
        if code in DISK_FULL:
            raise CrossrouteError(disk_error_message(path, code)) from None
        raise


def _finish_dir(tmp: Path) -> None:
    """fsync and chmod the files of a finished temporary directory, then write the marker (last)."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())
    marker = tmp / MARKER
    marker.write_text(MARKER_TEXT)
    os.chmod(marker, 0o666 & ~_umask())


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is first moved to a tagged temporary and removed after."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        os.replace(path, old)  # onto the empty directory mkdtemp made
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_link_copy(src: Path, dst: Path) -> None:
    """Hard-link file or tree `src` to `dst` (copies where links fail, e.g. across filesystems), atomically through
    a tagged temporary: `dst` appears whole or not at all, and a killed copy's leftover is a dead temporary."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = dst.parent / f"{temp_prefix(dst.name)}link.tmp"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=link)
        else:
            link(str(src), str(tmp))
        os.replace(tmp, dst)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole, on failure it is removed.

    An existing `path` must be empty or marked as crossroute's (check_output_dir) unless `force`; the new directory
    gets the marker. A full or read-only disk is one CrossrouteError naming `path`. Dead siblings' temporaries of
    `path` (a killed save) are removed first."""
    path = Path(path)
    check_output_dir(path, force)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            _finish_dir(tmp)
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
