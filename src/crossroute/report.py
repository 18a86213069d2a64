"""`crossroute report`: one self-contained HTML file per run, drawn only from its results/*.json.

Each analysis adds a section renderer to SECTIONS; a renderer returns None when its results are absent.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .atomic import atomic_write_text
from .domains import get_domain
from .errors import CrossrouteError
from .plots import fig_to_img_tag, heatmap
from .rundir import RunDir, load_run

Section = Callable[[RunDir], str | None]


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; floats print with two decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def line_plot(x_labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    """One line per series over categorical x positions, as an inline <img>."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    ax.set_xticks(range(len(x_labels)), labels=x_labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_to_img_tag(fig, alt=title)


def _domains_section(run: RunDir) -> str | None:
    ev = run.read_result("eval") or run.read_result("eval_base")
    if ev is None:
        return None
    rows = []
    for name, detail in ev["details"].items():
        try:
            desc = get_domain(name).description
        except CrossrouteError:
            desc = "(not resolvable here)"
        sample = (detail.get("samples") or [{}])[0]
        rows.append([name, desc, sample.get("prompt", ""), sample.get("reference", "")])
    return section("Domains", table(["domain", "what it tests", "example prompt", "reference"], rows))


def _eval_section(run: RunDir) -> str | None:
    ev = run.read_result("eval") or run.read_result("eval_base")
    if ev is None:
        return None
    rows = [[d, float(s), ev["details"][d]["n"]] for d, s in ev["scores"].items()]
    samples = []
    for d, detail in ev["details"].items():
        for s in detail.get("samples", [])[:3]:
            samples.append([d, s["prompt"], s["reference"], s["completion"], float(s["score"])])
    model = ev.get("model") or ev.get("checkpoint", "")
    body = f"<p>Model: <code>{html.escape(str(model))}</code>; greedy decoding, held-out split.</p>"
    body += table(["domain", "score [0-100]", "n"], rows)
    body += "<h3>Samples</h3>" + table(["domain", "prompt", "reference", "completion", "score"], samples)
    return section("Evaluation", body)


def _forgetting_section(run: RunDir) -> str | None:
    res = run.read_result("forgetting")
    if res is None:
        return None
    rows, doms, m = res["rows"], res["domains"], res["matrix"]
    body = "<p>E[stage, domain]: held-out score of every domain after every stage (row <i>base</i> is the " \
           "starting checkpoint). Peak, forgetting F = peak - final, backward transfer (BWT) as in DESIGN.md 2.1.</p>"
    body += heatmap(m, rows, doms, "forgetting matrix E[stage, domain]", vmin=0.0, vmax=100.0)
    body += line_plot(rows, {d: [r[j] for r in m] for j, d in enumerate(doms)}, "score per domain across stages",
                      "held-out score")
    body += table(["stage", *doms, "average"], [[r, *map(float, x), sum(x) / len(x)] for r, x in zip(rows, m,
                                                                                                    strict=True)])
    body += table(["", *doms], [["peak", *[float(res["peak"][d]) for d in doms]],
                                ["forgetting", *[float(res["forgetting"][d]) for d in doms]]])
    body += (f"<p>Backward transfer {res['backward_transfer']:.2f}; average over domains "
             f"{res['average_base']:.2f} (base) -> {res['average_final']:.2f} (end of sequence). "
             "Own-stage gains: " + ", ".join(f"{k} {v:+.2f}" for k, v in res["own_stage_gain"].items()) + ".</p>")
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


def _protected_section(run: RunDir) -> str | None:
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
    return section("Prevention: protected sequence vs unprotected", body)


def _diff_section(run: RunDir) -> str | None:
    from .diff import render_diff_section

    res = run.read_result("diff")
    return None if res is None else render_diff_section(res)


def _routes_section(run: RunDir) -> str | None:
    from .routes import render_routes_section

    res = run.read_result("routes")
    return None if res is None else render_routes_section(res, run.read_result("diff"))


def _conflict_section(run: RunDir) -> str | None:
    from .gradients import render_conflict_section

    found = sorted(run.results.glob("conflict_*.json")) if run.results.exists() else []
    results = [r for p in found if (r := run.read_result(p.stem)) is not None]
    return render_conflict_section(results) if results else None


def _per_domain_sections(run: RunDir, prefix: str, render: Callable[[dict], str]) -> str | None:
    found = sorted(run.results.glob(f"{prefix}_*.json")) if run.results.exists() else []
    parts = [render(r) for p in found if (r := run.read_result(p.stem)) is not None]
    return "".join(parts) if parts else None


def _damage_section(run: RunDir) -> str | None:
    from .damage import render_damage_section

    return _per_domain_sections(run, "damage", render_damage_section)


def _rollback_section(run: RunDir) -> str | None:
    from .rollback import render_rollback_section

    return _per_domain_sections(run, "rollback", render_rollback_section)


def _circuits_section(run: RunDir) -> str | None:
    from .circuits import render_circuits_section

    return _per_domain_sections(run, "circuits", render_circuits_section)


def _rl_vs_sft_section(run: RunDir) -> str | None:
    from .razor import render_rl_vs_sft_section

    res = run.read_result("rl_vs_sft")
    return None if res is None else render_rl_vs_sft_section(res)


def _cpift_section(run: RunDir) -> str | None:
    from .cpift import render_cpift_section

    res = run.read_result("cpift")
    return None if res is None else render_cpift_section(res)


SECTIONS: list[tuple[str, Section]] = [
    ("domains", _domains_section),
    ("eval", _eval_section),
    ("forgetting", _forgetting_section),
    ("protected", _protected_section),
    ("diff", _diff_section),
    ("routes", _routes_section),
    ("conflict", _conflict_section),
    ("damage", _damage_section),
    ("rollback", _rollback_section),
    ("cpift", _cpift_section),
    ("circuits", _circuits_section),
    ("rl_vs_sft", _rl_vs_sft_section),
]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f3f3f3}section{margin-bottom:2.2em}img{max-width:100%}code{background:#f5f5f5}
.note{color:#555;font-size:14px}
"""


def build_report(run_dir: str | Path) -> Path:
    """Render every section whose results exist into RUN_DIR/report.html (atomic write)."""
    run = load_run(run_dir)
    parts = [s for _, fn in SECTIONS if (s := fn(run)) is not None]
    if not parts:
        parts = ["<p>No results yet in this run directory.</p>"]
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>crossroute report</title>"
        f"<style>{CSS}</style></head><body><h1>crossroute report</h1>"
        f"<p class='note'>Run <code>{html.escape(str(run.root))}</code>, generated "
        f"{time.strftime('%Y-%m-%d %H:%M')}.</p>" + "".join(parts) + "</body></html>"
    )
    atomic_write_text(run.report_path, doc)
    return run.report_path
