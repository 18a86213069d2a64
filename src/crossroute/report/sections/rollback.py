"""Report section: training-free rollback sweep."""

from __future__ import annotations

import html

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section


def render_rollback_section(result: dict) -> str:
    """HTML <section>: recovery vs fraction per selector (and variant), collateral table."""
    from matplotlib.figure import Figure

    from crossroute.report.html import ci_bars, table
    from crossroute.report.plots import fig_to_img_tag

    a = html.escape(str(result.get("domain", "")))
    others = result.get("others") or []
    points = result.get("points") or []
    now = result.get("score_now") or {}
    parts = [f"<section class=\"rollback\"><h2>Training-free rollback for {a}</h2>",
             f"<p>Units of <code>{html.escape(str(result.get('now', '')))}</code> set back to "
             f"<code>{html.escape(str(result.get('to', '')))}</code> (θ<sub>A</sub>), in place. "
             "Selectors at equal budget: <b>conflict</b> (damage attribution δ<sub>u</sub>ᵀ(g + "
             f"½Hδ)<sub>u</sub> to {a}, restricted to units active for {a} and a later domain), "
             "<b>random</b>, <b>magnitude</b> (largest ‖δ<sub>u</sub>‖). Recovery = (score − "
             f"now) / (peak − now) on {a}: now {now.get(result.get('domain'), float('nan')):.2f}, "
             f"peak {float(result.get('score_peak', float('nan'))):.2f} "
             f"(greedy, n = {result.get('eval_n')}).</p>"]
    excl = result.get("pool_excludes") or {}
    if excl:
        parts.append("<p>Each pool leaves at θ<sub>now</sub>: " + "; ".join(
            f"<b>{html.escape(v)}</b>: {html.escape(e)}" for v, e in excl.items()) + ".</p>")
    for variant in result.get("variants") or []:
        pts = [p for p in points if p["variant"] == variant]
        if not pts:
            continue
        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.add_subplot()
        gap = float(result.get("score_peak", float("nan"))) - float(now.get(result.get("domain"), float("nan")))
        for sel in result.get("selectors") or []:
            mine = [p for p in pts if p["selector"] == sel]
            xs = [p["fraction"] for p in mine]
            ys = [float("nan") if p["recovery"] is None else p["recovery"] for p in mine]
            ci = [(p.get("change") or {}).get(result.get("domain")) for p in mine]
            defined = all(c is not None and c.get("lo") is not None and c.get("hi") is not None for c in ci)
            if gap > 0 and defined:  # the paired CI of A's change, on the recovery scale
                yerr = ci_bars(ys, [c["lo"] / gap for c in ci], [c["hi"] / gap for c in ci])
                ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=sel)
            else:
                ax.plot(xs, ys, marker="o", label=sel)
        ax.set_xscale("log", base=2)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("units rolled back [% of pool]")
        ax.set_ylabel(f"recovery on {result.get('domain')}")
        label = "MLP neurons" if variant == "mlp" else "neurons + heads + KV groups"
        ax.set_title(f"{label} (pool {result.get('pool_sizes', {}).get(variant, '')}; bars: paired 95 % CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        parts.append(fig_to_img_tag(fig, f"rollback recovery ({variant})"))
    rows = [[p["variant"], p["selector"], f"{p['fraction']:g} %", p["n_units"], p["n_shared"],
             float(p["scores"].get(result.get("domain"), float("nan"))),
             "–" if p["recovery"] is None else f"{100 * p['recovery']:.1f} %",
             *[f"{p['collateral'].get(d, 0.0):+.2f}" for d in others]] for p in points]
    parts.append(table(["variant", "selector", "fraction", "units", "shared", f"{a} score",
                        "recovery", *[f"Δ {d}" for d in others]], rows))
    best = result.get("best")
    if best:
        rec = "–" if best.get("recovery") is None else f"{100 * best['recovery']:.1f} %"
        saved = best.get("saved_to")
        parts.append(f"<p>Best point: {html.escape(best['variant'])} / "
                     f"{html.escape(best['selector'])} at {best['fraction']:g} % "
                     f"({best['n_units']} units), recovery {rec}"
                     + (f", saved to <code>{html.escape(str(saved))}</code>" if saved else "")
                     + ". Seed paper: 2 % of MLP neurons → 20.4 % recovery (QA −0.06); 32 % "
                     "joint → 73.6 %.</p>")
    parts.append("</section>")
    return "\n".join(parts)


@register_section("rollback", 90)
def render(run: RunDir) -> str | None:
    return per_result(run, "rollback", render_rollback_section)
