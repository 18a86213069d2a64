"""Report section: held-out scores of one evaluation with samples."""

from __future__ import annotations

import html

from crossroute.core.rundir import RunDir
from crossroute.report.html import section, table
from crossroute.report.registry import register_section


@register_section("eval", 20)
def render(run: RunDir) -> str | None:
    ev = run.read_result("eval") or run.read_result("eval_base")
    if ev is None:
        return None
    rows = [[d, float(s), ev["details"][d]["n"]] for d, s in ev["scores"].items()]
    samples = []
    for d, detail in ev["details"].items():
        for s in detail.get("samples", [])[:3]:
            samples.append([d, s["prompt"], s["reference"], s["completion"], float(s["score"])])
    model = ev.get("model") or ev.get("checkpoint", "")
    body = f"<p>Model: <code>{html.escape(str(model))}</code>; greedy decoding, held-out split.</p>"
    body += table(["domain", "score [0-100]", "n"], rows)
    body += "<h3>Samples</h3>" + table(["domain", "prompt", "reference", "completion", "score"], samples)
    return section("Evaluation", body)
