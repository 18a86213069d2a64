"""HTML building blocks of the report: tables, sections, line plots and the page's CSS."""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from crossroute.report.plots import fig_to_img_tag


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


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}
th{background:#f3f3f3}section{margin-bottom:2.2em}img{max-width:100%}code{background:#f5f5f5}
.note{color:#555;font-size:14px}
"""
