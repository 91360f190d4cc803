"""util/charts.py — every chart the project draws, with PIL (no plotting library): a run's loss
curve (engine.Loop writes loss_curve.png), the results' charts (studies/report.py writes
results/ablation.png, results/cues/cues.png and results/regime/regime.png) and a checkpoint's
robustness (evaluate.py --robustness writes out/eval/robustness.png).

Each chart is one function that takes numbers and labels and writes a PNG; what they
share is written once above them: the palette (series i of every chart has colour i), the
plot area (`Axes`: values to pixels, frame, ticks, whiskers, lines) and the legend.
Nothing here knows about models, runs or results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from util.cli import write_png

# The colours of series 0, 1, 2, ... in every chart (matplotlib's tab10 without its olive).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
GRID, ZERO = "#e0e0e0", "#999999"         # grid lines; the zero line of a chart of differences


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def plain(text: str) -> str:
    """The text in characters PIL's default font has (no superscript two, no minus sign)."""
    return text.replace("²", "2").replace("−", "-")


def canvas(width: int, height: int) -> tuple:
    img = Image.new("RGB", (width, height), "white")
    return img, ImageDraw.Draw(img)


def legend(d: ImageDraw.ImageDraw, names: list, x: float, y: float, dx: float = 0, dy: float = 0) -> None:
    """A colour swatch and the name of each series, the i-th at (x + i dx, y + i dy)."""
    for i, name in enumerate(names):
        xi, yi = x + i * dx, y + i * dy
        d.rectangle([xi, yi + 1, xi + 10, yi + 11], fill=colour(i))
        d.text((xi + 14, yi), plain(name), fill="black")


@dataclass
class Axes:
    """A plot area: the pixel box left..right, top..bottom, showing x from x_lo to x_hi
    and y from lo to hi (upwards)."""
    d: ImageDraw.ImageDraw
    left: float
    top: float
    right: float
    bottom: float
    lo: float
    hi: float
    x_lo: float = 0.0
    x_hi: float = 1.0

    def px(self, x: float) -> float:
        return self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.lo) / (self.hi - self.lo) * (self.bottom - self.top)

    def frame(self, title: str = "") -> None:
        self.d.rectangle([self.left, self.top, self.right, self.bottom], outline="black")
        if title:
            self.d.text((self.left + 4, self.top - 18), plain(title), fill="black")

    def y_label(self, y: float, text: str) -> None:
        """A value on the y axis, written left of the area at its height."""
        self.d.text((self.left - 4 - self.d.textlength(text), self.py(y) - 6), text, fill="black")

    def y_range(self, fmt: str) -> None:
        """The two ends of the y range, labelled."""
        self.y_label(self.hi, fmt.format(self.hi))
        self.y_label(self.lo, fmt.format(self.lo))

    def y_ticks(self, step: float) -> None:
        """A labelled grid line every `step` from lo to hi."""
        for i in range(int((self.hi - self.lo) / step) + 1):
            y = self.lo + i * step
            self.d.line([(self.left, self.py(y)), (self.right, self.py(y))], fill=GRID)
            self.y_label(y, f"{y:g}")

    def x_ends(self, first: str, last: str) -> None:
        """Labels under the two ends of the x axis."""
        self.d.text((self.left, self.bottom + 6), plain(first), fill="black")
        self.d.text((self.right - self.d.textlength(plain(last)), self.bottom + 6), plain(last), fill="black")

    def zero_line(self) -> None:
        self.d.line([(self.left, self.py(0)), (self.right, self.py(0))], fill=ZERO)
        self.y_label(0, "0")

    def whisker(self, x_pixel: float, y0: float, y1: float, fill: str, width: int = 1, cap: float = 0) -> None:
        """A vertical bar from y0 to y1 at a pixel column (an error bar), with caps `cap` pixels wide."""
        self.d.line([(x_pixel, self.py(y0)), (x_pixel, self.py(y1))], fill=fill, width=width)
        for y in (y0, y1) if cap else ():
            self.d.line([(x_pixel - cap, self.py(y)), (x_pixel + cap, self.py(y))], fill=fill)

    def dot(self, x_pixel: float, y: float, fill: str, r: float = 3) -> None:
        self.d.ellipse([x_pixel - r, self.py(y) - r, x_pixel + r, self.py(y) + r], fill=fill)

    def line(self, points: list, fill: str, r: float) -> None:
        """A series: a line through its (x, y) points, a dot of radius r on each."""
        if len(points) > 1:
            self.d.line([(self.px(x), self.py(y)) for x, y in points], fill=fill, width=2)
        for x, y in points:
            self.dot(self.px(x), y, fill, r)


