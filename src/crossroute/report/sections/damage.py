"""Report section: damage of an earlier domain by later updates."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section


def _f(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else format(float(v), fmt)


def render_damage_section(result: dict) -> str:
    """HTML <section>: decomposition bars, top-unit table, conflict subspaces (eigenvalues, shares vs baselines)."""
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
        parts.extend(_conflict_parts(c, a))
    parts.append("</section>")
    return "\n".join(parts)


SHARE_RS: tuple[int, ...] = (1, 5, 10, 20)


def _at(xs: list | None, r: int) -> Any:
    return xs[r - 1] if xs and 0 < r <= len(xs) else None


def _conflict_parts(c: dict, a: str) -> list[str]:
    """The conflict subspace of one later domain: text, share table and the eigenvalue / share plot."""
    from matplotlib.figure import Figure

    from crossroute.report.html import table
    from crossroute.report.plots import fig_to_img_tag

    b = html.escape(str(c.get("domain_b", "")))
    ns = c.get("n_shared") or {}
    top, bot = c.get("eigenvalues_top") or [], c.get("eigenvalues_bottom") or []
    res = (c.get("residuals_top") or []) + (c.get("residuals_bottom") or [])
    n_conv = sum(c.get("converged_top") or []) + sum(c.get("converged_bottom") or [])
    hvp, secs = c.get("n_hvp") or {}, c.get("seconds") or {}
    r90 = c.get("r90")
    r90_txt = f"<b>{r90}</b>" if r90 is not None else f"– ({html.escape(str(c.get('r90_reason', '')))})"
    parts = [f"<h3>Conflict subspace {a} / {b}</h3><p>H<sub>{a}</sub> restricted to the units active for "
             f"both {a} and {b} (" + ", ".join(f"{v} {k}" for k, v in ns.items())
             + f"; {c.get('n_params')} parameters). Its {c.get('k_top')} largest and {c.get('k_bottom')} smallest "
             "eigenpairs by thick-restart Lanczos from a seeded random start (independent of δ): "
             f"{n_conv} of {len(res)} within ‖Hv − λv‖/|λ| ≤ {_f(c.get('tol'), '.0e')} "
             f"(max residual {_f(max(res) if res else None, '.1e')}). "
             f"δᵀHδ = {_f(c.get('dHd'))} (exact), of which δᵀH₊δ ≈ {_f(c.get('dHd_pos_est'))} and "
             f"δᵀH₋δ ≈ {_f(c.get('dHd_neg_est'))} (Gauss–Lanczos quadrature, {c.get('quad_steps')} steps). "
             "Projected share (P<sub>r</sub>δ)ᵀH(P<sub>r</sub>δ) / δᵀHδ for the top-r eigendirections, r random "
             "directions and δ's r largest-|δ| entries; r for 90 % (top-r eigendirections, converged pairs only): "
             f"{r90_txt}. {hvp.get('total', '–')} HVPs, {_f(secs.get('total'), '.1f')} s.</p>"]
    rows = [[f"r = {r}", _f(_at(c.get("share_eig"), r), ".3g"), _f(_at(c.get("share_random"), r), ".3g"),
             _f(_at(c.get("share_top_abs_delta"), r), ".3g"), _f(_at(c.get("pos_share"), r), ".3g"),
             _f(_at(c.get("neg_share"), r), ".3g")] for r in SHARE_RS if _at(c.get("share_eig"), r) is not None]
    if rows:
        parts.append(table(["", "eigen (top r)", "random r-dim", "top-r |δ| entries",
                            "of δᵀH₊δ (top r)", "of δᵀH₋δ (bottom r)"], rows))
    if top or bot:
        fig = Figure(figsize=(7.5, 3.0))
        ax1 = fig.add_subplot(1, 2, 1)
        ax1.plot(range(1, len(top) + 1), top, marker="o", label="largest")
        ax1.plot(range(1, len(bot) + 1), bot, marker="s", label="smallest")
        ax1.axhline(0, color="black", lw=0.6)
        ax1.set_xlabel("i")
        ax1.set_ylabel("λ_i")
        ax1.set_title("eigenvalues, both ends")
        ax1.legend(fontsize=7)
        ax2 = fig.add_subplot(1, 2, 2)
        for key, label in (("share_eig", "top-r eigenvectors"), ("share_random", "random r-dim"),
                           ("share_top_abs_delta", "top-r |δ| entries")):
            ys = c.get(key) or []
            ax2.plot(range(1, len(ys) + 1), ys, marker=".", label=label)
        ax2.axhline(0.9, color="gray", ls="--", lw=0.8)
        ax2.set_xlabel("r")
        ax2.set_title("projected share of δᵀHδ")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        parts.append(fig_to_img_tag(fig, f"conflict subspace {a}/{b}"))
    return parts


@register_section("damage", 80)
def render(run: RunDir) -> str | None:
    return per_result(run, "damage", render_damage_section)
