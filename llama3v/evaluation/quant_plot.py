"""The quant-report's picture: file size against KL divergence, one point per combination, drawn with Pillow.

Pillow is already a dependency (matplotlib is not), and a scatter plot with a log axis is little
code. KL spans decades (q8_0 ~1e-4, q2_k ~1), so its axis is logarithmic; a KL of exactly 0 (the
f32 model against itself) has no logarithm and sits on the bottom edge, marked as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_W, _H = 960, 640
_LEFT, _RIGHT, _TOP, _BOTTOM = 100, 190, 50, 70  # margins; the legend goes on the right
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Point:
    """One combination: size in MiB, mean KL, its label, and the group that picks its colour (the model type)."""

    size_mib: float
    kl: float
    label: str
    group: str


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def draw_size_vs_kl(points: list[Point], path: Path, title: str) -> None:
    """Write a PNG scatter plot of size (x, linear) against mean KL (y, log) to `path`."""
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP  # plot box; y0 is the bottom edge

    x_max = max(p.size_mib for p in points) * 1.08 or 1.0
    step = _nice_step(x_max)
    positive = [p.kl for p in points if p.kl > 0]
    lo = math.floor(math.log10(min(positive))) if positive else -6
    hi = max(math.ceil(math.log10(max(positive))) if positive else lo + 1, lo + 1)
    zeros = len(positive) < len(points)
    if zeros:
        lo -= 1  # a decade of its own below the smallest KL, so that 0 is not read as 10^lo

    def px(size: float) -> float:
        return x0 + (x1 - x0) * size / x_max

    def py(kl: float) -> float:
        v = math.log10(kl) if kl > 0 else lo
        return y0 - (y0 - y1) * (v - lo) / (hi - lo)

    d.rectangle((x0, y1, x1, y0), outline="black")
    tick = 0.0
    while tick <= x_max:
        d.line((px(tick), y0, px(tick), y0 + 5), fill="black")
        d.text((px(tick), y0 + 8), f"{tick:g}", fill="black", font=small, anchor="mt")
        tick += step
    for e in range(lo, hi + 1):
        d.line((x0, py(10.0 ** e), x1, py(10.0 ** e)), fill=(225, 225, 225))
        d.text((x0 - 8, py(10.0 ** e)), "0" if e == lo and zeros else f"1e{e}",
               fill="black", font=small, anchor="rm")
    d.text(((x0 + x1) / 2, _H - 25), "mmproj + model size (MiB)", fill="black", font=font, anchor="mm")
    d.text((12, (y0 + y1) / 2), "mean KL", fill="black", font=font, anchor="lm")
    d.text(((x0 + x1) / 2, 22), title, fill="black", font=font, anchor="mm")

    groups = list(dict.fromkeys(p.group for p in points))
    colors = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups)}
    for p in points:
        cx, cy, c = px(p.size_mib), py(p.kl), colors[p.group]
        d.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=c if p.kl > 0 else "white", outline=c, width=2)
        d.text((cx + 7, cy - 7), p.label, fill=(60, 60, 60), font=small, anchor="ls")
    d.text((x1 + 20, y1), "model type", fill="black", font=font, anchor="lt")
    for i, g in enumerate(groups):
        ly = y1 + 28 + 20 * i
        d.ellipse((x1 + 20, ly - 5, x1 + 30, ly + 5), fill=colors[g])
        d.text((x1 + 38, ly), g, fill="black", font=small, anchor="lm")
    d.text((x1 + 20, y1 + 40 + 20 * len(groups)), "labels: mmproj type", fill=(90, 90, 90), font=small, anchor="lt")
    img.save(path)
