"""A training trajectory: the intermediate checkpoints an RL engine or HF trainer wrote into one directory
(`checkpoint-N/`, `global_step_N/`, `step_N/`, `iter_N/`), in step order, for a per-interval diff."""

from __future__ import annotations

import re
from pathlib import Path

from crossroute.core.errors import CrossrouteError

STEP_DIR = re.compile(r"^(?:checkpoint|global_step|step|iter)[-_]?(\d+)$")


def trajectory(root: str | Path) -> list[tuple[int, Path]]:
    """(step, checkpoint dir) of every step folder under `root` that holds a Hugging Face checkpoint (config.json),
    sorted by step; a step folder without one is refused, naming the converter to run (docs/checkpoints.md)."""
    root = Path(root).expanduser()
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = STEP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        if not (p / "config.json").exists():
            raise CrossrouteError(f"{p}: a step folder without config.json (an engine's sharded checkpoint?); turn it "
                                  "into a Hugging Face directory with the engine's own converter (docs/checkpoints.md)"
                                  " and diff those.")
        found.append((int(m.group(1)), p))
    found.sort()
    steps = [s for s, _ in found]
    if len(set(steps)) != len(steps):
        dup = next(s for s in steps if steps.count(s) > 1)
        raise CrossrouteError(f"{root}: two step folders for step {dup}; keep one.")
    return found


def is_trajectory(root: str | Path) -> bool:
    """Whether `root` is a folder of step checkpoints rather than a checkpoint or a run directory."""
    root = Path(root).expanduser()
    return (root.is_dir() and not (root / "config.json").exists() and not (root / "run.yaml").exists()
            and any(STEP_DIR.match(p.name) and p.is_dir() for p in root.iterdir()))
