"""Report section: gradient conflict per module."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import register_section, result_files


def _short(pick: dict[str, Any]) -> str:
    """"L3.gate" for a module of the layer × module grid (its layer and module label), else its name."""
    if not pick.get("module"):
        return "–"
    layer, kind = pick.get("layer"), pick.get("kind")
    return f"L{layer}.{kind}" if isinstance(layer, int) and layer >= 0 and kind else str(pick["module"])


def render_conflict_section(results: list[dict]) -> str:
    """HTML <section>: per pair the global cosine, named extremes, a layer × module heat map."""
    from crossroute.report.plots import heatmap

    parts = ["<section class=\"conflict\"><h2>Module-level gradient conflict</h2>",
             "<p>Gradients of each domain's proxy loss (mean NLL of the reference answers) at one "
             "checkpoint, in fp32. cos &lt; 0: the module is pulled in opposite directions "
             "(conflict); cos &gt; 0: synergy. Per-module conflicts and synergies can cancel in "
             "the global cosine.</p>"]
    rows = []
    for r in results:
        worst, best = r.get("most_conflicting") or {}, r.get("most_synergistic") or {}
        dots = r.get("dot_split") or {}
        rows.append(
            f"<tr><td>{html.escape(r['domain_a'])} vs {html.escape(r['domain_b'])}</td>"
            f"<td>{_num(r.get('global_cosine'))}</td>"
            f"<td>{html.escape(_short(worst))} ({_num(worst.get('cosine'))})</td>"
            f"<td>{html.escape(_short(best))} ({_num(best.get('cosine'))})</td>"
            f"<td>{_num(dots.get('positive'), '.3g')} / {_num(dots.get('negative'), '.3g')}</td>"
            "</tr>")
    parts.append("<table><thead><tr><th>pair</th><th>global cos</th><th>most conflicting</th>"
                 "<th>most synergistic</th><th>Σ dot + / −</th></tr></thead><tbody>"
                 + "".join(rows) + "</tbody></table>")
    for r in results:
        matrix = r.get("matrix") or []
        kinds = r.get("module_kinds") or []
        if not matrix or not kinds:
            continue
        parts.append(heatmap(matrix, [f"L{i}" for i in range(len(matrix))], kinds,
                             f"cos(g_{r['domain_a']}, g_{r['domain_b']}) per module "
                             f"(global {_num(r.get('global_cosine'))})",
                             vmin=-1.0, vmax=1.0, cmap="RdBu"))
    parts.append("</section>")
    return "\n".join(parts)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(float(v), fmt)


@register_section("conflict", 70)
def render(run: RunDir) -> str | None:
    results = [r for p in result_files(run, "conflict") if (r := run.read_result(p.stem)) is not None]
    return render_conflict_section(results) if results else None
