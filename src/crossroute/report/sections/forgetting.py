"""Report section: the forgetting matrix of a sequential run, and the refresh."""

from __future__ import annotations

import html

from crossroute.core.rundir import RunDir
from crossroute.report.html import interval_plot, line_plot, num, scatter_fit, section, table
from crossroute.report.plots import heatmap
from crossroute.report.registry import register_section


@register_section("forgetting", 30)
def render(run: RunDir) -> str | None:
    res = run.read_result("forgetting")
    if res is None:
        return None
    rows, doms, m = res["rows"], res["domains"], res["matrix"]
    body = "<p>E[stage, domain]: held-out score of every domain after every stage (row <i>base</i> is the " \
           "starting checkpoint). Peak, forgetting F = peak - final, backward transfer (BWT) as in DESIGN.md 2.1.</p>"
    body += heatmap(m, rows, doms, "forgetting matrix E[stage, domain]", vmin=0.0, vmax=100.0)
    ci = res.get("ci")
    errors = {d: [tuple(c[j]) for c in ci] for j, d in enumerate(doms)} if ci else None
    body += line_plot(rows, {d: [r[j] for r in m] for j, d in enumerate(doms)}, "score per domain across stages",
                      "held-out score", errors=errors)
    body += table(["stage", *doms, "average"], [[r, *map(float, x), sum(x) / len(x)] for r, x in zip(rows, m,
                                                                                                    strict=True)])
    body += table(["", *doms], [["peak", *[float(res["peak"][d]) for d in doms]],
                                ["forgetting", *[float(res["forgetting"][d]) for d in doms]]])
    if "paired" in res:
        pf = res["paired"]["forgetting"]
        body += ("<p>Forgetting between named rows (the score right after the domain's own stage, or the base for "
                 "an untrained domain, minus the end of the sequence), paired over the same prompts: 95 % bootstrap "
                 "CI and p-value (McNemar for 0/1 scores); * marks a CI that excludes 0. The max-based figure above "
                 "is biased upward by the max over noisy rows.</p>")
        paired = res["paired"]
        labels = [f"forgetting {d}" for d in pf] + [f"gain {k}" for k in paired.get("own_stage_gain", {})] + \
            [f"refresh {d}" for d in paired.get("refresh") or {}]
        figs = list(pf.values()) + list(paired.get("own_stage_gain", {}).values()) + \
            list((paired.get("refresh") or {}).values())
        body += interval_plot(labels, figs, "paired differences", "points")
        body += table(["domain", "from", "to", "forgetting", "CI low", "CI high", "p", "n"],
                      [[d, v["from"], v["to"], f"{v['value']:+.2f}{'*' if v.get('significant') else ''}",
                        num(v["lo"]), num(v["hi"]), num(v["p"]), v["n"]] for d, v in pf.items()])
    body += (f"<p>Backward transfer {res['backward_transfer']:.2f}; average over domains "
             f"{res['average_base']:.2f} (base) -> {res['average_final']:.2f} (end of sequence). "
             "Own-stage gains: " + ", ".join(f"{k} {v:+.2f}" for k, v in res["own_stage_gain"].items()) + ".</p>")
    if "seeds" in res:
        sd = res["seeds"]
        body += (f"<h3>Over training seeds {html.escape(str(sd['seeds']))}</h3><p>The matrix above is the mean over "
                 "seeds (each seed's own run is in RUN/seeds/&lt;k&gt;/). Every paired figure per seed, with its "
                 "mean, SD and 95 % t-interval across seeds:</p>")
        agg = {k: v for k, v in sd["aggregate"].items() if v.get("lo") is not None}
        if agg:
            body += interval_plot(list(agg), [{"value": v["mean"], "lo": v["lo"], "hi": v["hi"]} for v in agg.values()],
                                  "across training seeds (t-interval)", "points")
        body += table(["figure", "mean", "SD", "CI low", "CI high", "per seed"],
                      [[k, v["mean"], v["sd"] if v["sd"] is not None else "-",
                        v["lo"] if v["lo"] is not None else "-", v["hi"] if v["hi"] is not None else "-",
                        ", ".join(f"{x:+.2f}" for x in v["values"])] for k, v in sd["aggregate"].items()])
    if "mixed_vs_sequential" in res:
        body += _mixed_part(res["mixed_vs_sequential"])
    if "forgetting_vs_kl" in res:
        body += _kl_part(res)
    if "refresh" in res:
        r = res["refresh"]
        share = "n/a (nothing was lost)" if r["recovery_share"] is None else f"{100 * r['recovery_share']:.1f} %"
        body += ("<h3>Refresh</h3>" + f"<p>A short RL stage on <b>{html.escape(r['domain'])}</b> after the sequence: "
                 f"{r['before']:.2f} -> {r['after']:.2f} (peak {r['peak']:.2f}); share of the lost score recovered: "
                 f"{share}. What the other domains pay: "
                 + ", ".join(f"{k} {v:+.2f}" for k, v in r["others_change"].items())
                 + f". Average {res['average_final']:.2f} -> {r['average_after']:.2f}. "
                 "Seed paper (Qwen3-4B): Math 57.66 -> 66.04, others move < 1 point, average 64.25 -> 66.39.</p>")
    return section("Sequential RL: forgetting matrix", body)


