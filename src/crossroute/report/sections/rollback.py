"""Report section: training-free rollback sweep (the P(ref) screen at every point, greedy scores where evaluated)."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import per_result, register_section


def _is_full(p: dict) -> bool:
    """Whether a point has the greedy evaluation (results before the screen have it everywhere)."""
    return bool(p.get("full_eval", True))


def _ci_text(c: dict | None) -> str:
    """A paired change in points with its CI, e.g. '+1.20 [-0.30, 2.70]'; '–' when absent."""
    if not c or c.get("value") is None:
        return "–"
    return f"{c['value']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def _screen_figure(result: dict, variant: str, pts: list[dict]) -> str:
    """Per screened domain (A first), its paired ΔP(ref) vs θ_now (CI bars) against the fraction per selector;
    fully evaluated points ringed."""
    from matplotlib.figure import Figure

    from crossroute.report.html import ci_bars
    from crossroute.report.plots import fig_to_img_tag

    doms = [d for d in [result.get("domain"), *(result.get("others") or [])]
            if any((p.get("screen_change") or {}).get(d) for p in pts)]
    fig = Figure(figsize=(4.2 * len(doms), 3.4), layout="constrained")
    axes = fig.subplots(1, len(doms), squeeze=False)[0]
    for ax, d in zip(axes, doms, strict=True):
        for sel in result.get("selectors") or []:
            mine = sorted((p for p in pts if p["selector"] == sel and (p.get("screen_change") or {}).get(d)),
                          key=lambda p: p["fraction"])
            if not mine:
                continue
            cs = [p["screen_change"][d] for p in mine]
            xs, ys = [p["fraction"] for p in mine], [c["value"] for c in cs]
            line = ax.errorbar(xs, ys, yerr=ci_bars(ys, [c["lo"] for c in cs], [c["hi"] for c in cs]), marker="o",
                               capsize=3, label=sel)
            full = [(x, y) for x, y, p in zip(xs, ys, mine, strict=True) if _is_full(p)]
            if full:
                ax.scatter(*zip(*full, strict=True), s=140, facecolors="none", edgecolors=line[0].get_color(),
                           linewidths=1.5, zorder=3)
        ax.set_xscale("log", base=2)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("units rolled back [% of pool]")
        ax.set_ylabel(f"Δ P(ref) on {d} vs now [points]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"screen, {variant} (bars: paired 95 % CI; rings: fully evaluated)", fontsize=9)
    return fig_to_img_tag(fig, f"rollback screen ({variant})")


def _recovery_figure(result: dict, variant: str, pts: list[dict]) -> str:
    """Greedy recovery on A of the fully evaluated points per selector, with the paired CI of A's change."""
    from matplotlib.figure import Figure

    from crossroute.report.html import ci_bars
    from crossroute.report.plots import fig_to_img_tag

    a = result.get("domain")
    now = result.get("score_now") or {}
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.add_subplot()
    gap = float(result.get("score_peak", float("nan"))) - float(now.get(a, float("nan")))
    for j, sel in enumerate(result.get("selectors") or []):
        mine = sorted((p for p in pts if p["selector"] == sel and _is_full(p)), key=lambda p: p["fraction"])
        if not mine:
            continue
        xs = [p["fraction"] * 2 ** (0.06 * (j - 1)) for p in mine]  # selectors side by side at equal budgets
        ys = [float("nan") if p["recovery"] is None else p["recovery"] for p in mine]
        ci = [(p.get("change") or {}).get(a) for p in mine]
        defined = all(c is not None and c.get("lo") is not None and c.get("hi") is not None for c in ci)
        if gap > 0 and defined:  # the paired CI of A's change, on the recovery scale
            yerr = ci_bars(ys, [c["lo"] / gap for c in ci], [c["hi"] / gap for c in ci])
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=sel)
        else:
            ax.plot(xs, ys, marker="o", label=sel)
    ax.set_xscale("log", base=2)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("units rolled back [% of pool]")
    ax.set_ylabel(f"recovery on {a}")
    label = "MLP neurons" if variant == "mlp" else "neurons + heads + KV groups"
    ax.set_title(f"greedy, fully evaluated points: {label} (pool {result.get('pool_sizes', {}).get(variant, '')}; "
                 "bars: paired 95 % CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_to_img_tag(fig, f"rollback recovery ({variant})")


def _row(result: dict, p: dict, others: list[str]) -> list[Any]:
    a = result.get("domain")
    full = _is_full(p)
    return [p["variant"], p["selector"], f"{p['fraction']:g} %", p["n_units"], p["n_shared"],
            "full" if full else "screen", *[_ci_text((p.get("screen_change") or {}).get(d)) for d in [a, *others]],
            float(p["scores"].get(a, float("nan"))) if full else "–",
            *[_ci_text((p.get("change") or {}).get(d)) if full else "–" for d in [a, *others]],
            "–" if p["recovery"] is None else f"{100 * p['recovery']:.1f} %"]


def render_rollback_section(result: dict) -> str:
    """HTML <section>: the P(ref) screen and the greedy recovery vs fraction per selector (and variant), the table."""
    from crossroute.report.html import table

    a = html.escape(str(result.get("domain", "")))
    others = result.get("others") or []
    points = result.get("points") or []
    now = result.get("score_now") or {}
    n_full = sum(1 for p in points if _is_full(p))
    parts = [f"<section class=\"rollback\"><h2>Training-free rollback for {a}</h2>",
             f"<p>Units of <code>{html.escape(str(result.get('now', '')))}</code> set back to "
             f"<code>{html.escape(str(result.get('to', '')))}</code> (θ<sub>A</sub>), in place. "
             "Selectors at equal budget: <b>conflict</b> (damage attribution δ<sub>u</sub>ᵀ(g + "
             f"½Hδ)<sub>u</sub> to {a}, restricted to units active for {a} and a later domain), "
             "<b>random</b>, <b>magnitude</b> (largest ‖δ<sub>u</sub>‖). Recovery = (score − "
             f"now) / (peak − now) on {a}: now {now.get(result.get('domain'), float('nan')):.2f}, "
             f"peak {float(result.get('score_peak', float('nan'))):.2f} "
             f"(greedy, n = {result.get('eval_n')}).</p>"]
    if "n_full_evals" in result:
        scr_now = (result.get("screen_now") or {}).get(result.get("domain"))
        scr_to = (result.get("screen_to") or {}).get(result.get("domain"))
        at = "; ".join(f"{lab} {e['value']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}]"
                       for lab, e in (("now", scr_now), ("θ<sub>A</sub>", scr_to)) if e)
        parts.append(f"<p>Every point is screened by the teacher-forced P(ref) of the same pinned eval prompts' "
                     f"reference answers (one forward per batch; mean in points, {a}: {at}). The greedy "
                     f"evaluation ran at {n_full} of {len(points)} points plus θ<sub>now</sub> and "
                     f"θ<sub>A</sub>: {result['n_full_evals']} full evaluations ("
                     f"{html.escape(str((result.get('meta') or {}).get('full_eval_rule', '')))}). "
                     "Rows marked <i>screen</i> have no greedy score.</p>")
    excl = result.get("pool_excludes") or {}
    if excl:
        parts.append("<p>Each pool leaves at θ<sub>now</sub>: " + "; ".join(
            f"<b>{html.escape(v)}</b>: {html.escape(e)}" for v, e in excl.items()) + ".</p>")
    for variant in result.get("variants") or []:
        pts = [p for p in points if p["variant"] == variant]
        if any(p.get("screen_change") for p in pts):
            parts.append(_screen_figure(result, variant, pts))
        if any(_is_full(p) for p in pts):
            parts.append(_recovery_figure(result, variant, pts))
    rows = [_row(result, p, others) for p in points]
    name = str(result.get("domain", ""))  # table() escapes its header
    parts.append(table(["variant", "selector", "fraction", "units", "shared", "eval",
                        *[f"screen Δ P(ref) {d} [95 % CI]" for d in [name, *others]], f"{name} score",
                        *[f"Δ {d} [95 % CI]" for d in [name, *others]],
                        "recovery"], rows))
    best = result.get("best")
    if best:
        rec = "–" if best.get("recovery") is None else f"{100 * best['recovery']:.1f} %"
        saved = best.get("saved_to")
        parts.append(f"<p>Best fully evaluated point: {html.escape(best['variant'])} / "
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
