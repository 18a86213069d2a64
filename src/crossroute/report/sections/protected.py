"""Report section: the protected sequence beside the unprotected one."""

from __future__ import annotations

from crossroute.core.rundir import RunDir
from crossroute.report.html import interval_plot, num, section, table
from crossroute.report.registry import register_section


@register_section("protected", 40)
def render(run: RunDir) -> str | None:
    prot, plain = run.read_result("forgetting_protected"), run.read_result("forgetting")
    if prot is None or plain is None:
        return None
    doms = plain["domains"]
    rows = [[f"unprotected: {r}", *map(float, m), sum(m) / len(m)] for r, m in zip(plain["rows"], plain["matrix"],
                                                                                  strict=True)]
    rows += [[f"protected: {r}", *map(float, m), sum(m) / len(m)] for r, m in zip(prot["rows"], prot["matrix"],
                                                                                strict=True)]
    body = ("<p>The same sequence with the first domain's conflict units protected during every later stage "
            "(crossroute.protect: units active for both domains, ranked by predicted damage, budget 5 %). Compare "
            "the first domain's final score with the refresh and the rollback repairs.</p>")
    body += table(["stage", *doms, "average"], rows)
    body += table(["", *doms], [["forgetting unprotected", *[float(plain["forgetting"][d]) for d in doms]],
                                ["forgetting protected", *[float(prot["forgetting"][d]) for d in doms]]])
    gains = [[k, float(v), float(prot["own_stage_gain"].get(k, float("nan")))]
             for k, v in plain["own_stage_gain"].items()]
    body += "<h3>Own-stage gains (the cost of protecting)</h3>"
    body += table(["stage", "unprotected", "protected"], gains)
    vs = prot.get("vs_unprotected")
    if vs:
        end = [r for r in plain["rows"] if not r.startswith("refresh_")][-1]
        body += (f"<h3>Protected minus unprotected at {end}, paired over the same prompts</h3>"
                 "<p>95 % bootstrap CI and p-value (McNemar for 0/1 scores); * marks a CI that excludes 0.</p>")
        body += interval_plot(list(vs[end]), list(vs[end].values()), f"protected minus unprotected at {end}",
                              "points")
        body += table(["domain", "difference", "CI low", "CI high", "p", "n"],
                      [[d, f"{v['value']:+.2f}{'*' if v.get('significant') else ''}", num(v["lo"]), num(v["hi"]),
                        num(v["p"]), v["n"]] for d, v in vs[end].items()])
    return section("Prevention: protected sequence vs unprotected", body)
