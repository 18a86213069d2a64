"""Report section of a multi-seed demo: every summary figure in each training seed, with its across-seed interval
as a plot, the cost of each part, and links to each seed's own report (its detailed sections)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.html import interval_plot, section, table
from crossroute.report.registry import register_section
from crossroute.report.sections.summary import DEMO_RESULT

TITLE = "Across training seeds: every figure per seed"


def _cell(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3g}"


def seed_table(rows: list[dict[str, Any]], seeds: list[int]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): one line per figure of the across-seed summary: claim key, figure, each seed's value, mean and
    interval, verdict."""
    header = ["claim", "figure", *[f"seed {k}" for k in seeds], "mean [95 % t-interval]", "verdict"]
    lines = []
    for r in rows:
        for e in r.get("estimates") or []:
            per = dict(zip(r.get("seeds") or seeds, e.get("per_seed") or [], strict=False))
            ci = f"{_cell(e['value'])} [{_cell(e['lo'])}, {_cell(e['hi'])}]"
            lines.append([r["key"], e["label"], *[_cell(per.get(k)) for k in seeds], ci, e["verdict"]])
    return header, lines


@register_section("seeds", 1)
def render(run: RunDir) -> str | None:
    demo = run.read_result(DEMO_RESULT)
    if not demo or not demo.get("summary"):
        return None
    seeds, rows = demo["seeds"], demo["summary"]
    body = (f"<p>{len(seeds)} training seeds, each a whole demo run (<code>seeds/&lt;k&gt;/</code>, with its own "
            f"report). Every figure is computed within each seed as that seed's report computes it; the summary "
            f"above gives their mean and 95 % t-interval ({len(seeds) - 1} degrees of freedom).</p>")
    body += "<p>" + " · ".join(f"<a href=\"{html.escape(str(Path(root).relative_to(run.root)))}/report.html\">seed "
                               f"{k}</a>" for k, root in zip(seeds, demo["roots"], strict=True)
                               if Path(root).is_relative_to(run.root)) + "</p>"
    plotted = [(f"{r['key']}: {e['label']}"[:48], {"value": e["value"], "lo": e["lo"], "hi": e["hi"]})
               for r in rows if r.get("unit", "").startswith("points") for e in r.get("estimates") or []
               if e.get("value") is not None]
    if plotted:
        body += interval_plot([p[0] for p in plotted], [p[1] for p in plotted],
                              "figures in points: mean and 95 % t-interval across seeds", "points")
    header, lines = seed_table(rows, seeds)
    body += table(header, lines)
    costs = demo.get("cost_per_part") or {}
    if costs:
        body += (f"<h3>Cost per part</h3><p>Wall time {demo.get('wall_seconds', 0):.0f} s on {demo.get('workers')} "
                 "one-thread process(es) over every invocation; a part's seconds summed over seeds and runs.</p>")
        body += table(["part", "seconds (all seeds)"], [[p, float(s)] for p, s in costs.items()])
    return section(TITLE, body)