def _kl_part(res: dict) -> str:
    """Forgetting against the KL each stage moved (RL's Razor), with the fits over stages and seeds."""
    fk = res["forgetting_vs_kl"]
    pts = fk["points"]
    body = ("<h3>Forgetting against KL (RL's Razor)</h3><p>" + html.escape(fk["definition"]) + ". Seed reference "
            "(Shenfeld et al. 2025): forward KL on the new task predicts forgetting, R² about 0.96 in its "
            "setting.</p>")
    if not pts:
        return body + "<p>No points: the sequence has a single domain.</p>"
    for key, fit_key, label in (("kl_new_task", "fit_new_task", "KL(before || after) on the stage's own prompts"),
                                ("kl_on_domain", "fit_on_domain", "KL(before || after) on the forgotten domain's "
                                 "prompts")):
        body += scatter_fit([p[key] for p in pts], [p["drop"] for p in pts], fk[fit_key],
                            "drop of each other domain per stage", label + " (nats/token)", "drop (points)",
                            [p["domain"] for p in pts])
    body += table(["stage", "domain", "drop", "CI low", "CI high", "p", "KL new task", "KL on domain"],
                  [[p["stage"] + (f" (seed {p['seed']})" if "seed" in p else ""), p["domain"],
                    f"{p['drop']['value']:+.2f}{'*' if p['drop'].get('significant') else ''}",
                    num(p["drop"]["lo"]), num(p["drop"]["hi"]), num(p["drop"]["p"]), f"{p['kl_new_task']:.4g}",
                    f"{p['kl_on_domain']:.4g}"] for p in pts])
    fits = [(name, fk[k]) for name, k in (("on the new task", "fit_new_task"), ("on the domain", "fit_on_domain"))]
    body += table(["KL", "slope", "slope CI", "R²", "R² CI", "p (slope)", "n"],
                  [[name, "-" if f["slope"] is None else f"{f['slope']:.4g}",
                    f"[{num(f['slope_ci'][0]):.3g}, {num(f['slope_ci'][1]):.3g}]",
                    "-" if f["r2"] is None else f"{f['r2']:.3f}",
                    f"[{num(f['r2_ci'][0]):.2f}, {num(f['r2_ci'][1]):.2f}]",
                    "-" if f["p"] is None else f"{f['p']:.3g}", f["n"]] for name, f in fits])
    return body


def _mixed_part(mx: dict) -> str:
    """Mixed RL (one stage on the mixture, same base and steps) beside the end of the sequence."""
    diff = mx["difference"]
    weights = ", ".join(f"{d} {w:g}" for d, w in mx["weights"].items())
    body = ("<h3>Mixed RL beside the sequence</h3><p>One GRPO stage from the same base on the mixture of the "
            f"sequence's domains ({html.escape(weights)}; {mx['steps']} steps, the sequence's total unless set), "
            f"each prompt rewarded by its own domain's scorer (run in RUN/{html.escape(mx['mixed'].split('/')[0])}/). "
            f"Mixed minus the end of the sequence ({html.escape(mx['sequential'])}), paired over the same "
            "prompts:</p>")
    body += interval_plot([f"mixed - seq. {d}" for d in diff], list(diff.values()), "mixed minus sequential RL",
                          "points")
    body += table(["domain", "sequential", "mixed", "mixed - sequential", "CI low", "CI high", "p"],
                  [[d, float(mx["scores"]["sequential"][d]), float(mx["scores"]["mixed"][d]),
                    f"{v['value']:+.2f}{'*' if v.get('significant') else ''}", num(v["lo"]), num(v["hi"]),
                    num(v["p"])] for d, v in diff.items()])
    return body

