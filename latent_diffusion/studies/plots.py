"""Line and scatter plots drawn with Pillow alone: axes, ticks, labelled series, a legend.

Enough for a study's figures without a plotting library among the dependencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 480
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 150, 40, 55
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))


@dataclass(frozen=True)
class Series:
    """One line (or, with ``lines=False``, a set of points) of a plot; ``labels`` name single points."""

    name: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    lines: bool = True
    labels: tuple[str, ...] = ()


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
            ticks = [m * 10.0**k for k in decades for m in mantissas if low <= m * 10.0**k <= high]
            if len(ticks) >= 3:
                return ticks
        return ticks or [low, high]
    span = high - low or 1.0
    step = 10 ** math.floor(math.log10(span / 5))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= 6)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float, log: bool) -> str:
    if log:
        exponent = math.floor(math.log10(value) + 1e-9)
        mantissa = round(value / 10.0**exponent)
        return (f"{mantissa}e{exponent}" if mantissa > 1 else f"1e{exponent}") if abs(exponent) > 3 else f"{value:g}"
    return f"{value:.6g}"


def _range(values: list[float], log: bool, fixed: tuple[float, float] | None) -> tuple[float, float]:
    if fixed is not None:
        return fixed
    low, high = min(values), max(values)
    if log:
        return low / 1.5, high * 1.5
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def plot(path: Path, series: list[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
         y_range: tuple[float, float] | None = None, x_ticks: tuple[float, ...] | None = None) -> Path:
    """Write a PNG plot of ``series`` to ``path``; non-finite points are left out. ``x_ticks``: where
    to mark the x axis (default: round numbers)."""
    clean = []
    for s in series:
        kept = [(x, y) for x, y in zip(s.xs, s.ys) if math.isfinite(x) and math.isfinite(y)]
        clean.append(Series(s.name, tuple(x for x, _ in kept), tuple(y for _, y in kept), s.lines, s.labels))
    xs = [x for s in clean for x in s.xs]
    ys = [y for s in clean for y in s.ys]
    if not xs:
        raise ValueError(f"nothing to plot in {path.name}: no finite point")
    x_low, x_high = _range(xs, log_x, None)
    y_low, y_high = _range(ys, False, y_range)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        fx = (math.log(x / x_low) / math.log(x_high / x_low)) if log_x else (x - x_low) / (x_high - x_low)
        return left + fx * (right - left), bottom - (y - y_low) / (y_high - y_low) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for tick in x_ticks or _ticks(x_low, x_high, log_x):
        px, _ = to_pixel(tick, y_low)
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.line([px, top, px, bottom], fill=(235, 235, 235))
        draw.text((px, bottom + 6), f"{tick:g}" if x_ticks else _label(tick, log_x), fill="black", font=font,
                  anchor="mt")
    for tick in _ticks(y_low, y_high, False):
        _, py = to_pixel(x_low, tick)
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left, py, right, py], fill=(235, 235, 235))
        draw.text((left - 6, py), _label(tick, False), fill="black", font=font, anchor="rm")
    for index, s in enumerate(clean):
        colour = PALETTE[index % len(PALETTE)]
        points = [to_pixel(x, y) for x, y in zip(s.xs, s.ys)]
        if s.lines and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for number, (px, py) in enumerate(points):
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            if number < len(s.labels):
                draw.text((px + 6, py - 6), s.labels[number], fill=colour, font=font, anchor="ld")
        legend_y = top + 10 + 18 * index
        draw.line([right + 12, legend_y, right + 32, legend_y], fill=colour, width=3)
        draw.text((right + 38, legend_y), s.name, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 14), title, fill="black", font=font, anchor="mm")
    draw.text(((left + right) / 2, HEIGHT - 14), x_label, fill="black", font=font, anchor="mm")
    vertical = Image.new("RGB", (bottom - top, 16), "white")
    ImageDraw.Draw(vertical).text(((bottom - top) / 2, 8), y_label, fill="black", font=font, anchor="mm")
    image.paste(vertical.rotate(90, expand=True), (6, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
