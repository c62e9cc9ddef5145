#!/usr/bin/env python3
"""Draws the burst scaling chart (docs/scaling.svg) from benches/scale.rs's scale.csv.

    python3 scripts/plot_scaling.py target/bench/scale.csv docs/scaling.svg

One line per server: completion time of the burst (every connection sends 1 KiB and reads it
back, connects included) against the number of connections, the measured medians as points and
the least-squares line through them, its slope (seconds per 1,000 connections) in the legend,
as in gaio's README. Python standard library only: the SVG is written by hand, so the chart
needs no package install and adds no dependency to the crate.
"""

import csv
import math
import sys
from xml.sax.saxutils import escape

COLORS = {
    "proactor": "#d62728",
    "proactor-inline": "#ff9896",
    "proactor-uring": "#8c564b",
    "proactor-uring-inline": "#e377c2",
    "tokio": "#1f77b4",
    "mio": "#2ca02c",
    "uring-loop": "#bcbd22",
    "std": "#7f7f7f",
}
W, H = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 40, 60


def fit(points):
    """Least-squares slope and intercept of (x, y) points; None if fewer than two."""
    pts = [(x, y) for x, y in points if math.isfinite(y)]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return slope, my - slope * mx


def nice_step(span, ticks=6):
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_scaling.py SCALE_CSV OUT_SVG")
    series = {}
    with open(sys.argv[1], newline="") as f:
        for row in csv.DictReader(f):
            try:
                y = float(row["total_s"])
            except ValueError:
                y = float("nan")
            series.setdefault(row["server"], []).append((int(row["conns"]) / 1000.0, y))
    if not series:
        sys.exit("no rows in " + sys.argv[1])

    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
    x_max = max(xs) * 1.05
    y_max = (max(ys) if ys else 1.0) * 1.1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return LEFT + x / x_max * pw

    def py(y):
        return TOP + ph - y / y_max * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/></clipPath>',
        f'<text x="{LEFT + pw / 2}" y="22" text-anchor="middle" font-size="15">'
        "Burst echo: N connections, 1 KiB each, completion time</text>",
    ]
    # Grid and axes.
    step = nice_step(y_max)
    y = 0.0
    while y <= y_max + 1e-12:
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + pw}" y2="{py(y):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    xstep = nice_step(x_max)
    x = 0.0
    while x <= x_max + 1e-12:
        out.append(f'<line x1="{px(x):.1f}" y1="{TOP + ph}" x2="{px(x):.1f}" y2="{TOP + ph + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{x:g}</text>')
        x += xstep
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">connections (thousands)</text>')
    out.append(
        f'<text x="18" y="{TOP + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + ph / 2})">seconds</text>'
    )
    # Series.
    order = [k for k in COLORS if k in series] + sorted(k for k in series if k not in COLORS)
    for i, name in enumerate(order):
        pts = sorted(series[name])
        color = COLORS.get(name, "#9467bd")
        line = fit(pts)
        if line:
            slope, icpt = line
            x0, x1 = 0.0, max(p[0] for p in pts if math.isfinite(p[1]))
            y0, y1 = icpt + slope * x0, icpt + slope * x1
            out.append(
                f'<line x1="{px(x0):.1f}" y1="{py(max(y0, 0)):.1f}" x2="{px(x1):.1f}" '
                f'y2="{py(y1):.1f}" stroke="{color}" stroke-width="1.5" stroke-dasharray="5,3" '
                'clip-path="url(#plot)"/>'
            )
        for x, y in pts:
            if math.isfinite(y):
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>')
            else:
                out.append(
                    f'<text x="{px(x):.1f}" y="{TOP + 14}" text-anchor="middle" fill="{color}">x</text>'
                )
        ly = TOP + 20 + i * 36
        label = escape(name)
        slope_text = f"{line[0]:.3f} s / 1K conns" if line else "no fit"
        out.append(f'<circle cx="{LEFT + pw + 20}" cy="{ly - 4}" r="4" fill="{color}"/>')
        out.append(f'<text x="{LEFT + pw + 30}" y="{ly}">{label}</text>')
        out.append(f'<text x="{LEFT + pw + 30}" y="{ly + 15}" fill="#555">{slope_text}</text>')
    out.append(
        f'<text x="{LEFT + pw + 12}" y="{TOP + ph}" fill="#555" font-size="10">'
        "points: medians; dashed: fit; x: failed</text>"
    )
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")
    print("wrote " + sys.argv[2])


if __name__ == "__main__":
    main()