# -----------------------------------------------------------------------------
# The charts


def loss_curve(history: list, path: str) -> None:
    """A run's per-epoch means of every logged loss except the totals (those ending in
    "loss"), i.e. the reconstruction losses per modality over the whole run; a fine-tuning
    log has only its loss: that. `history`: engine.Loop's rows ({"epoch": e, name: mean})."""
    keys = []
    for h in history:
        keys += [k for k in h if k not in keys and k not in ("epoch", "mode", "_sums") and not k.endswith("loss")]
    if not keys:                          # fine-tuning logs only its loss: draw that
        keys = [k for k in history[0] if k.endswith("loss")] if history else []
    series = {k: [(h["epoch"], h[k]) for h in history if k in h] for k in keys}
    if not series:
        return
    W, H, left, right, pad = 760, 360, 50, 170, 30
    img, d = canvas(W, H)
    xs = [x for v in series.values() for x, _ in v]
    ax = Axes(d, left, pad, W - right, H - pad, 0.0, max(y for v in series.values() for _, y in v) * 1.05 or 1.0,
              min(xs), max(max(xs), min(xs) + 1))
    ax.frame()
    ax.x_ends(f"epoch {ax.x_lo}", f"epoch {ax.x_hi}")
    ax.y_range("{:.3g}")
    for i, pts in enumerate(series.values()):
        ax.line(pts, colour(i), r=2)
    legend(d, list(series), W - right + 10, pad, dy=14)
    write_png(path, img)


def bar_chart(groups: list, bars: dict, path: str, title: str, y_name: str) -> None:
    """Grouped bars: a group per entry of `groups`, in each a bar per series of `bars`
    ({name: [(mean, std) per group]}) with ± 1 std whiskers (cut at 0); y from 0 in steps of 10."""
    W, H, left, top, bottom, legend_w = 1000, 420, 50, 40, 60, 260
    img, d = canvas(W, H)
    ymax = max(10.0, math.ceil(max(m + e for v in bars.values() for m, e in v) / 10) * 10)
    ax = Axes(d, left, top, W - legend_w - 10, H - bottom, 0.0, ymax)
    d.text((left, 10), plain(title), fill="black")
    d.text((8, top - 20), plain(y_name), fill="black")
    ax.y_ticks(10)
    group_w = (ax.right - ax.left) / len(groups)
    bar_w = group_w * 0.8 / len(bars)
    for gi, group in enumerate(groups):
        x0 = left + gi * group_w + group_w * 0.1
        d.text((x0 + group_w * 0.3, H - bottom + 8), plain(group), fill="black")
        for i, values in enumerate(bars.values()):
            m, e = values[gi]
            xa = x0 + i * bar_w
            d.rectangle([xa, ax.py(m), xa + bar_w - 2, ax.py(0)], fill=colour(i))
            ax.whisker(xa + bar_w / 2 - 1, max(0, m - e), m + e, "black", cap=3)
    legend(d, list(bars), W - legend_w, top, dy=18)
    write_png(path, img)


def line_chart(panels: dict, path: str, x_ends: tuple) -> None:
    """Panels side by side ({title: {series: [(x, mean, error)]}}): each series a line through
    its means with ± error whiskers, over the zero line; x from the smallest to the largest
    given, its ends labelled `x_ends`. A series has the same colour in every panel."""
    W, H, pad, top = 900, 380, 50, 40
    img, d = canvas(W, H)
    pts = [p for series in panels.values() for s in series.values() for p in s]
    values = [v for _, m, e in pts for v in (m - e, m + e)]
    lo, hi = min(values + [-1.0]), max(values + [1.0])
    x_lo, x_hi = min(x for x, _, _ in pts), max(x for x, _, _ in pts)
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    panel_w = (W - (len(panels) + 1) * pad) / len(panels)
    for pi, (title, series) in enumerate(panels.items()):
        x0 = pad + pi * (panel_w + pad)
        ax = Axes(d, x0, top, x0 + panel_w, H - pad, lo, hi, x_lo, x_hi)
        ax.frame(title)
        ax.zero_line()
        ax.x_ends(*x_ends)
        ax.y_range("{:+.1f}")
        for name, points in series.items():
            c = colour(names.index(name))
            ax.line([(x, m) for x, m, _ in points], c, r=3)
            for x, m, e in points:
                ax.whisker(ax.px(x), m - e, m + e, c)
    legend(d, names, pad, H - 18, dx=260)
    write_png(path, img)


