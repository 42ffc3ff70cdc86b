"""Inline SVG line charts, drawn on the server (no chart library, no build step): the page
stays one HTML document a strict CSP allows, readable without JavaScript."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT, PAD = 560, 150, 34
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value * 100:.1f} %"
    if unit == "B":
        return f"{value / 2**20:.0f} MiB"
    if abs(value) >= 100:
        return f"{value:.0f}{(' ' + unit) if unit else ''}"
    return f"{value:.2f}{(' ' + unit) if unit else ''}"


def line_chart(
    chart_id: str,
    title: str,
    times: Sequence[float],
    series: dict[str, Sequence[float | None]],
    *,
    unit: str = "",
    floor_max: float = 0.0,
    threshold: float | None = None,
) -> str:
    """One chart: ``series`` name -> values aligned with ``times`` (None: no data)."""
    points = [v for values in series.values() for v in values if v is not None]
    latest = {
        name: next((v for v in reversed(vs) if v is not None), None) for name, vs in series.items()
    }
    legend = " · ".join(
        f'<span class="dot" data-c="{i}"></span>{escape(name)} '
        f"<b>{escape(_fmt(v, unit)) if v is not None else '–'}</b>"
        for i, (name, v) in enumerate(latest.items())
    )
    head = f'<figure class="chart" id="{escape(chart_id)}" data-points="{len(times)}">'
    head += f"<figcaption>{escape(title)} <small>{legend}</small></figcaption>"
    if not times or not points:
        return head + '<p class="empty">No data yet: charts fill every few seconds.</p></figure>'
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1.0)
    top = max([*points, floor_max, threshold or 0.0]) or 1.0
    top *= 1.1

    def xy(t: float, v: float) -> str:
        x = PAD + (t - t0) / span * (WIDTH - PAD - 6)
        y = HEIGHT - 18 - v / top * (HEIGHT - 30)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<line x1="{PAD}" y1="{HEIGHT - 18}" x2="{WIDTH}" y2="{HEIGHT - 18}" stroke="#cbd5e1"/>',
        f'<text x="2" y="14" font-size="10" fill="#64748b">{escape(_fmt(top, unit))}</text>',
        f'<text x="2" y="{HEIGHT - 20}" font-size="10" fill="#64748b">0</text>',
        f'<text x="{PAD}" y="{HEIGHT - 4}" font-size="10" fill="#64748b">'
        f"−{span / 60:.0f} min</text>"
        if span >= 120
        else f"−{span:.0f} s</text>",
        f'<text x="{WIDTH - 30}" y="{HEIGHT - 4}" font-size="10" fill="#64748b">now</text>',
    ]
    if threshold is not None:
        y = HEIGHT - 18 - threshold / top * (HEIGHT - 30)
        parts.append(
            f'<line x1="{PAD}" y1="{y:.1f}" x2="{WIDTH}" y2="{y:.1f}" stroke="#f59e0b" '
            f'stroke-dasharray="4 3"><title>alert threshold {escape(_fmt(threshold, unit))}'
            "</title></line>"
        )
    for i, (name, values) in enumerate(series.items()):
        coords = " ".join(xy(t, v) for t, v in zip(times, values, strict=False) if v is not None)
        if coords:
            parts.append(
                f'<polyline class="series" data-name="{escape(name)}" fill="none" '
                f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.6" points="{coords}"/>'
            )
    parts.append("</svg>")
    return head + "".join(parts) + "</figure>"
