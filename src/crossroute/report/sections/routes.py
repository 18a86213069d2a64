"""Report section: active routes and their overlap with changed units."""

from __future__ import annotations

import html
from typing import Any

from crossroute.analyze.routes import SET_KINDS, changed_vs_active_table, top_changed_sets, top_count
from crossroute.core.rundir import RunDir
from crossroute.report.registry import register_section


def _mean_off_diagonal(m: list[list[float]]) -> float | None:
    vals = [m[i][j] for i in range(len(m)) for j in range(len(m)) if i != j]
    return sum(vals) / len(vals) if vals else None


_WHAT = {"neuron": "MLP neuron: mean |activation| at the input of the down projection",
         "head": "attention head: mean output norm of its slice of the attention output projection's input",
         "kv": "KV group: active when one of its query heads is",
         "router": "MoE expert (sparse layers): mean routing probability, softmax of the router logits"}
_LAYOUT_KEY = {"neuron": "intermediate_size", "head": "num_heads", "router": "num_experts"}


def _kinds(results: dict) -> list[str]:
    """The kinds present in a routes.json, in SET_KINDS order (then any others, in file order)."""
    present = list(results.get("kinds") or []) or list(results.get("jaccard") or {}) or [
        k for s in (results.get("active") or {}).values() for k in s]
    seen = [k for k in SET_KINDS if k in present]
    return seen + [k for k in dict.fromkeys(present) if k not in seen]


def render_routes_section(results: dict, diff: dict | None = None) -> str:
    """HTML <section>: active-set Jaccard across domains, per layer, and changed-vs-active (every kind present)."""
    from crossroute.report.plots import heatmap

    doms: list[str] = results["domains"]
    q = results.get("q", 10.0)
    tokens = results.get("tokens", {})
    kinds = _kinds(results)
    n, split = html.escape(str(results.get("n", ""))), html.escape(str(results.get("split", "")))
    what = "; ".join(html.escape(_WHAT.get(k, k)) for k in kinds if k != "kv")
    parts = ["<section class=\"routes\"><h2>Active routes</h2>",
             f"<p>A unit is <i>active</i> for a domain when it is in the top {q:g} % of its layer "
             f"by its activity ({what}), over "
             f"{n} {split} prompts followed by their reference answers (tokens: "
             + ", ".join(f"{html.escape(d)} {tokens.get(d, 0)}" for d in doms) + ")."
             + (" KV groups: active when one of their query heads is." if "kv" in kinds else "") + "</p>"]
    units = results.get("units") or {}
    if units.get("arch"):
        parts.append(f"<p>Unit table: <code>{html.escape(str(units['arch']))}</code> "
                     f"(model_type {html.escape(str(units.get('model_type')))}).</p>")
    for note in results.get("notes") or []:
        parts.append(f"<p><i>{html.escape(str(note))}</i></p>")
    jac = results.get("jaccard", {})
    summary = []
    for kind in kinds:
        if kind in jac and len(doms) > 1:
            mean = _mean_off_diagonal(jac[kind])
            summary.append(f"{kind}s {mean:.2f}" if mean is not None else kind)
    if summary:
        base = [f"{kind}s {p / (2 - p):.2f}" for kind in kinds
                if (p := _active_share(results, kind)) is not None]
        parts.append("<p>Mean active-set Jaccard across domain pairs: " + ", ".join(summary)
                     + (" (two random sets of the same sizes: " + ", ".join(base) + ")" if base else "") + ".</p>")
    for kind in kinds:
        if kind in jac:
            parts.append(heatmap(jac[kind], doms, doms,
                                 f"Jaccard of active {kind} sets (top {q:g} %)"))
    lj = results.get("layer_jaccard", {})
    for kind in kinds:
        pairs = lj.get(kind) or {}
        if pairs:
            names = list(pairs)
            n_layers = len(next(iter(pairs.values())))
            matrix = [[pairs[p][i] for p in names] for i in range(n_layers)]
            parts.append(heatmap(matrix, [f"L{i}" for i in range(n_layers)],
                                 [p.replace("|", " / ") for p in names],
                                 f"per-layer Jaccard of active {kind} sets"))
    rows = results.get("changed_vs_active") or []
    if not rows and diff is not None:
        active = {d: {k: set(v) for k, v in s.items()} for d, s in results["active"].items()}
        rows = changed_vs_active_table(top_changed_sets(diff), active)
    if rows:
        parts.append(_changed_table(rows, {k: _active_share(results, k) for k in kinds}))
    parts.append("</section>")
    return "\n".join(parts)


def _active_share(results: dict, kind: str) -> float | None:
    """Share of a layer's units that are active (top_count / size), from the stored layout (None for kv)."""
    layout = results.get("layout") or {}
    key = _LAYOUT_KEY.get(kind)
    size = (layout.get(key) or 0) if key else 0
    return top_count(size, results.get("q", 10.0)) / size if size else None


def _changed_table(rows: list[dict[str, Any]], share: dict[str, float | None]) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    body = "".join(
        ("<tr style=\"font-weight:bold\">" if r["own"] else "<tr>")
        + f"<td>{html.escape(r['stage'])}</td><td>{html.escape(r['domain'])}</td>"
        f"<td>{r['kind']}</td><td>{r['n_changed']}</td><td>{r['n_active']}</td>"
        f"<td>{r['intersection']}</td><td>{f(r['share_of_changed'])}</td>"
        f"<td>{f(r['jaccard'])}</td></tr>" for r in rows)
    return ("<h3>Top-changed units vs active routes</h3>"
            "<p>For each stage's top-changed units (from the update anatomy) and each domain's "
            "active set: |changed ∩ active| / |changed| (for random units: "
            + ", ".join(f"{k}s {v:.2f}" for k, v in share.items() if v is not None)
            + ") and the Jaccard. Bold: the stage's own domain.</p>"
            "<table><thead><tr><th>stage</th><th>domain</th><th>kind</th><th>|changed|</th>"
            "<th>|active|</th><th>|∩|</th><th>|∩|/|changed|</th><th>Jaccard</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


@register_section("routes", 60)
def render(run: RunDir) -> str | None:
    res = run.read_result("routes")
    return None if res is None else render_routes_section(res, run.read_result("diff"))