def dot_chart(panels: dict, names: list, path: str) -> None:
    """Panels side by side ({title: {group: [(mean, error) or None per entry of `names`]}}):
    in each group a dot per series with ± error whiskers, over the zero line."""
    W, H, pad, top, bottom = 1100, 400, 40, 60, 52    # room for the legend above, two label rows below
    img, d = canvas(W, H)
    ends = [v for groups in panels.values() for points in groups.values() for p in points if p
            for v in (p[0] - p[1], p[0] + p[1])]
    lo, hi = math.floor(min(ends + [-1.0])), math.ceil(max(ends + [1.0]))   # whole units: no whisker clipped
    panel_w = (W - (len(panels) + 1) * pad) / len(panels)
    for pi, (title, groups) in enumerate(panels.items()):
        x0 = pad + pi * (panel_w + pad)
        ax = Axes(d, x0, top, x0 + panel_w, H - bottom, lo, hi)
        ax.frame(title)
        ax.zero_line()
        ax.y_range("{:+.1f}")
        for gi, (group, points) in enumerate(groups.items()):
            gx = x0 + (gi + 0.5) * panel_w / len(groups)
            label = plain(group)              # neighbours alternate rows so that long labels never overlap
            d.text((gx - d.textlength(label) / 2, H - bottom + 6 + 16 * (gi % 2)), label, fill="black")
            for i, p in enumerate(points):
                if p:
                    x = gx + (i - (len(points) - 1) / 2) * 14
                    ax.whisker(x, p[0] - p[1], p[0] + p[1], colour(i), width=2)
                    ax.dot(x, p[0], colour(i))
    legend(d, names, W - 300, 10, dx=90)
    write_png(path, img)


def row_chart(rows: list, bars: dict, path: str, title: str, x_name: str) -> None:
    """Horizontal bars, a row per entry of `rows` (its label at the left) and in it a bar per
    series of `bars` ({name: [value or None per row]}; None: no bar, and no room kept for
    one), each labelled with its value; x from 0 in steps of 10."""
    left, right, top, legend_h, bar_h, gap = 170, 50, 40, 22, 13, 8
    shown = [[i for i, values in enumerate(bars.values()) if values[r] is not None] for r in range(len(rows))]
    W, H = 900, top + legend_h + sum(len(s) * bar_h + gap for s in shown) + 40
    img, d = canvas(W, H)
    xmax = max(10.0, math.ceil(max(v for vs in bars.values() for v in vs if v is not None) / 10) * 10)
    plot_top = top + legend_h
    ax = Axes(d, left, plot_top, W - right, H - 40, 0.0, 1.0, 0.0, xmax)
    d.text((8, 10), plain(title), fill="black")
    legend(d, list(bars), left, top - 6, dx=(W - left - right) / max(1, len(bars)))
    for i in range(int(xmax // 10) + 1):                     # a grid line and its value every 10
        x = ax.px(10.0 * i)
        d.line([(x, plot_top), (x, ax.bottom)], fill=GRID)
        d.text((x - 6, ax.bottom + 4), f"{10 * i}", fill="black")
    d.text((ax.right - d.textlength(plain(x_name)), ax.bottom + 20), plain(x_name), fill="black")
    series = list(bars.values())
    y = plot_top + gap / 2
    for r, (row, present) in enumerate(zip(rows, shown)):
        label = plain(row)
        d.text((left - 6 - d.textlength(label), y + len(present) * bar_h / 2 - 6), label, fill="black")
        for i in present:
            v = series[i][r]
            d.rectangle([ax.px(0), y, ax.px(v), y + bar_h - 2], fill=colour(i))
            d.text((ax.px(v) + 3, y), f"{v:.1f}", fill="black")
            y += bar_h
        y += gap
    d.rectangle([ax.left, plot_top, ax.right, ax.bottom], outline="black")
    write_png(path, img)
