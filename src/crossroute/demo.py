"""`crossroute demo`: the whole pipeline on the embedded default, each part resuming if already done."""

from __future__ import annotations

import time
from pathlib import Path

from .model import ASSETS
from .progress import console
from .report import build_report
from .train import load_train_config, run_training

DEMO_CONFIG = ASSETS / "demo_sequence.yaml"  # identical to configs/default_sequence.yaml (a test checks)


def run_demo(out: Path, eval_n: int | None = None) -> Path:
    """Sequence + refresh on the shipped default, then the report; returns the report path."""
    from .cli import print_forgetting

    cfg = load_train_config(DEMO_CONFIG)
    if eval_n is not None:
        cfg.eval_n = eval_n
    t0 = time.perf_counter()
    result = run_training(cfg, out)
    print_forgetting(result)
    console.print(f"sequence + refresh: {time.perf_counter() - t0:.0f} s")
    path = build_report(out)
    console.print(f"report: {path}")
    return path
