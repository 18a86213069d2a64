"""`crossroute report`: one self-contained HTML file per run, drawn only from its results/*.json.

Sections come from crossroute.report.registry (one module per section in report/sections); a section returns
None when its results are absent.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from crossroute.core.atomic import atomic_write_text
from crossroute.core.rundir import load_run
from crossroute.report import sections  # noqa: F401  (registers the built-in sections)
from crossroute.report.html import CSS, with_ids
from crossroute.report.registry import ordered


def build_report(run_dir: str | Path) -> Path:
    """Render every section whose results exist into RUN_DIR/report.html (atomic write)."""
    run = load_run(run_dir)
    parts = [with_ids(s) for sec in ordered() if (s := sec.render(run)) is not None]
    if not parts:
        parts = ["<p>No results yet in this run directory.</p>"]
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>crossroute report</title>"
        f"<style>{CSS}</style></head><body><h1>crossroute report</h1>"
        f"<p class='note'>Run <code>{html.escape(str(run.root))}</code>, generated "
        f"{time.strftime('%Y-%m-%d %H:%M')}.</p>" + "".join(parts) + "</body></html>"
    )
    atomic_write_text(run.report_path, doc)
    return run.report_path
