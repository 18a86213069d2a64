"""Report section: the run's domains, what each tests, and an example."""

from __future__ import annotations

from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.domains.files import get_domain
from crossroute.report.html import section, table
from crossroute.report.registry import register_section


@register_section("domains", 10)
def render(run: RunDir) -> str | None:
    ev = run.read_result("eval") or run.read_result("eval_base")
    if ev is None:
        return None
    rows = []
    for name, detail in ev["details"].items():
        desc = detail.get("description")
        if not desc:
            try:
                desc = get_domain(name).description
            except CrossrouteError:
                desc = "(not resolvable here)"
        sample = (detail.get("samples") or [{}])[0]
        rows.append([name, desc, sample.get("prompt", ""), sample.get("reference", "")])
    return section("Domains", table(["domain", "what it tests", "example prompt", "reference"], rows))
