"""Small SVG plot writers for the evaluation report: line plots with linear or log axes, reliability bars.

No plotting library: the report stays one self-contained page with no dependency beyond numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = ["COLORS", "Series", "line_plot", "reliability_plot"]

WIDTH, HEIGHT = 520, 340
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 20, 50
LEGEND_ROW = 16
COLORS = ("#1f6fb2", "#d1495b", "#2e9e5b", "#8a5cbf", "#d98e04", "#444444")


@dataclass(frozen=True)
class Series:
    """A named polyline; ``markers`` draws a dot at every point too."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str = COLORS[0]
    markers: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class _Axes:
    x0: float
    x1: float
    y0: float
    y1: float
    log_x: bool

    def px(self, x: float) -> float:
        if self.log_x:
            x, lo, hi = math.log10(max(x, self.x0)), math.log10(self.x0), math.log10(self.x1)
        else:
            lo, hi = self.x0, self.x1
        return LEFT + (x - lo) / (hi - lo or 1) * (WIDTH - LEFT - RIGHT)

    def py(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0 or 1) * (HEIGHT - TOP - BOTTOM)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _nice_step(span: float) -> float:
    raw = span / 5 or 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return magnitude * next(m for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _ticks(axes: _Axes) -> tuple[list[float], list[float]]:
    if axes.log_x:
        lo, hi = math.floor(math.log10(axes.x0)), math.ceil(math.log10(axes.x1))
        xs = [10.0**e for e in range(lo, hi + 1) if axes.x0 <= 10.0**e <= axes.x1]
    else:
        xs = _linear_ticks(axes.x0, axes.x1)
    return xs, _linear_ticks(axes.y0, axes.y1)


def _frame(axes: _Axes, x_label: str, y_label: str) -> list[str]:
    xs, ys = _ticks(axes)
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#999"/>']
    for x in xs:
        px = axes.px(x)
        parts.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">{_fmt(x)}</text>')
    for y in ys:
        py = axes.py(y)
        parts.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(
        f'<text transform="translate(14 {(TOP + bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    return parts


def _series(axes: _Axes, s: Series) -> list[str]:
    coords = " ".join(f"{axes.px(x):.1f},{axes.py(y):.1f}" for x, y in s.points)
    dash = ' stroke-dasharray="5 4"' if s.dashed else ""
    parts = [
        f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"{dash}>'
        f"<title>{escape(s.name)}</title></polyline>"
    ]
    if s.markers:
        parts.extend(
            f'<circle cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="4" fill="{s.color}">'
            f"<title>{escape(s.name)}: ({_fmt(x)}, {_fmt(y)})</title></circle>"
            for x, y in s.points
        )
    return parts


def _legend(series: Sequence[Series]) -> list[str]:
    """One row per series below the plot (the SVG is made taller for it)."""
    parts = []
    for n, s in enumerate(series):
        y = HEIGHT + 4 + LEGEND_ROW * n
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        parts.append(
            f'<line x1="{LEFT}" y1="{y - 4}" x2="{LEFT + 22}" y2="{y - 4}" stroke="{s.color}" '
            f'stroke-width="3"{dash}/><text x="{LEFT + 28}" y="{y}">{escape(s.name)}</text>'
        )
    return parts


def _svg(title: str, body: list[str], legend_rows: int) -> str:
    height = HEIGHT + LEGEND_ROW * legend_rows
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def line_plot(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] = (0.0, 1.0),
) -> str:
    """An SVG line plot of ``series``; with ``log_x`` non-positive x values are clamped to the axis start."""
    xs = [x for s in series for x, _ in s.points if not log_x or x > 0]
    lo, hi = x_range or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    if log_x:
        lo = max(lo, 1e-6)
        hi = max(hi, lo * 10)
    axes = _Axes(lo, hi if hi > lo else lo + 1, y_range[0], y_range[1], log_x)
    body = _frame(axes, x_label, y_label)
    for s in series:
        body.extend(_series(axes, s))
    return _svg(title, body + _legend(series), len(series))


def reliability_plot(bins: Sequence[dict[str, Any]]) -> str:
    """Reliability diagram: accuracy per confidence bin (bars; opacity grows with the bin's share)."""
    axes = _Axes(0.0, 1.0, 0.0, 1.0, log_x=False)
    body = _frame(axes, "confidence (top-1 probability)", "accuracy")
    total = max(sum(int(b["count"]) for b in bins), 1)
    for b in bins:
        if not b["count"]:
            continue
        x0, x1, top = axes.px(b["lo"]), axes.px(b["hi"]), axes.py(b["accuracy"])
        share = int(b["count"]) / total
        body.append(
            f'<rect x="{x0 + 1:.1f}" y="{top:.1f}" width="{x1 - x0 - 2:.1f}" '
            f'height="{axes.py(0) - top:.1f}" fill="{COLORS[0]}" fill-opacity="{0.35 + 0.65 * share:.2f}">'
            f"<title>{_fmt(b['lo'])}–{_fmt(b['hi'])}: {b['count']} predictions, accuracy "
            f"{_fmt(b['accuracy'])}, mean confidence {_fmt(b['confidence'])}</title></rect>"
        )
    diagonal = Series("perfect calibration", [(0.0, 0.0), (1.0, 1.0)], COLORS[1], dashed=True)
    body.extend(_series(axes, diagonal))
    return _svg("Reliability diagram", body + _legend([diagonal]), 1)
