"""The HTML report of a load run: inline SVG line charts and tables, no script, no CDN."""

from __future__ import annotations

import html as _html
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
WIDTH, HEIGHT, PAD = 860, 260, 48


def line_chart(
    title: str,
    lines: dict[str, Sequence[tuple[float, float]]],
    *,
    unit: str = "",
    log: bool = False,
    shade: tuple[float, float] | None = None,
) -> str:
    """One SVG chart of ``{label: [(x, y), ...]}``; ``shade`` greys the steady window."""
    points = [p for values in lines.values() for p in values]
    if not points:
        return f"<p><em>{_html.escape(title)}: no data</em></p>"
    import math

    xmax = max(p[0] for p in points) or 1.0
    ys = [p[1] for p in points]

    def fy(v: float) -> float:
        return math.log10(max(v, 0.1)) if log else v

    ymin = fy(0.1) if log else 0.0
    ymax = max(fy(v) for v in ys)
    ymax = ymax if ymax > ymin else ymin + 1
    w, h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def sx(x: float) -> float:
        return PAD + x / xmax * w

    def sy(y: float) -> float:
        return PAD + h - (fy(y) - ymin) / (ymax - ymin) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'role="img" aria-label="{_html.escape(title)}">',
             f'<text x="{PAD}" y="20" font-weight="bold">{_html.escape(title)}</text>']  # fmt: skip
    if shade:
        parts.append(f'<rect x="{sx(shade[0]):.1f}" y="{PAD}" width="{sx(shade[1]) - sx(shade[0]):.1f}" '
                     f'height="{h}" fill="#f2f2f2"/>')  # fmt: skip
    for i in range(5):
        value = ymin + (ymax - ymin) * i / 4
        shown = 10**value if log else value
        y = PAD + h - h * i / 4
        parts.append(f'<line x1="{PAD}" x2="{PAD + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{PAD - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{shown:,.3g}</text>')  # fmt: skip
    for i in range(6):
        x = xmax * i / 5
        parts.append(f'<text x="{sx(x):.1f}" y="{PAD + h + 14}" font-size="10" text-anchor="middle">'
                     f'{x:.0f} s</text>')  # fmt: skip
    parts.append(f'<text x="8" y="{PAD - 8}" font-size="10">{_html.escape(unit)}</text>')
    for n, (label, values) in enumerate(lines.items()):
        color = COLORS[n % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{PAD + 8 + 150 * n}" y="{HEIGHT - 8}" font-size="11" fill="{color}">'
                     f'■ {_html.escape(label)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def latency_chart(timeline: list[dict[str, float]], lo: float, hi: float) -> str:
    """p50/p95/p99 per second of due time, log scale, steady window shaded."""
    return line_chart(
        "surge load: latency from the intended start (ms, log scale)",
        {p: [(r["t"], r[p]) for r in timeline] for p in ("p50", "p95", "p99")},
        unit="ms (log)", log=True, shade=(lo, hi),
    )  # fmt: skip


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f"<tr><th>{_html.escape(k)}</th><td>{_html.escape(v)}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def render(
    name: str,
    *,
    options: dict[str, Any],
    summary: dict[str, Any],
    timeline: list[dict[str, float]],
    series: dict[str, list[tuple[float, float]]],
    capacity: dict[str, Any] | None,
    misses: list[str],
) -> str:
    ramp = float(options["ramp"])
    shade = (ramp, ramp + float(options["duration"]))
    latency = summary["latency"]
    verdict = "meets every target" if not misses else "misses: " + "; ".join(misses)
    charts = [
        latency_chart(timeline, *shade),
        line_chart("Throughput", {"offered (due)": [(r["t"], r["offered"]) for r in timeline],
                                  "served (done)": [(r["t"], r["served"]) for r in timeline]},
                   unit="requests/s", shade=shade),
        line_chart("Errors", {"errors": [(r["t"], r["errors"]) for r in timeline]},
                   unit="per second", shade=shade),
        line_chart("Privilege lookups by cache tier",
                   {k.split(": ", 1)[1]: v for k, v in series.items() if k.startswith("lookups/s")},
                   unit="lookups/s", shade=shade),
        line_chart("Database pool (all web processes)",
                   {k: v for k, v in series.items() if k.startswith("pool") or k.startswith("requests")},
                   unit="connections / requests", shade=shade),
    ]  # fmt: skip
    where = summary["where"]
    rows = [
        ("verdict", verdict),
        ("users / think", f"{options['users']:,} users, mean think {summary['think_s']:.2f} s"),
        ("offered / served", f"{summary['offered_rps']:,}/s / {summary['served_rps']:,}/s"),
        ("latency p50 / p90 / p95 / p99 / p99.9 / max",
         " / ".join(f"{latency[k]:,} ms" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms", "max_ms"))),
        ("errors", f"{summary['errors']:,} ({summary['error_rate']:.4%}) {json.dumps(summary['statuses'])}"),
        ("cache", json.dumps(summary.get("cache", {}))),
        ("where the time went (p50 / p95 / p99)", ""),
        ("· client: due → sent", _ps(where["client_wait_before_send"])),
        ("· server: queue (sent → handler)", _ps(where["server_queue"])),
        ("· server: app (handler → first byte)", _ps(where["server_app"])),
        ("TCP connects", f"{summary['connects']:,}"),
    ]  # fmt: skip
    cpu = summary.get("cpu", {})
    if cpu:
        rows.append(("CPU by role, steady phase (cores; µs per answered request: user + kernel)",
                     f"machine {cpu['machine']['cores']:.2f} cores, unexplained "
                     f"{cpu['unexplained_cores']:.2f}"))  # fmt: skip
        for role, f in cpu["roles"].items():
            rows.append((f"· {role}", f"{f['cores']:.2f} cores; {f['us_per_request']:g} µs "
                         f"({f['user_us_per_request']:g} + {f['kernel_us_per_request']:g})"))  # fmt: skip
    steps = "".join(
        f"<tr><td>{_html.escape(n)}</td><td>{s['requests']:,}</td><td>{s['p50_ms']}</td>"
        f"<td>{s['p95_ms']}</td><td>{s['p99_ms']}</td><td>{s['p99.9_ms']}</td></tr>"
        for n, s in summary["steps"].items()
    )
    cap = ""
    if capacity:
        cap_rows = "".join(
            f"<tr><td>{s['rate']:,}/s</td><td>{'meets' if s['ok'] else 'misses'}</td>"
            f"<td>{s['served_rps']:,}</td><td>{s['p95_ms']}</td><td>{s['p99_ms']}</td>"
            f"<td>{s['error_rate']:.4%}</td><td>{_html.escape('; '.join(s['misses']))}</td></tr>"
            for s in capacity["steps"]
        )
        cap = (f"<h2>Capacity search: {capacity['capacity_rps']:,}/s meeting every target, "
               f"{capacity.get('serving_capacity_rps', 0):,}/s meeting p95, p99, errors and served"
               "</h2><table><tr><th>rate</th>"
               "<th>verdict</th><th>served/s</th><th>p95 ms</th><th>p99 ms</th><th>errors</th>"
               f"<th>why</th></tr>{cap_rows}</table>")  # fmt: skip
    errors = "".join(
        f"<li>{_html.escape(k)}: {v:,}</li>" for k, v in summary["errors_by_kind"].items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>surge load — {_html.escape(name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}}
svg{{display:block;margin:1em 0;border:1px solid #eee}}</style></head><body>
<h1>surge load {_html.escape(options["scenario"])}</h1>
<p>{datetime.now(UTC).isoformat(timespec="seconds")} · steady phase shaded grey · latency counted from each
request's intended (due) start, so a stall shows as latency, not as fewer requests.
Generator, Surge, PostgreSQL and Redis share this machine's cores.</p>
{_table(rows)}
<h2>Per step</h2><table><tr><th>step</th><th>requests</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>
<th>p99.9 ms</th></tr>{steps}</table>
{"".join(charts)}
{cap}
<h2>Errors by kind</h2><ul>{errors or "<li>none</li>"}</ul>
<h2>Options</h2><pre>{_html.escape(json.dumps({k: v for k, v in options.items() if k != "server_env"}, indent=1))}</pre>
</body></html>
"""


def _ps(p: dict[str, float]) -> str:
    return f"{p['p50_ms']} / {p['p95_ms']} / {p['p99_ms']} ms"
