"""Report section: RL vs SFT (circuits, KL to base, forgetting)."""

from __future__ import annotations

import html
from typing import Any

from crossroute.analyze.circuits import SEED_REFERENCE
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir
from crossroute.report.registry import register_section
from crossroute.report.sections.circuits import fmt_ci, render_circuits_section


def _kl_seq(r: dict[str, Any]) -> str:
    """The per-completion forward KL with its CI when the result carries one."""
    ci = r.get("kl_seq_ci")
    return f"{r['kl_seq']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def render_rl_vs_sft_section(result: dict[str, Any]) -> str:
    """HTML <section>: the comparison table next to the seed's retention, plus the own domain's circuits."""
    from crossroute.report.html import table

    if not result.get("rows"):
        raise CrossrouteError("rl_vs_sft.json has no rows; rerun the experiment.")
    dom = result["domain"]
    others = [d for d in result["domains"] if d != dom]
    header = (["model", f"{dom} (own)", "own gain"] + [f"Δ {d}" for d in others]
              + ["mean forgetting", "forward KL/token", "forward KL/completion [95% CI]", "reverse KL/token",
                 f"retained ({dom}) [95% CI]",
                 "retained (others, mean)", f"mean |Δs_h| ({dom})"])

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.0f} %"

    def own_ret(r: dict[str, Any]) -> str:
        lo, hi = (r.get("retention_own_ci") or [None, None])[:2]
        return fmt_ci({"value": r["retention_own"], "lo": lo, "hi": hi}, pct=True)

    rows = [[r["model"], r["own"], r["own_gain"], *[r["others_change"][d] for d in others], r["forgetting_mean"],
             f"{r['kl_token']:.4f}", _kl_seq(r), "–" if r.get("kl_reverse_token") is None else
             f"{r['kl_reverse_token']:.4f}", own_ret(r), pct(r["retention_others_mean"]),
             f"{r.get('mean_abs_score_shift', {}).get(dom, 0.0):.4f}"]
            for r in result["rows"]]
    ref = result.get("seed_reference", SEED_REFERENCE)
    sft = result["sft"]
    parts = [f"<section><h2>RL vs SFT on {html.escape(dom)}</h2>",
             f"<p>From the same base, RL ({result['rl']['steps']} GRPO steps) and SFT ({sft['steps']} steps, "
             "picked from "
             f"{', '.join(str(s['steps']) for s in sft['search'])} to match RL's held-out {html.escape(dom)} score). "
             f"Forgetting = base score − model score on each other domain (mean). KL: "
             f"{html.escape(result['kl_definition'])}. Retained = share of what the base circuit recovers in the base "
             "that the same heads still recover in the model, on the base model's metric scale (see the circuits "
             "section).</p>",
             table(header, rows),
             f"<p>Retention RL − SFT on {html.escape(dom)}, paired over prompts: "
             f"{fmt_ci((result.get('retention_difference') or {}).get(dom), pct=True, p=True)}.</p>",
             f"<p>Seed ({html.escape(ref['model'])}, {html.escape(ref['task'])}): RL retains "
             f"~{100 * ref['rl_retained']:.0f} % of the base circuit, SFT ~{100 * ref['sft_retained']:.0f} %.</p>"]
    if result.get("warning"):
        parts.append(f"<p><b>{html.escape(result['warning'])}</b></p>")
    parts.append("</section>")
    parts.append(render_circuits_section(result["circuits"][dom]))
    return "\n".join(parts)


@register_section("rl_vs_sft", 120)
def render(run: RunDir) -> str | None:
    res = run.read_result("rl_vs_sft")
    return None if res is None else render_rl_vs_sft_section(res)
