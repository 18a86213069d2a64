"""Report section: head circuits on the base model's scale, their CIs, and differential vulnerability RL vs SFT."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section

TOP_HEADS = 8  # rows of the per-head table beyond the circuit-size cap


def _sym(matrices: list[list[list[float | None]]]) -> float:
    vals = [abs(v) for m in matrices for row in m for v in row if v is not None and v == v]
    return max(max(vals, default=0.0), 1e-9)


def fmt_ci(d: dict[str, Any] | None, pct: bool = False, p: bool = False) -> str:
    """'0.45 [0.30, 0.61]' for a {value, lo, hi} dict ('45 % [30, 61]' with pct; ' p=…' with p); '–' if undefined."""
    if not d or d.get("value") is None:
        return "–"
    k, unit = (100.0, " %") if pct else (1.0, "")
    lo, hi = d.get("lo"), d.get("hi")
    out = f"{k * d['value']:.3g}{unit}" if pct else f"{d['value']:.3f}"
    if lo is not None and hi is not None:
        out += f" [{k * lo:.3g}, {k * hi:.3g}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    if p and d.get("p") is not None:
        out += f" p={d['p']:.3g}"
    return out


def _cell(value: float | None, lo: float | None, hi: float | None) -> str:
    return fmt_ci({"value": value, "lo": lo, "hi": hi})


def circuit_size(r: dict[str, Any]) -> str:
    """'4 / cap 4 (cap binds; target not reached)' for one model's circuit."""
    note = "target reached" if r["target_reached"] else ("cap binds; target not reached" if r["cap_binds"]
                                                           else "target not reached")
    return f"{len(r['circuit'])} / cap {r['max_heads']} ({note})"


def _summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for m, r in result["models"].items():
        sp = (r.get("attribution_vs_activation") or {}).get("spearman")
        ov = result["overlap"].get(m)
        rows.append([m, r["metric_clean"], r["metric_corrupted"], fmt_ci(r["gap_ci"]), fmt_ci(r["capability"]),
                     circuit_size(r), fmt_ci(r["faithfulness_ci"]), fmt_ci(result["retention"].get(m), pct=True),
                     fmt_ci(result["base_circuit_faithfulness"].get(m)), "–" if ov is None else f"{100 * ov:.0f} %",
                     "–" if sp is None else f"{sp:.2f}"])
    return rows


def _head_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The base's top-ranked heads: raw effect and base-scale score [CI] in every model."""
    models = result["models"]
    base = models["base"]
    heads = base["ranking"][: max(TOP_HEADS, base["max_heads"])]
    header = ["head", "in base circuit"]
    for m in models:
        header += [f"effect {m}", f"s_h {m} [95% CI]"]
    rows = []
    for u in heads:
        layer, h = int(u[1:u.index(".")]), int(u.rsplit(".", 1)[1])
        row: list[Any] = [u, "yes" if u in base["circuit"] else "no"]
        for r in models.values():
            row += [f"{r['effect'][layer][h]:+.4f}",
                    _cell(r["score"][layer][h], r["score_lo"][layer][h], r["score_hi"][layer][h])]
        rows.append(row)
    return header, rows


def _intro(result: dict[str, Any]) -> str:
    return (f"<p>{result['pairs']['n']} clean/corrupted pairs ({html.escape(str(result['pairs']['rule']))}). "
            f"Metric: {html.escape(result['metric'])}. Normalisation: {html.escape(result['normalisation'])}. "
            f"Head score s<sub>h</sub> = −(raw effect of patching head h alone) / base gap (activation patching "
            f"for the top heads, attribution patching for the rest). Faithfulness: "
            f"{html.escape(result['faithfulness_definition'])}. Circuit: target F ≥ {result['target']:g} of the base "
            f"gap, cap {100 * result['max_fraction']:.0f} % of the heads. Retention: "
            f"{html.escape(result['retention_definition'])}. CIs: {html.escape(result['ci_method'])}.</p>")


def _units(result: dict[str, Any]) -> str:
    units, layout = result.get("units") or {}, result["layout"]
    if not units.get("arch"):
        return ""
    hl = units.get("head_layout") or {}
    return (f"<p>Unit table: <code>{html.escape(str(units['arch']))}</code> (model_type "
            f"{html.escape(str(units.get('model_type')))}); {layout['num_layers']} layers x "
            f"{layout['num_heads']} heads (head_dim {layout.get('head_dim', hl.get('head_dim', '?'))}, "
            f"{hl.get('num_key_value_heads', '?')} KV groups); a head's output is its slice of the "
            "attention output projection's input.</p>")


