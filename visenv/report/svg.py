"""Inline SVG charts for the report: no JavaScript, no fonts or files from the network.

Each chart is a standalone ``<svg>`` string. Every bar carries ``data-series``, ``data-label`` and
``data-value`` attributes (the exact value it draws), so tests and scripts can read the numbers
back from the page.
"""

from __future__ import annotations

from html import escape
from typing import Mapping, Sequence

PALETTE = ("#3b6fd8", "#e07b39", "#3aa070", "#b04fb6", "#c9a227", "#d24d57", "#5fb3c9", "#7a7a7a")
_FONT = 'font-family="sans-serif" font-size="11"'


def _number(value: float) -> str:
    return f"{value:.3f}"


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    parts = []
    for i, name in enumerate(names):
        left = x + 130 * i
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(f'<text x="{left + 14}" y="{y}" {_FONT}>{escape(name)}</text>')
    return parts


def grouped_bars(title: str, categories: Sequence[str], series: Mapping[str, Sequence[float | None]],
                 low: float = 0.0, high: float = 1.0) -> str:
    """Vertical bars: one group per category, one bar per series (None: no bar, "n/a" written).

    Args:
        title: the chart's title.
        categories: the group labels along the x axis.
        series: series name -> one value per category.
        low: the value at the bottom of the axis (values below are clipped to it).
        high: the value at the top of the axis.
    """
    names = list(series)
    group_width = max(24, 14 * len(names) + 10)
    label_width = 6 * max([len(c) for c in categories] + [1])  # labels are turned 60 degrees
    left, top, plot = max(40, label_width // 2), 40, 160
    legend_end = left + 130 * (len(names) - 1) + 24 + 7 * len(names[-1]) if names else 0
    width = max(left + 20 + group_width * len(categories), legend_end)
    height = top + plot + 20 + int(0.87 * label_width)
    scale = plot / (high - low)
    zero = top + plot - ((0.0 if low <= 0.0 <= high else low) - low) * scale
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" {_FONT} font-weight="bold">{escape(title)}</text>']
    parts += _legend(names, left, 32)
    for tick in (low, (low + high) / 2, high):
        y = top + plot - (tick - low) * scale
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" {_FONT} text-anchor="end">{tick:g}</text>')
    for c, category in enumerate(categories):
        x0 = left + 6 + c * group_width
        for s, name in enumerate(names):
            value = series[name][c]
            x = x0 + 14 * s
            label = f'data-series="{escape(name)}" data-label="{escape(category)}"'
            if value is None:
                parts.append(f'<text x="{x + 5}" y="{zero - 3:.1f}" {_FONT} font-size="7" text-anchor="middle" '
                             f'{label} data-value="n/a">n/a</text>')
                continue
            y = top + plot - (min(max(value, low), high) - low) * scale
            y_top, bar = min(y, zero), abs(zero - y)
            parts.append(f'<rect x="{x}" y="{y_top:.1f}" width="11" height="{max(bar, 0.5):.1f}" '
                         f'fill="{PALETTE[s % len(PALETTE)]}" {label} data-value="{_number(value)}">'
                         f'<title>{escape(name)} {escape(category)}: {_number(value)}</title></rect>')
        anchor = f"{x0 + group_width / 2:.1f} {top + plot + 12}"
        parts.append(f'<text x="{x0 + group_width / 2:.1f}" y="{top + plot + 12}" {_FONT} text-anchor="end" '
                     f'transform="rotate(-60 {anchor})">{escape(category)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bin_counts(values: Sequence[float], bins: int, low: float, high: float) -> list[int]:
    """Counts in ``bins`` equal bins over [low, high]; values outside go to the end bins."""
    counts = [0] * bins
    for value in values:
        position = int((value - low) / (high - low) * bins)
        counts[min(max(position, 0), bins - 1)] += 1
    return counts


def _bin_labels(bins: int, low: float, high: float) -> list[str]:
    edges = [low + (high - low) * b / bins for b in range(bins)]
    return [f"{edge:.2f}-{edge + (high - low) / bins:.2f}" for edge in edges]


def histogram(title: str, values: Sequence[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> str:
    """Counts of ``values`` in ``bins`` equal bins over [low, high] (values outside go to the end bins).

    Each bar's ``data-value`` is its count and ``data-label`` its bin, e.g. ``"0.90-1.00"``.
    """
    counts = _bin_counts(values, bins, low, high)
    width, height, left, top, plot = 60 + 34 * bins, 230, 40, 30, 160
    peak = max(counts + [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" {_FONT} font-weight="bold">{escape(title)}</text>',
             f'<line x1="{left}" x2="{left + 34 * bins}" y1="{top + plot}" y2="{top + plot}" stroke="#999"/>']
    for b, (count, label) in enumerate(zip(counts, _bin_labels(bins, low, high))):
        edge = low + (high - low) * b / bins
        bar = plot * count / peak
        x = left + 34 * b
        parts.append(f'<rect x="{x + 2}" y="{top + plot - bar:.1f}" width="30" height="{max(bar, 0.5):.1f}" '
                     f'fill="{PALETTE[0]}" data-series="episodes" data-label="{label}" data-value="{count}">'
                     f'<title>{label}: {count}</title></rect>')
        parts.append(f'<text x="{x + 17}" y="{top + plot - bar - 3:.1f}" {_FONT} text-anchor="middle">{count}</text>')
        parts.append(f'<text x="{x + 2}" y="{top + plot + 13}" {_FONT} font-size="9">{edge:.1f}</text>')
    parts.append(f'<text x="{left + 34 * bins}" y="{top + plot + 13}" {_FONT} font-size="9">{high:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def grouped_histogram(title: str, series: Mapping[str, Sequence[float]], bins: int = 10, low: float = 0.0,
                      high: float = 1.0) -> str:
    """Several histograms on one axis: per bin over [low, high], one bar per series (its count).

    Drawn by :func:`grouped_bars`: each bar's ``data-series`` is its series, ``data-label`` its bin
    (e.g. ``"0.90-1.00"``) and ``data-value`` its count (``"3.000"``).
    """
    counts = {name: _bin_counts(values, bins, low, high) for name, values in series.items()}
    peak = max([1] + [count for row in counts.values() for count in row])
    return grouped_bars(title, _bin_labels(bins, low, high), counts, low=0.0, high=float(peak))


def line_chart(title: str, series: Mapping[str, Sequence[float | None]], band: tuple[int, int] | None = None,
               band_label: str = "selected", x_label: str = "iteration") -> str:
    """Lines over a shared x axis 0, 1, ... (e.g. training iterations); the y axis fits the values.

    Each line is a ``<polyline>`` whose ``data-series`` is its name and ``data-values`` its values
    (comma-separated, "nan" for a missing one; missing values break the line). ``band`` shades the
    x range ``[first, last]`` (``data-band="first-last"``), e.g. the stretch a model selection chose.
    """
    names = list(series)
    count = max([len(values) for values in series.values()] + [1])
    finite = [v for values in series.values() for v in values if v is not None and v == v]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    left, top, plot_w, plot_h = 52, 40, 360, 150
    legend_end = left + 130 * (len(names) - 1) + 24 + 7 * len(names[-1]) if names else 0
    width, height = max(left + plot_w + 16, legend_end), top + plot_h + 34

    def x_of(i: float) -> float:
        return left + plot_w * (i / max(count - 1, 1))

    def y_of(v: float) -> float:
        return top + plot_h - (v - low) / (high - low) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart curves" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" {_FONT} font-weight="bold">{escape(title)}</text>']
    parts += _legend(names, left, 32)
    if band is not None:
        first, last = band
        parts.append(f'<rect x="{x_of(first):.1f}" y="{top}" width="{max(x_of(last) - x_of(first), 2):.1f}" '
                     f'height="{plot_h}" fill="#f3e3a6" data-band="{first}-{last}">'
                     f'<title>{escape(band_label)}: {first}-{last}</title></rect>')
    for tick in (low, (low + high) / 2, high):
        y = y_of(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" {_FONT} text-anchor="end">{tick:.3g}</text>')
    for tick in sorted({0, count // 2, count - 1}):
        parts.append(f'<text x="{x_of(tick):.1f}" y="{top + plot_h + 14}" {_FONT} text-anchor="middle">{tick}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 28}" {_FONT} text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    for s, name in enumerate(names):
        values = list(series[name])
        color = PALETTE[s % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for i, v in enumerate(values):
            if v is None or v != v:
                runs.append([])
            else:
                runs[-1].append(f"{x_of(i):.1f},{y_of(v):.1f}")
        listed = ",".join("nan" if v is None or v != v else _number(v) for v in values)
        for points in (r for r in runs if r):
            parts.append(f'<polyline points="{" ".join(points)}" stroke="{color}" fill="none" '
                         f'data-series="{escape(name)}" data-values="{listed}"/>')
    parts.append("</svg>")
    return "".join(parts)
