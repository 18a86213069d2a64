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
            ok = bounds and bounds[0] is not None and bounds[1] is not None
            cells.append(f"{scores[c]:.2f} [{bounds[0]:.1f}, {bounds[1]:.1f}]" if ok else f"{scores[c]:.2f}")
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


def conflict_line(c: dict) -> str:
    """One line per conflict subspace: r90 (or why none), shares at r = 1/5/10/20 vs the baselines, cost."""
    def at(key: str) -> str:
        xs = c.get(key) or []
        return "/".join(f"{xs[r - 1]:.3g}" if r <= len(xs) else "-" for r in (1, 5, 10, 20))

    res = (c.get("residuals_top") or []) + (c.get("residuals_bottom") or [])
    r90 = c["r90"] if c.get("r90") is not None else f"none ({c.get('r90_reason', '')})"
    return (f"conflict subspace vs {c['domain_b']} ({c['n_params']} params): r90 {r90}; share at r=1/5/10/20 "
            f"eigen {at('share_eig')}, random {at('share_random')}, top-|delta| {at('share_top_abs_delta')}; "
            f"max residual {max(res) if res else float('nan'):.1e}; {(c.get('n_hvp') or {}).get('total', 0)} HVPs")


def _ci(d: dict | None, pct: bool = False) -> str:
    """'0.452 [0.301, 0.610]' (or '45 [30, 61] %' with pct) for a {value, lo, hi} dict; '-' when undefined."""
    if not d or d.get("value") is None:
        return "-"
    if pct:
        return f"{100 * d['value']:.0f} [{100 * d['lo']:.0f}, {100 * d['hi']:.0f}] %"
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def print_circuits(result: dict, top: int = 8) -> None:
    """A circuits result on the terminal: per model gap, circuit size/target/cap, faithfulness and retention
    with 95 % CIs (base-model scale), the base's top heads (raw effect and score per model), RL - SFT."""
    models = result["models"]
    t = Table(title=f"circuits: {result['domain']} ({result['pairs']['n']} pairs; scores and F on the base model's "
                    f"gap; target F >= {result['target']:g}, cap {100 * result['max_fraction']:.0f} % of heads; "
                    "95% CI over prompts)")
    for c in ("model", "own gap", "gap / base gap", "|circuit| / cap", "F(circuit)", "retention", "F(base circuit)",
              "overlap"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for m, r in models.items():
        note = "" if r["target_reached"] else (" cap binds" if r["cap_binds"] else " target not reached")
        ov = result["overlap"].get(m)
        t.add_row(m, _ci(r["gap_ci"]), _ci(r["capability"]), f"{len(r['circuit'])} / {r['max_heads']}{note}",
                  _ci(r["faithfulness_ci"]), _ci(result["retention"].get(m), pct=True),
                  _ci(result["base_circuit_faithfulness"].get(m)), "-" if ov is None else f"{100 * ov:.0f} %")
    console.print(t)
    h = Table(title="top heads of the base: raw effect (m_patched - m_clean) | base-scale score s_h [95% CI]")
    h.add_column("head")
    for m in models:
        h.add_column(f"{m} effect", justify="right")
        h.add_column(f"{m} s_h", justify="right")
    base = models["base"]
    for u in base["ranking"][: max(top, base["max_heads"])]:
        layer, hd = int(u[1:u.index(".")]), int(u.rsplit(".", 1)[1])
        cells = []
        for r in models.values():
            s = {"value": r["score"][layer][hd], "lo": r["score_lo"][layer][hd], "hi": r["score_hi"][layer][hd]}
            cells += [f"{r['effect'][layer][hd]:+.4f}", _ci(s)]
        h.add_row(u + (" *" if u in base["circuit"] else ""), *cells)
    console.print(h)
    console.print("* = in the base circuit")
    for m, r in models.items():
        for w in r.get("warnings") or []:
            console.print(f"{m}: {w}")
    d = result.get("retention_difference")
    if d and d.get("value") is not None:
        pts = {**d, **{k: 100 * d[k] for k in ("value", "lo", "hi")}}
        console.print(f"retention {result['rl']} - {result['sft']} (paired over prompts, points): {fmt_diff(pts)}; "
                      f"{len(result.get('vulnerable') or [])} vulnerable heads at delta {result['delta']:g}")
