"""Report section: damage of an earlier domain by later updates."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section


def _f(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else format(float(v), fmt)


def render_damage_section(result: dict) -> str:
    """HTML <section>: decomposition bars, Lanczos eigenvalues + cumulative share, top-unit table."""
    from matplotlib.figure import Figure

    from crossroute.report.html import table
    from crossroute.report.plots import fig_to_img_tag

    a = html.escape(str(result.get("domain", "")))
    parts = [f"<section class=\"damage\"><h2>Damage to {a}: second-order decomposition</h2>",
             f"<p>Loss change of {a}'s proxy loss (mean answer NLL over {result.get('n')} "
             f"{html.escape(str(result.get('split', '')))} examples) from "
             f"<code>{html.escape(str(result.get('before', '')))}</code> to "
             f"<code>{html.escape(str(result.get('after', '')))}</code>: measured vs "
             "g<sub>A</sub>ᵀδ + ½ δᵀH<sub>A</sub>δ (one Hessian-vector product, eager attention, "
             f"fp32). |δ| = {_f(result.get('delta_norm'))}.</p>"]
    labels = ["measured", "first order", "second order", "error"]
    vals = [result.get("measured"), result.get("first_order"), result.get("second_order"),
            result.get("error")]
    fig = Figure(figsize=(5.5, 3.0))
    ax = fig.add_subplot()
    ys = [0.0 if v is None else float(v) for v in vals]
    ax.bar(labels, ys, color=["#444", "#4c72b0", "#dd8452", "#999"])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("Δ loss")
    ax.set_title(f"{result.get('domain')}: L(after) − L(before)")
    parts.append(fig_to_img_tag(fig, "damage decomposition"))
    parts.append(table(["term", "value"], [[lab, _f(v)] for lab, v in zip(labels, vals,
                                                                            strict=True)]
                       + [["attribution sum", _f(result.get("attribution_sum"))],
                          ["|error| / |measured|", _f(result.get("rel_error"), ".3f")]]))
    share = result.get("top_share") or {}
    totals = result.get("kind_totals") or {}
    parts.append("<h3>How concentrated is the damage?</h3><p>Per-unit attribution δ<sub>u</sub>ᵀ"
                 "(g + ½Hδ)<sub>u</sub> over " + str(result.get("n_units", "")) + " units "
                 "(neurons, heads, KV groups, other tensors); share of the first + second order "
                 "total carried by the top p % (ranked by attribution). Per kind: "
                 + ", ".join(f"{html.escape(k)} {_f(v)}" for k, v in totals.items()) + ".</p>")
    parts.append(table(["top units", "share of total"],
                       [[f"{p} %", _f(v, ".3f")] for p, v in share.items()]))
    top = result.get("top_units") or []
    if top:
        parts.append(table(["unit", "kind", "damage"],
                           [[u["unit"], u["kind"], _f(u["damage"])] for u in top[:10]]))
    for c in result.get("conflict") or []:
        ev = c.get("eigenvalues") or []
        b = html.escape(str(c.get("domain_b", "")))
        ns = c.get("n_shared") or {}
        parts.append(f"<h3>Conflict subspace {a} / {b}</h3><p>Lanczos ({c.get('k')} steps, full "
                     f"reorthogonalisation) on H<sub>{a}</sub> restricted to the units active for "
                     f"both {a} and {b} (" + ", ".join(f"{v} {k}" for k, v in ns.items())
                     + f"; {c.get('n_params')} parameters), started from δ restricted there. "
                     f"Restricted damage ½δᵀHδ = {_f(c.get('second_order'))}; r for 90 %: "
                     f"<b>{c.get('r90') if c.get('r90') is not None else '–'}</b>.</p>")
        if ev:
            fig = Figure(figsize=(6.5, 3.0))
            ax1 = fig.add_subplot(1, 2, 1)
            ax1.plot(range(1, len(ev) + 1), ev, marker="o")
            ax1.set_xlabel("i")
            ax1.set_ylabel("λ_i (Ritz)")
            ax1.set_title("eigenvalues")
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.plot(range(1, len(ev) + 1), c.get("cumulative") or [], marker="o")
            ax2.axhline(0.9, color="gray", ls="--", lw=0.8)
            ax2.set_xlabel("r")
            ax2.set_title("cumulative share of ½δᵀHδ")
            fig.tight_layout()
            parts.append(fig_to_img_tag(fig, f"conflict subspace {a}/{b}"))
    parts.append("</section>")
    return "\n".join(parts)


@register_section("damage", 80)
def render(run: RunDir) -> str | None:
    return per_result(run, "damage", render_damage_section)
