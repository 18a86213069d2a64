"""Report section: the forgetting matrix of a sequential run, and the refresh."""

from __future__ import annotations

import html

from crossroute.core.rundir import RunDir
from crossroute.report.html import interval_plot, line_plot, num, section, table
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
