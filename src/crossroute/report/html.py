"""HTML building blocks of the report: tables, sections, line plots and the page's CSS."""

from __future__ import annotations

import html
import re
from typing import Any

from matplotlib.figure import Figure

from crossroute.report.plots import fig_to_img_tag


def num(v: Any) -> float:
    """A JSON number as a float; null (an undefined value, e.g. the CI of zero examples) as NaN."""
    return float("nan") if v is None else float(v)


def ci_bars(values: list[float], lo: list[float], hi: list[float]) -> list[list[float]]:
    """matplotlib's asymmetric `yerr` for points with CIs [lo, hi] (a bound past its point draws no bar)."""
    return [[max(0.0, v - a) for v, a in zip(values, lo, strict=True)],
            [max(0.0, b - v) for v, b in zip(values, hi, strict=True)]]


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; floats print with two decimals."""

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def anchor(title: str) -> str:
    """The id a section titled `title` gets (lower case, other characters as '-'), so the summary can link to it."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def section(title: str, body: str) -> str:
    return f"<section id=\"{anchor(title)}\"><h2>{html.escape(title)}</h2>{body}</section>"


_SECTION_OPEN = re.compile(r"\A(\s*)<section(?![^>]*\bid=)([^>]*)>\s*<h2>(.*?)</h2>", re.S)


def with_ids(part: str) -> str:
    """Give a section that wrote its own <section><h2> tags the id of its title (as `section` does)."""
    return _SECTION_OPEN.sub(lambda m: f'{m.group(1)}<section id="'
                             f'{anchor(html.unescape(re.sub("<[^>]+>", "", m.group(3))))}"{m.group(2)}>'
                             f'<h2>{m.group(3)}</h2>', part, count=1)


def line_plot(x_labels: list[str], series: dict[str, list[float]], title: str, ylabel: str,
              errors: dict[str, list[tuple[float, float]]] | None = None) -> str:
    """One line per series over categorical x positions, as an inline <img>; `errors` gives a series' 95 % CI
    [lo, hi] per point, drawn as error bars."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot()
    for k, (name, ys) in enumerate(series.items()):
        xs = [i + 0.04 * (k - (len(series) - 1) / 2) for i in range(len(ys))]  # dodge overlapping bars
        ci = (errors or {}).get(name)
        if ci:
            yerr = ci_bars(ys, [lo for lo, _ in ci], [hi for _, hi in ci])
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(range(len(x_labels)), labels=x_labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (bars: 95 % CI)" if errors else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_to_img_tag(fig, alt=title)


def interval_plot(labels: list[str], figures: list[dict[str, Any]], title: str, ylabel: str) -> str:
    """Paired differences as points with their 95 % CI bars around a zero line; * above a CI that excludes 0.
    Each figure is a paired_diff JSON (value, lo, hi)."""
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.2))
    ax = fig.add_subplot()
    vals = [num(f["value"]) for f in figures]
    lo = [num(f["lo"]) for f in figures]
    hi = [num(f["hi"]) for f in figures]
    xs = list(range(len(labels)))
    ax.errorbar(xs, vals, yerr=ci_bars(vals, lo, hi), fmt="o", capsize=4, color="#4c72b0")
    ax.axhline(0, color="black", lw=0.7)
    for x, a, b in zip(xs, lo, hi, strict=True):
        if a > 0 or b < 0:
            ax.annotate("*", (x, b), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=14)
    ax.set_xticks(xs, labels=labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (95 % CI; * excludes 0)")
    ax.grid(alpha=0.3, axis="y")
    return fig_to_img_tag(fig, alt=title)


def scatter_fit(xs: list[float], figures: list[dict[str, Any]], fit: dict[str, Any], title: str, xlabel: str,
                ylabel: str, groups: list[str] | None = None) -> str:
    """Points (paired_diff JSON each: value, lo, hi) against `xs` with their 95 % CI bars, coloured by `groups`,
    and the least-squares line of `fit` (stats.linear_fit) with its slope CI and R² in the title."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    groups = groups or [""] * len(xs)
    for g in dict.fromkeys(groups):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        vals = [num(figures[i]["value"]) for i in idx]
        ax.errorbar([xs[i] for i in idx], vals, yerr=ci_bars(vals, [num(figures[i]["lo"]) for i in idx],
                                                               [num(figures[i]["hi"]) for i in idx]),
                    fmt="o", capsize=3, label=g or None)
    ax.axhline(0, color="black", lw=0.7)
    if fit.get("slope") is not None and xs:
        lo_x, hi_x = min(xs), max(xs)
        ax.plot([lo_x, hi_x], [fit["intercept"] + fit["slope"] * lo_x, fit["intercept"] + fit["slope"] * hi_x],
                color="black", lw=1, ls="--")
        ci = fit["slope_ci"]
        title += (f"\nslope {fit['slope']:.3g} [{num(ci[0]):.3g}, {num(ci[1]):.3g}], R² {num(fit['r2']):.2f}, "
                  f"p {fit['p']:.3g}, n {fit['n']}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if any(groups):
        ax.legend(fontsize=8)
    return fig_to_img_tag(fig, alt=title)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f3f3f3}section{margin-bottom:2.2em}img{max-width:100%}code{background:#f5f5f5}
.note{color:#555;font-size:14px}
"""
