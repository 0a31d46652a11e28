"""Small inline SVG charts for the notebook: a loss curve while training and a score bar chart after an eval.

Built by hand on purpose: the kernel must stay light (no matplotlib, numpy or torch at import or on the live
path), a chart is redrawn a few times a second while training, and a few dozen SVG elements cost nothing to
send. A line keeps at most :data:`MAX_POINTS` points however long the run (see :func:`downsample`), so each
redraw, and the output saved in the notebook, stays a few kilobytes. Pure functions of plain numbers, so they
are tested without a notebook.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_FONT = "font-family='sans-serif' font-size='10'"
#: Points drawn per line at most: a 360-pixel-wide plot shows no more.
MAX_POINTS = 300


def downsample(points: Sequence[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most ``limit`` points with the curve's shape: the first and the last, and the lowest and the highest
    of each of equal runs in between (in step order), so a spike or a dip is still drawn."""
    if len(points) <= limit:
        return list(points)
    inner, buckets = points[1:-1], max(1, (limit - 2) // 2)
    kept = [points[0]]
    for number in range(buckets):
        bucket = inner[number * len(inner) // buckets:(number + 1) * len(inner) // buckets]
        if bucket:
            low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
            kept += sorted({low, high})
    return kept + [points[-1]]


def _svg(width: int, height: int, parts: list[str], title: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' role='img'><title>{html.escape(title)}</title>"
            + "".join(parts) + "</svg>")


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, x_max: float | None = None,
               title: str = "loss", width: int = 360, height: int = 150) -> str:
    """Lines of (x, y) points sharing axes (y from 0 to the highest point); a series with no point is skipped.
    Each line is :func:`downsample`-d to :data:`MAX_POINTS`."""
    left, right, top, bottom = 40, 10, 16, 22
    series = {label: downsample(values) for label, values in series.items()}
    points = [p for values in series.values() for p in values]
    x_hi = max([x_max or 0.0] + [x for x, _ in points]) or 1.0
    y_hi = max([y for _, y in points] + [0.0]) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> str:
        return f"{left + plot_w * x / x_hi:.1f},{top + plot_h * (1 - y / y_hi):.1f}"

    parts = [f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#ccc'/>",
             f"<text x='{left - 4}' y='{top + 4}' text-anchor='end' {_FONT}>{y_hi:.3g}</text>",
             f"<text x='{left - 4}' y='{top + plot_h}' text-anchor='end' {_FONT}>0</text>",
             f"<text x='{left + plot_w}' y='{height - 6}' text-anchor='end' {_FONT}>{x_hi:.0f}</text>",
             f"<text x='{left}' y='{height - 6}' {_FONT}>step</text>"]
    legend_x = left + 4
    for (label, values), color in zip(series.items(), COLORS):
        if not values:
            continue
        path = " ".join(xy(x, y) for x, y in values)
        if len(values) == 1:
            cx, cy = xy(*values[0]).split(",")
            parts.append(f"<circle cx='{cx}' cy='{cy}' r='2' fill='{color}'/>")
        else:
            parts.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.5'/>")
        parts.append(f"<text x='{legend_x}' y='{top - 4}' fill='{color}' {_FONT}>{html.escape(label)}</text>")
        legend_x += 8 + 6 * len(label)
    return _svg(width, height, parts, title)


def bar_chart(bars: Sequence[tuple[str, float | None, float | None, float | None]], *, y_max: float = 1.0,
              title: str = "score", width: int | None = None, height: int = 170) -> str:
    """One bar per (label, value, low, high): the value with its interval as a whisker; None draws no bar.
    A label may hold two lines ("model\nmetric"), each cut to 12 characters to fit under its bar."""
    left, top, bottom, slot = 34, 10, 34, 64
    width = width or left + 10 + slot * max(1, len(bars))
    plot_h = height - top - bottom
    y_hi = max([y_max] + [v for _, v, _, hi in bars for v in (v, hi) if v is not None])

    def y(value: float) -> float:
        return top + plot_h * (1 - value / y_hi)

    parts = [f"<line x1='{left}' y1='{top + plot_h}' x2='{width - 10}' y2='{top + plot_h}' stroke='#999'/>",
             f"<text x='{left - 4}' y='{top + 4}' text-anchor='end' {_FONT}>{y_hi:.3g}</text>",
             f"<text x='{left - 4}' y='{top + plot_h}' text-anchor='end' {_FONT}>0</text>"]
    for number, ((label, value, low, high), color) in enumerate(zip(bars, COLORS * (len(bars) // 8 + 1))):
        x = left + 8 + slot * number
        tooltip = html.escape(label.replace("\n", " "))
        if value is not None:
            parts.append(f"<rect x='{x}' y='{y(value):.1f}' width='{slot - 16}' height='{top + plot_h - y(value):.1f}' "
                         f"fill='{color}'><title>{tooltip}: {value:.3f}</title></rect>")
            parts.append(f"<text x='{x + (slot - 16) / 2}' y='{y(value) - 3:.1f}' text-anchor='middle' {_FONT}>"
                         f"{value:.2f}</text>")
        if low is not None and high is not None:
            middle = x + (slot - 16) / 2
            parts.append(f"<line x1='{middle}' y1='{y(low):.1f}' x2='{middle}' y2='{y(high):.1f}' stroke='#333'/>")
        for line_number, line in enumerate(label.split("\n")[:2]):
            parts.append(f"<text x='{x + (slot - 16) / 2}' y='{height - bottom + 14 + 12 * line_number}' "
                         f"text-anchor='middle' {_FONT}>{html.escape(line[:12])}</text>")
    return _svg(width, height, parts, title)
