"""The run directory convention: run.yaml (resolved config), checkpoints/<stage>/, results/*.json.

Everything the report draws comes from these files; every write is atomic (temp file + rename).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crossroute.core.atomic import atomic_write_json, atomic_write_yaml
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

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

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
    """Create or reopen a run directory for `config`; refuse one that holds a different config."""
    run = RunDir(Path(path).expanduser())
    resolved = {"kind": kind, **config}
    existing = run.read_config()
    if existing is not None and existing != resolved:
        changed = sorted(k for k in set(existing) | set(resolved) if existing.get(k) != resolved.get(k))
        raise CrossrouteError(
            f"{run.config_path}: this run directory holds a different config (field "
            f"{changed[0]!r} differs); pass a new output directory or delete the old run."
        )
    if existing is None:
        # Only leftovers of an interrupted atomic write may be there (a run killed before its run.yaml).
        other = [p for p in run.root.iterdir() if not _is_temp(p)] if run.root.exists() else []
        if other:
            raise CrossrouteError(f"{run.root}: exists, is not empty and has no run.yaml; pick a new output "
                                  "directory.")
        atomic_write_yaml(run.config_path, resolved)  # first, so a directory with content always has one
    run.results.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    return run


def _is_temp(path: Path) -> bool:
    """A temporary file or directory of crossroute.atomic (`.NAME.*.tmp`), left by an interrupted write."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def load_run(path: str | Path) -> RunDir:
    """Open an existing run directory for reading (report, diff), refusing anything else."""
    run = RunDir(Path(path).expanduser())
    if not run.config_path.exists():
        raise CrossrouteError(f"{run.root}: not a crossroute run directory (no run.yaml); pass the --out of a run.")
    return run
