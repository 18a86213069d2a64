"""Report section: update anatomy (threshold table, relative change per module type, histogram, Jaccard), and
beside it the same update as it would be stored in another dtype (results/diff_<dtype>.json, diff --as-dtype)."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

from crossroute.analyze.diff import MODULE_TYPES, STORAGE_DTYPES
from crossroute.core.rundir import RunDir
from crossroute.model.units import UNIT_KINDS
from crossroute.report.registry import register_section


def render_diff_section(results: dict, as_dtype: dict[str, dict] | None = None) -> str:
    """HTML <section> for a diff result (SequenceDiff or UpdateAnatomy JSON): tables and plots; `as_dtype`: diff
    results of the same checkpoints cast to another dtype (by its name), each compared in a table of its own."""
    from crossroute.report.plots import heatmap

    stages = results.get("stages", [results])
    names = results.get("stage_names") or [Path(s["ckpt"]).name for s in stages]
    parts = ["<section class=\"diff\">", "<h2>Update anatomy</h2>",
             "<p>δ = θ<sub>s</sub> − θ<sub>s−1</sub> in fp32. Fractions of entries with "
             "|δ| &lt; τ; * marks a τ below the storage dtype's resolution for most entries.</p>",
             _threshold_table(stages, names)]
    parts += [t for dtype, other in (as_dtype or {}).items() if (t := _storage_table(stages, names, dtype, other))]
    parts += [_module_table(stages, names), _units_table(stages, names), _histogram_img(stages, names)]
    if results.get("steps"):
        parts.append(_sparsity_curve(stages, results["steps"]))
    jac = results.get("jaccard") or {}
    for kind in _ordered(jac, UNIT_KINDS):
        if len(names) > 1:
            pct = stages[0].get("top_k_percent", "")
            parts.append(heatmap(jac[kind], names, names,
                                 f"Jaccard of top-{pct}% changed {kind} units"))
    parts.append("</section>")
    return "\n".join(parts)


def _sparsity_curve(stages: list[dict], steps: list[int | None]) -> str:
    """A trajectory's share of entries changed by less than each τ per interval, over training steps (exact counts
    over every entry, not estimates)."""
    from crossroute.report.html import line_plot

    labels = [f"{'start' if a is None else a}-{b}" for a, b in zip(steps[:-1], steps[1:], strict=True)]
    taus = stages[0]["thresholds"]
    series = {f"|δ| < {t:g}": [100 * s["below_fraction"][i] for s in stages] for i, t in enumerate(taus)}
    series["δ = 0"] = [100 * s["zero_fraction"] for s in stages]
    return ("<h3>Sparsity over the trajectory</h3><p>Per interval between saved steps: the share of entries "
            "that changed by less than each threshold (exact counts over every entry).</p>"
            + line_plot(labels, series, "entries barely changed, per interval of steps", "% of entries"))


def _threshold_table(stages: list[dict], names: list[str]) -> str:
    taus = stages[0]["thresholds"] if stages else []
    head = "".join(f"<th>&lt; {t:g}</th>" for t in taus)
    rows = []
    for name, s in zip(names, stages, strict=True):
        cells = "".join(
            f"<td>{100 * f:.2f}%{'*' if below else ''}</td>"
            for f, below in zip(s["below_fraction"], s["below_resolution"], strict=True))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(s['dtype']))}</td>"
                    f"<td>{100 * s['zero_fraction']:.2f}%</td>{cells}</tr>")
    return ("<table><tr><th>stage</th><th>dtype</th><th>= 0</th>" + head + "</tr>"
            + "".join(rows) + "</table>")


STORAGE_TAU = 1e-7  # the threshold the as-stored vs as-<dtype> table compares ("unchanged")


def _storage_table(stages: list[dict], names: list[str], dtype: str, other: dict) -> str:
    """Per stage, the share of entries unchanged (|δ| < 1e-7, and δ = 0) as stored and as `dtype`: the difference
    is the share of "unchanged" that is only that dtype's resolution. Stages are matched by (base, ckpt)."""
    cast = {(c.get("base"), c.get("ckpt")): c for c in other.get("stages", [other])}
    matched = [(n, s, cast[key]) for n, s in zip(names, stages, strict=True)
               if (key := (s.get("base"), s.get("ckpt"))) in cast]
    if not matched:
        return ""
    tau = all(STORAGE_TAU in s["thresholds"] and STORAGE_TAU in c["thresholds"] for _, s, c in matched)
    rows = []
    for name, s, c in matched:
        pairs = [(s["zero_fraction"], c["zero_fraction"])]
        if tau:
            pairs.insert(0, (s["below_fraction"][s["thresholds"].index(STORAGE_TAU)],
                             c["below_fraction"][c["thresholds"].index(STORAGE_TAU)]))
        cells = "".join(f"<td>{100 * a:.2f}%</td><td>{100 * b:.2f}%</td><td>{100 * (b - a):+.2f}%</td>"
                        for a, b in pairs)
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(s.get('dtype')))}</td>{cells}</tr>")
    d = html.escape(dtype)
    groups = ([f"|δ| &lt; {STORAGE_TAU:g}"] if tau else []) + ["δ = 0"]
    head = "".join(f"<th>{g}: as stored</th><th>as {d}</th><th>difference</th>" for g in groups)
    return (f"<h3>Unchanged entries as stored and as {d}</h3><p>The same checkpoints with every weight of both "
            f"rounded to {d} (round-to-nearest-even) before δ: the difference is the share of entries "
            f"“unchanged” only because {d} cannot store so small an update.</p>"
            "<table><tr><th>stage</th><th>stored dtype</th>" + head + "</tr>" + "".join(rows) + "</table>")


