"""Drawn test scenes: deterministic RGB pictures with shapes, gradients and text-like strokes.

Tests, the demo and quant-report use them when no real media is given: they have edges, flat
areas and colour, so a vision tower sees something other than a constant.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

_COLORS = [(220, 40, 40), (40, 90, 220), (40, 170, 70), (240, 200, 30), (30, 30, 30), (250, 250, 250)]


def scene(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A picture of a few shapes on a gradient; the same seed gives the same picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (y / max(height - 1, 1))[..., None]
    base = (top * (1 - t) + bottom * t + 12 * np.sin(x / 7.0)[..., None]).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        color = _COLORS[int(rng.integers(len(_COLORS)))]
        x0, y0 = int(rng.integers(0, width * 3 // 4 + 1)), int(rng.integers(0, height * 3 // 4 + 1))
        x1 = x0 + int(rng.integers(width // 10, width // 3 + 1))
        y1 = y0 + int(rng.integers(height // 10, height // 3 + 1))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color)
    for i in range(int(rng.integers(2, 5))):  # thin strokes, like lines of text
        yy = int(rng.integers(0, height))
        draw.line((width // 10, yy, width * 9 // 10, yy + i), fill=_COLORS[4], width=2)
    return image


def scenes(n: int, width: int = 320, height: int = 240) -> list[Image.Image]:
    """`n` different scenes."""
    return [scene(i, width, height) for i in range(n)]
