"""The benchmark's learning curves: quality against training wall time, mean over seeds with the seeds' spread shaded.

Each distilled benchmark row saves its student every `curve_every_s` seconds of training (`run.distill_student`) and
scores the snapshots on held-out prompts (`benchmark.curve`); `aggregate` puts the seeds on one time axis and
`draw` writes the figure (PIL only: no plotting dependency for one PNG).
"""

from __future__ import annotations

import math

METRICS = ("accuracy", "background", "mean_attributes")
METRIC_TITLES = {"accuracy": "prompt accuracy", "mean_attributes": "mean attribute accuracy"}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def _interp(points: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of sorted (t, y) points at t (held at the ends)."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, y0), (t1, y1) in zip(points, points[1:]):
        if t <= t1:
            return y0 + (y1 - y0) * (t - t0) / max(t1 - t0, 1e-9)
    return points[-1][1]


def aggregate(results: list[dict], seeds: list[int], rows: tuple[str, ...], metrics: tuple[str, ...] = METRICS,
              points: int = 30) -> dict:
    """{row: {"t": [...], "seeds": [...], metric: {"mean": [...], "std": [...]}}} for each row whose result has a
    curve on every one of `seeds`: each seed's curve interpolated onto a common time grid from the latest first point
    to the earliest last point of the seeds (one seed: its own points)."""
    out = {}
    for row in rows:
        curves = {r["seed"]: r["curve"] for r in results if r.get("task") == row and r.get("curve")}
        if not seeds or any(s not in curves for s in seeds):
            continue
        per_seed = [sorted((p["s"], p) for p in curves[s] if p.get("s") is not None) for s in seeds]
        if any(not c for c in per_seed):
            continue
        if len(seeds) == 1:
            grid = [t for t, _ in per_seed[0]]
        else:
            lo, hi = max(c[0][0] for c in per_seed), min(c[-1][0] for c in per_seed)
            grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)] if hi > lo else [lo]
        entry = {"t": grid, "seeds": list(seeds)}
        for m in metrics:
            values = [[_interp([(t, p[m]) for t, p in c], x) for x in grid] for c in per_seed]
            mean = [sum(v[i] for v in values) / len(values) for i in range(len(grid))]
            std = [math.sqrt(sum((v[i] - mean[i]) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1
                   else 0.0 for i in range(len(grid))]
            entry[m] = {"mean": mean, "std": std}
        out[row] = entry
    return out


def draw(curves: dict, labels: dict, path: str, metrics: tuple[str, ...] = METRICS, gap: str | None = None) -> str:
    """One panel per metric (y from 0 to 1), one line per row (mean over seeds) with the seeds' spread (± one
    standard deviation) shaded, training wall time in seconds on x; a legend below. Written atomically."""
    import os

    from PIL import Image, ImageDraw, ImageFont

    if not curves:
        raise ValueError("No learning curves to draw: no row has a curve on every seed.")
    font = ImageFont.load_default()
    pw, ph, left, bottom, top, gap_x = 420, 300, 46, 34, 26, 18
    t_max = max(max(c["t"]) for c in curves.values())
    step = next(s for s in (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10_000) if t_max / s <= 8)
    legend_h = 16 * len(curves) + 12
    width = len(metrics) * (left + pw + gap_x) + gap_x
    height = top + ph + bottom + legend_h
    image = Image.new("RGBA", (width, height), "white")
    for k, metric in enumerate(metrics):
        x0, y0 = gap_x + k * (left + pw + gap_x) + left, top
        shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
        sd = ImageDraw.Draw(shade)
        draw_ = ImageDraw.Draw(image)

        def xy(t, y, x0=x0, y0=y0):
            return x0 + pw * t / (step * math.ceil(t_max / step)), y0 + ph * (1 - y)

        for i in range(6):  # y grid every 0.2
            y = i / 5
            draw_.line([xy(0, y), xy(step * math.ceil(t_max / step), y)], fill=(225, 225, 225))
            draw_.text((x0 - 30, xy(0, y)[1] - 6), f"{y:.1f}", fill="black", font=font)
        for i in range(math.ceil(t_max / step) + 1):
            x = xy(i * step, 0)[0]
            draw_.line([(x, y0 + ph), (x, y0 + ph + 4)], fill="black")
            draw_.text((x - 10, y0 + ph + 6), f"{i * step}", fill="black", font=font)
        draw_.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        title = METRIC_TITLES.get(metric, f"{metric} accuracy" + (" (the gap)" if metric == gap else ""))
        draw_.text((x0, 6), title, fill="black", font=font)
        draw_.text((x0 + pw - 150, y0 + ph + 20), "training wall time (s)", fill="black", font=font)
        for j, (row, c) in enumerate(curves.items()):
            colour = COLOURS[j % len(COLOURS)]
            mean, std = c[metric]["mean"], c[metric]["std"]
            if any(std):
                upper = [xy(t, min(1.0, m + s)) for t, m, s in zip(c["t"], mean, std)]
                lower = [xy(t, max(0.0, m - s)) for t, m, s in zip(c["t"], mean, std)]
                sd.polygon(upper + lower[::-1], fill=colour + (50,))
            line = [xy(t, m) for t, m in zip(c["t"], mean)]
            if len(line) > 1:
                draw_.line(line, fill=colour, width=2)
            for p in line:
                draw_.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        image = Image.alpha_composite(image, shade)
    draw_ = ImageDraw.Draw(image)
    for j, row in enumerate(curves):
        y = top + ph + bottom + 4 + 16 * j
        colour = COLOURS[j % len(COLOURS)]
        draw_.rectangle([gap_x + left, y + 3, gap_x + left + 18, y + 9], fill=colour)
        n = len(curves[row]["seeds"])
        draw_.text((gap_x + left + 26, y), f"{labels.get(row, row)} ({n} seed{'s' if n != 1 else ''})", fill="black",
                   font=font)
    tmp = path + ".tmp"
    image.convert("RGB").save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
