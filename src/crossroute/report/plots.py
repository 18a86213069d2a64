"""Small matplotlib helpers: figures as self-contained HTML <img> tags (Agg canvas, no pyplot)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from matplotlib.figure import Figure


def fig_to_img_tag(fig: Figure, alt: str = "plot") -> str:
    """Render `fig` as an inline base64 PNG <img> tag."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def _text_color(im: object, v: float, vmin: float, vmax: float, cmap: str) -> str:
    """Annotation colour: the viridis rule (white on the dark half), else by cell luminance."""
    if cmap == "viridis":
        return "white" if v < (vmin + vmax) / 2 else "black"
    r, g, b, _ = im.cmap(im.norm(v))  # type: ignore[attr-defined]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
) -> str:
    """Annotated heat map of `matrix` (None shows as blank) as an inline <img> tag.

    `cmap` is any matplotlib colormap name (e.g. "RdBu" for signed values in [-1, 1]).
    """
    rows = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    n_rows, n_cols = len(rows), len(col_labels)
    fig = Figure(figsize=(1.2 + 0.8 * max(n_cols, 1), 1.0 + 0.6 * max(n_rows, 1)))
    ax = fig.add_subplot()
    im = ax.imshow(rows, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(n_cols), labels=list(col_labels), rotation=45, ha="right")
    ax.set_yticks(range(n_rows), labels=list(row_labels))
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color=_text_color(im, v, vmin, vmax, cmap))
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig_to_img_tag(fig, alt=title)