def _ordered(keys: Iterable[str], order: tuple[str, ...]) -> list[str]:
    """`keys` in `order` first, then any others (a newly registered architecture's kinds or modules)."""
    ks = list(keys)
    return [k for k in order if k in ks] + [k for k in ks if k not in order]


def _module_table(stages: list[dict], names: list[str]) -> str:
    present: dict[str, None] = {}
    for s in stages:
        present.update(dict.fromkeys(s["module_rel_change"]))
    mods = _ordered(present, MODULE_TYPES)
    head = "".join(f"<th>{m}</th>" for m in mods)
    rows = []
    for name, s in zip(names, stages, strict=True):
        cells = "".join(f"<td>{_fmt(s['module_rel_change'].get(m))}</td>" for m in mods)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return ("<h3>Relative change ‖δ‖/‖θ‖ per module type</h3><table><tr><th>stage</th>" + head
            + "</tr>" + "".join(rows) + "</table>")


def _units_table(stages: list[dict], names: list[str], show: int = 5) -> str:
    """Unit table (architecture, units per kind) and each stage's most changed units of every kind present."""
    units = next((s["units"] for s in stages if s.get("units")), None)
    kinds = _ordered({k: None for s in stages for k in s.get("top_units", {})}, UNIT_KINDS)
    out = []
    if units is not None:
        counts = units.get("counts") or {}
        sizes = ", ".join(f"{c['total']} {k}" for k, c in counts.items() if c.get("total"))
        out.append(f"<p>Units: architecture {html.escape(str(units.get('arch')))}"
                   + (f" ({html.escape(sizes)})" if sizes else "") + ".</p>")
    for s, name in zip(stages, names, strict=True):
        warning = (s.get("units") or {}).get("warning")
        if warning:
            out.append(f"<p class=\"warning\">{html.escape(name)}: {html.escape(warning)}</p>")
    if kinds:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in kinds)
        rows = []
        for name, s in zip(names, stages, strict=True):
            top = s.get("top_units", {})
            cells = "".join(
                f"<td>{html.escape(', '.join(top.get(k, [])[:show]) or '–')}"
                f"{' …' if len(top.get(k, [])) > show else ''}</td>" for k in kinds)
            rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
        out.append(f"<h3>Most changed units (top {stages[0].get('top_k_percent', '')}%, by ‖δ‖)</h3>"
                   "<table><tr><th>stage</th>" + head + "</tr>" + "".join(rows) + "</table>")
    return "\n".join(out)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def _histogram_img(stages: list[dict], names: list[str]) -> str:
    from matplotlib.figure import Figure

    from crossroute.report.plots import fig_to_img_tag

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for name, s in zip(names, stages, strict=True):
        h = s["histogram"]
        n = max(1, s["numel"])
        fracs = [c / n for c in h["counts"]]
        ax.stairs(fracs, h["edges_log10"], label=f"{name} (zero: {100 * h['zero'] / n:.1f}%)")
    ax.set_xlabel("log10 |δ|")
    ax.set_ylabel("fraction of entries")
    ax.set_title("Histogram of log10 |δ| per stage")
    ax.legend(fontsize=8)
    return fig_to_img_tag(fig, alt="histogram of log10 |delta|")


@register_section("diff", 50)
def render(run: RunDir) -> str | None:
    res = run.read_result("diff")
    if res is None:
        return None
    cast = {d: r for d in STORAGE_DTYPES if (r := run.read_result(f"diff_{d}")) is not None}
    return render_diff_section(res, cast)
