"""Report section: head circuits and differential vulnerability RL vs SFT."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section


def _sym(matrices: list[list[list[float]]]) -> float:
    vals = [abs(v) for m in matrices for row in m for v in row if v is not None and v == v]
    return max(max(vals, default=0.0), 1e-9)


def render_circuits_section(result: dict[str, Any]) -> str:
    """HTML <section>: summary table, faithfulness curves, per-layer head-score heat maps."""
    from crossroute.report.html import line_plot, table
    from crossroute.report.plots import heatmap

    dom = html.escape(str(result["domain"]))
    models: dict[str, dict[str, Any]] = result["models"]
    layout = result["layout"]
    rows_l = [f"L{i}" for i in range(layout["num_layers"])]
    cols_h = [f"h{h}" for h in range(layout["num_heads"])]
    parts = [f"<section><h2>Circuits: {dom}</h2>",
             f"<p>{result['pairs']['n']} clean/corrupted pairs ({html.escape(str(result['pairs']['rule']))}). "
             f"Metric: {html.escape(result['metric'])}. "
             f"Faithfulness: {html.escape(result['faithfulness_definition'])}. "
             f"Head score s<sub>h</sub> = share of the clean−corrupted gap lost when head h alone is patched "
             f"(activation patching for the top heads, attribution patching for the rest). Circuit = smallest "
             f"top-ranked prefix with F ≥ {result['target']:g}.</p>"]
    units = result.get("units") or {}
    if units.get("arch"):
        hl = units.get("head_layout") or {}
        parts.append(f"<p>Unit table: <code>{html.escape(str(units['arch']))}</code> (model_type "
                     f"{html.escape(str(units.get('model_type')))}); {layout['num_layers']} layers x "
                     f"{layout['num_heads']} heads (head_dim {layout.get('head_dim', hl.get('head_dim', '?'))}, "
                     f"{hl.get('num_key_value_heads', '?')} KV groups); a head's output is its slice of the "
                     "attention output projection's input.</p>")
    rows = []
    for m, r in models.items():
        agree = r.get("attribution_vs_activation") or {}
        sp = agree.get("spearman")
        rows.append([m, r["metric_clean"], r["metric_corrupted"], r["gap"], len(r["circuit"]), r["faithfulness"],
                     "–" if result["retention"].get(m) is None else f"{100 * result['retention'][m]:.0f} %",
                     result["base_circuit_faithfulness"].get(m, float("nan")),
                     "–" if sp is None else f"{sp:.2f}"])
    parts.append(table(["model", "m(clean)", "m(corrupted)", "gap", "|circuit|", "F(circuit)",
                        "base circuit retained", "F(base circuit)", "attr~act Spearman"], rows))
    for m, r in models.items():
        for w in r.get("warnings") or []:
            parts.append(f"<p><b>{html.escape(m)}</b>: {html.escape(w)}</p>")
    total = layout["num_layers"] * layout["num_heads"]
    series = {m: r["curve_faithfulness"] for m, r in models.items()}
    ks = next(iter(models.values()))["curve_k"]
    parts.append(line_plot([str(k) for k in ks], series, f"faithfulness of the top-k heads ({total} heads)", "F"))
    for m, r in models.items():
        parts.append(f"<p><b>{html.escape(m)}</b> circuit: {html.escape(', '.join(r['circuit']) or '(empty)')}</p>")
    v = _sym([r["score"] for r in models.values()])
    for m, r in models.items():
        parts.append(heatmap(r["score"], rows_l, cols_h, f"{m}: head score s_h ({result['domain']})", -v, v, "RdBu"))
    if result.get("score_shift"):
        v = _sym(list(result["score_shift"].values()))
        for m, d in result["score_shift"].items():
            parts.append(heatmap(d, rows_l, cols_h, f"score shift {m} − base", -v, v, "RdBu"))
    dv = result.get("differential_vulnerability")
    if dv is not None:
        v = _sym([dv])
        parts.append(heatmap(dv, rows_l, cols_h, f"differential vulnerability s_h({result['rl']}) − "
                             f"s_h({result['sft']})", -v, v, "RdBu"))
        vul = result.get("vulnerable") or []
        if vul:
            parts.append(f"<h3>Vulnerable heads (s_h(SFT) &lt; s_h(RL) − {result['delta']:g})</h3>")
            parts.append(table(["head", "s_base", "s_rl", "s_sft", "s_rl − s_sft", "in base circuit"],
                               [[x["head"], x["s_base"], x["s_rl"], x["s_sft"], x["differential_vulnerability"],
                                 "yes" if x["in_base_circuit"] else "no"] for x in vul]))
        else:
            parts.append(f"<p>No vulnerable heads at delta {result['delta']:g}.</p>")
    parts.append("</section>")
    return "\n".join(parts)


@register_section("circuits", 110)
def render(run: RunDir) -> str | None:
    return per_result(run, "circuits", render_circuits_section)
