"""Terminal renderings of results (rich tables): score tables and the forgetting summary."""

from __future__ import annotations

from rich.table import Table

from crossroute.core.console import console


def scores_table(title: str, rows: dict[str, dict[str, float]], columns: list[str],
                 ci: dict[str, dict[str, tuple[float, float] | list[float] | None]] | None = None) -> Table:
    """A rich table: one row per key of `rows`, one column per domain; with `ci`, each score's [lo, hi]."""
    t = Table(title=title)
    t.add_column("")
    for c in columns:
        t.add_column(c, justify="right")
    for name, scores in rows.items():
        cells = []
        for c in columns:
            if c not in scores:
                cells.append("-")
                continue
            bounds = (ci or {}).get(name, {}).get(c)
            cells.append(f"{scores[c]:.2f} [{bounds[0]:.1f}, {bounds[1]:.1f}]" if bounds else f"{scores[c]:.2f}")
        t.add_row(name, *cells)
    return t


def print_forgetting(result: dict) -> None:
    """The forgetting matrix and its summary on the terminal."""
    rows = {r: dict(zip(result["domains"], m, strict=True)) for r, m in zip(result["rows"], result["matrix"],
                                                                              strict=True)}
    ci = None
    if "ci" in result:
        ci = {r: dict(zip(result["domains"], c, strict=True)) for r, c in zip(result["rows"], result["ci"],
                                                                            strict=True)}
    console.print(scores_table("forgetting matrix E[stage, domain] (95% CI over prompts)", rows, result["domains"],
                               ci))
    console.print(f"forgetting per domain: { {k: round(v, 2) for k, v in result['forgetting'].items()} }; "
                  f"BWT {result['backward_transfer']:.2f}; average {result['average_base']:.2f} -> "
                  f"{result['average_final']:.2f}")
    if "paired" in result:
        console.print(paired_table("forgetting between named rows (paired over the same prompts)",
                                   {d: v for d, v in result["paired"]["forgetting"].items()}, label="from -> to"))
    if "seeds" in result:
        t = Table(title=f"over seeds {result['seeds']['seeds']}: mean, SD and 95% t-interval")
        for c in ("figure", "mean", "SD", "95% CI", "per seed"):
            t.add_column(c, justify="left" if c == "figure" else "right")
        for k, v in result["seeds"]["aggregate"].items():
            ci = "-" if v["lo"] is None else f"[{v['lo']:+.2f}, {v['hi']:+.2f}]"
            t.add_row(k, f"{v['mean']:+.2f}", "-" if v["sd"] is None else f"{v['sd']:.2f}", ci,
                      ", ".join(f"{x:+.1f}" for x in v["values"]))
        console.print(t)
    if "refresh" in result:
        r = result["refresh"]
        share = "n/a (nothing lost)" if r["recovery_share"] is None else f"{100 * r['recovery_share']:.0f}%"
        console.print(f"refresh {r['domain']}: {r['before']:.2f} -> {r['after']:.2f} (peak {r['peak']:.2f}, "
                      f"recovered {share}); others: { {k: round(v, 2) for k, v in r['others_change'].items()} }; "
                      f"average -> {r['average_after']:.2f}")


def fmt_diff(d: dict) -> str:
    """'+4.00 [+1.10, +6.90] p=0.006' for a paired difference's JSON (a '*' where the CI excludes 0)."""
    star = "*" if d.get("significant") else ""
    return f"{d['value']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] p={d['p']:.3g}{star}"


def paired_table(title: str, diffs: dict[str, dict], label: str = "") -> Table:
    """A rich table of paired differences: value, 95 % CI, p-value, n and the test."""
    t = Table(title=title)
    for c in ("", label, "difference", "95% CI", "p", "n", "test"):
        t.add_column(c, justify="right" if c in ("difference", "95% CI", "p", "n") else "left")
    for name, d in diffs.items():
        rows = f"{d['from']} -> {d['to']}" if "from" in d else d.get("domain", "")
        t.add_row(name, rows, f"{d['value']:+.2f}{'*' if d.get('significant') else ''}",
                  f"[{d['lo']:+.2f}, {d['hi']:+.2f}]", f"{d['p']:.3g}", str(d["n"]), d["test"])
    return t
