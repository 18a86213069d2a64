"""`crossroute demo`: the whole pipeline on the embedded default, each stage resuming if already done."""

from __future__ import annotations

from pathlib import Path

from .domains import BUILTIN, DEFAULT_DOMAINS
from .evaluate import evaluate_all, scores_json
from .model import DEFAULT_CHECKPOINT, load_model
from .progress import console
from .report import build_report
from .rundir import open_run


def run_demo(out: Path, n: int = 100) -> Path:
    """Evaluate the shipped default, run the later stages, and write the report; returns the report path."""
    run = open_run(out, {"model": "default", "domains": list(DEFAULT_DOMAINS), "n": n}, kind="demo")
    if run.read_result("eval") is None:
        loaded = load_model(DEFAULT_CHECKPOINT)
        scores = evaluate_all(loaded.model, loaded.tokenizer, [BUILTIN[d] for d in DEFAULT_DOMAINS], n=n,
                              show_progress=True)
        run.write_result("eval", {"model": "default", **scores_json(scores)})
        console.print({k: v.score for k, v in scores.items()})
    path = build_report(run.root)
    console.print(f"report: {path}")
    return path