def _rl_vs_sft(result: dict[str, Any], rows_l: list[str], cols_h: list[str]) -> list[str]:
    from crossroute.report.html import table
    from crossroute.report.plots import heatmap

    dv = result.get("differential_vulnerability")
    if dv is None:
        return []
    rl, sft = html.escape(str(result["rl"])), html.escape(str(result["sft"]))
    parts = [f"<p>Retention {rl} − {sft} (paired over prompts): {fmt_ci(result.get('retention_difference'), p=True)}"
             "</p>"]
    v = _sym([dv])
    parts.append(heatmap(dv, rows_l, cols_h, f"differential vulnerability s_h({result['rl']}) − s_h({result['sft']})"
                         " (base scale)", -v, v, "RdBu"))
    vul = result.get("vulnerable") or []
    if not vul:
        return [*parts, f"<p>No vulnerable heads at delta {result['delta']:g}.</p>"]
    parts.append(f"<h3>Vulnerable heads (s_h({sft}) &lt; s_h({rl}) − {result['delta']:g}, base scale)</h3>")
    parts.append(table(["head", "s_base", f"s_{rl}", f"s_{sft}", "s_rl − s_sft [95% CI]", "p",
                        f"raw effect {rl}", f"raw effect {sft}", "in base circuit"],
                       [[x["head"], x["s_base"], x["s_rl"], x["s_sft"],
                         _cell(x["differential_vulnerability"], x["lo"], x["hi"]), f"{x['p']:.3g}",
                         f"{x['raw_effect_rl']:+.4f}", f"{x['raw_effect_sft']:+.4f}",
                         "yes" if x["in_base_circuit"] else "no"] for x in vul]))
    return parts


def render_circuits_section(result: dict[str, Any]) -> str:
    """HTML <section>: summary with CIs, faithfulness curves, per-head table and heat maps (base scale)."""
    from crossroute.report.html import line_plot, table
    from crossroute.report.plots import heatmap

    dom = html.escape(str(result["domain"]))
    if "normalisation" not in result:
        return (f"<section><h2>Circuits: {dom}</h2><p>This result was written before head scores were put on the "
                "base model's scale (each model's own gap inflated collapsed capabilities); rerun "
                "<code>crossroute circuits</code>.</p></section>")
    models: dict[str, dict[str, Any]] = result["models"]
    layout = result["layout"]
    rows_l = [f"L{i}" for i in range(layout["num_layers"])]
    cols_h = [f"h{h}" for h in range(layout["num_heads"])]
    parts = [f"<section><h2>Circuits: {dom}</h2>", _intro(result), _units(result)]
    parts.append(table(["model", "m(clean)", "m(corrupted)", "own gap [95% CI]", "gap / base gap",
                        "|circuit| / cap", "F(circuit), base scale", "retention of base circuit", "F(base circuit)",
                        "overlap with base circuit", "attr~act Spearman"], _summary_rows(result)))
    for m, r in models.items():
        for w in r.get("warnings") or []:
            parts.append(f"<p><b>{html.escape(m)}</b>: {html.escape(w)}</p>")
    total = layout["num_layers"] * layout["num_heads"]
    ks = sorted({k for r in models.values() for k in r["curve_k"]})  # a stopped curve holds fewer prefix sizes
    series = {}
    for m, r in models.items():
        at = dict(zip(r["curve_k"], r["curve_faithfulness"], strict=True))
        series[m] = [float("nan") if at.get(k) is None else at[k] for k in ks]
    stopped = any(r.get("curve_truncated") for r in models.values())
    note = "; evaluated until the circuit is decided, then k = all heads (the clean run)" if stopped else ""
    parts.append(line_plot([str(k) for k in ks], series, f"faithfulness of the top-k heads, base scale ({total} heads; "
                           f"cap {models['base']['max_heads']}{note})", "F"))
    for m, r in models.items():
        parts.append(f"<p><b>{html.escape(m)}</b> circuit ({circuit_size(r)}): "
                     f"{html.escape(', '.join(r['circuit']) or '(empty)')}</p>")
    header, rows = _head_rows(result)
    parts.append("<h3>Top heads of the base: raw effect (m_patched − m_clean) and base-scale score</h3>")
    parts.append(table(header, rows))
    v = _sym([r["score"] for r in models.values()])
    for m, r in models.items():
        parts.append(heatmap(r["score"], rows_l, cols_h, f"{m}: head score s_h, base scale ({result['domain']})",
                             -v, v, "RdBu"))
    if result.get("score_shift"):
        v = _sym(list(result["score_shift"].values()))
        for m, d in result["score_shift"].items():
            parts.append(heatmap(d, rows_l, cols_h, f"score shift {m} − base (base scale)", -v, v, "RdBu"))
    parts += _rl_vs_sft(result, rows_l, cols_h)
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


@register_section("circuits", 110)
def render(run: RunDir) -> str | None:
    return per_result(run, "circuits", render_circuits_section)
