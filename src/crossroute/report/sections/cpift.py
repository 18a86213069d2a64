"""Report section: CPI-FT against mixed and sequential SFT."""

from __future__ import annotations

import html
from typing import Any

from crossroute.core.rundir import RunDir
from crossroute.report.registry import register_section


def render_cpift_section(result: dict[str, Any]) -> str:
    """HTML <section> for results/cpift.json: method table, core overlap heat map, groups, fusion stats."""
    from crossroute.report.html import interval_plot, num, section, table
    from crossroute.report.plots import heatmap

    doms = result["domains"]
    rows = [[m, *[float(result["scores"][m][d]) for d in doms], float(result["average"][m]), result["steps"][m]]
            for m in result["methods"]]
    core, fz = result["core"], result["fuse"]
    body = ("<p>Held-out score per domain after each method, all from the same base. Mixed SFT trains on all "
            "tasks at once; sequential SFT one task after another; CPI-FT probes each task, isolates its core "
            f"(global top-{core['percent']:g} % of |θ<sub>i</sub> − θ<sub>0</sub>|), transplants the cores into "
            f"the model fusion starts from ({html.escape(str(fz.get('fuse_from', 'base')))}), fuses the rest "
            f"(ω = {fz['omega']:g}, {html.escape(fz['slerp_mode'])}), then runs a short "
            "SFT per group with earlier groups' cores frozen.</p>")
    ang = fz.get("angles_deg") or {}
    if ang.get("n"):
        body += (f"<p>Angles between the SLERPed vectors over {ang['n']} tensors: mean {ang['mean']:.1f}°, median "
                 f"{ang['median']:.1f}°, range [{ang['min']:.1f}°, {ang['max']:.1f}°]; "
                 f"{fz.get('slerp_pairs_linear_fallback', 0)} pairs fell back to linear interpolation (|cos| > "
                 "0.9995 or a zero vector). Raw weights of a base and its fine-tune sit at ~0.01°, where SLERP is "
                 "plain interpolation; task vectors are far apart, where it is not.</p>")
    body += table(["method", *doms, "average", "SFT steps"], rows)
    claim = result.get("claim", {})
    body += (f"<p>Best trained method: <b>{html.escape(result['best'])}</b>; lowest: "
             f"<b>{html.escape(result['lowest'])}</b>. Seed claim (mixed SFT lowest, CPI-FT best): "
             f"mixed lowest {'holds' if claim.get('mixed_lowest') else 'does not hold'}, CPI-FT best "
             f"{'holds' if claim.get('cpift_best') else 'does not hold'} here.</p>")
    vs = result.get("cpift_vs") or {}
    if vs:
        body += ("<h3>CPI-FT minus each baseline, paired over the same prompts</h3><p>95 % CI and p-value (exact "
                 "McNemar for 0/1 scores, else bootstrap CI and sign-flip p); * marks a CI that excludes 0.</p>")
        labels = [f"{t} vs {m}" for m, per in vs.items() for t in per]
        figs = [v for per in vs.values() for v in per.values()]
        body += interval_plot(labels, figs, "CPI-FT minus baseline", "points")
        body += table(["baseline", "task", "difference", "CI low", "CI high", "p", "n"],
                      [[m, t, f"{v['value']:+.2f}{'*' if v.get('significant') else ''}", num(v["lo"]),
                        num(v["hi"]), num(v["p"]), v["n"]] for m, per in vs.items() for t, v in per.items()])
    body += heatmap(core["jaccard"], doms, doms, f"Jaccard of core regions (τ = {core['tau']:g})")
    body += ("<p>Groups: " + " | ".join(html.escape("+".join(g)) for g in core["groups"])
             + f". Transplanted {fz['transplanted']} entries; {fz['collisions']} lay in two or more cores "
             f"(rule: {html.escape(fz['collision_rule'])}).</p>")
    inter = result.get("intermediate_scores") or {}
    if inter:
        body += "<h3>Probes and fused model</h3>" + table(
            ["checkpoint", *doms], [[k, *[float(v[d]) for d in doms]] for k, v in inter.items()])
    return section("CPI-FT: core parameter isolation vs mixed and sequential SFT", body)


@register_section("cpift", 100)
def render(run: RunDir) -> str | None:
    res = run.read_result("cpift")
    return None if res is None else render_cpift_section(res)
