"""Procedurally drawn scenes with their ground truth: 1-4 shapes, colours, positions, sizes, a word.

Each scene is a `Scene` (what is where) and an RGB picture of it. The drawing varies what another
drawing program would vary: canvas size and aspect, background (flat or gradient), outline or not,
anti-aliasing (supersampled or not), small jitter, and JPEG or PNG encoding. Objects sit in distinct
slots (left, right, top, bottom, middle), so every question about a scene has one answer.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (240, 215, 30), "green": (40, 165, 60),
    "blue": (40, 85, 220), "purple": (135, 50, 185), "pink": (245, 125, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
SLOTS = {"left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.17), "bottom": (0.5, 0.83),
         "middle": (0.5, 0.5)}
SIZES = {"small": 0.17, "big": 0.29}  # diameter as a fraction of the canvas' short side
WORDS = ("cat", "dog", "sun", "box", "hat", "cup", "map", "pen", "car", "bus", "egg", "fox")


@dataclass(frozen=True)
class Shape:
    """One drawn object."""

    shape: str
    color: str
    slot: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What a picture shows: its shapes (in slot order) and an optional printed word with its slot."""

    shapes: tuple[Shape, ...]
    word: str | None = None
    word_slot: str | None = None


def draw_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene's content: 1-4 shapes of distinct kinds and colours in distinct slots, maybe a word."""
    n = int(rng.integers(1, 5))
    slots = list(rng.permutation(list(SLOTS)))
    kinds = rng.permutation(SHAPES)[:n]
    colors = rng.permutation(list(COLORS))[:n]
    shapes = [Shape(str(k), str(c), str(s), str(rng.choice(list(SIZES)))) for k, c, s in
              zip(kinds, colors, slots[:n], strict=True)]
    shapes.sort(key=lambda s: list(SLOTS).index(s.slot))
    word = word_slot = None
    if n < len(SLOTS) and rng.random() < 0.5:
        word, word_slot = str(rng.choice(WORDS)), str(slots[n])
    return Scene(tuple(shapes), word, word_slot)


@dataclass(frozen=True)
class Box:
    """Where an object landed in the final picture (pixels): its centre and half-size."""

    index: int  # into scene.shapes, or -1 for the word
    cx: float
    cy: float
    half_w: float
    half_h: float


def render(scene: Scene, rng: np.random.Generator, boxes: list[Box] | None = None,
           hidden: frozenset[int] = frozenset()) -> Image.Image:
    """Draw `scene` with random style; returns an RGB image as decoded from its PNG or JPEG file.

    When `boxes` is a list, each object's `Box` is appended to it (for per-patch training labels).
    Shapes whose index is in `hidden` are not drawn, yet use the generator as if they were, so the
    frames of a clip drawn from equal generators differ only in which shapes show.
    """
    short = int(rng.integers(96, 321))
    aspect = float(rng.uniform(0.75, 1.33))
    w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
    ss = 3 if rng.random() < 0.6 else 1  # supersampled (anti-aliased) or jagged
    canvas = _background(rng, w * ss, h * ss)
    draw = ImageDraw.Draw(canvas)
    outline = _outline_style(rng)
    unit = min(w, h) * ss
    for i, obj in enumerate(scene.shapes):
        cx, cy = _place(rng, obj.slot, w * ss, h * ss, unit)
        d = SIZES[obj.size] * unit * float(rng.uniform(0.9, 1.1))
        if boxes is not None:
            boxes.append(Box(i, cx / ss, cy / ss, d / 2 / ss, d / 2 / ss))
        color = _jitter(rng, COLORS[obj.color])
        tilt = float(rng.uniform(-0.25, 0.25))
        if i not in hidden:
            _shape(draw, obj.shape, cx, cy, d / 2, color, outline, ss, tilt)
    if scene.word:
        cx, cy = _place(rng, scene.word_slot, w * ss, h * ss, unit)
        size = int(unit * rng.uniform(0.13, 0.17))
        font = ImageFont.load_default(size=max(size, 8))
        ink = (20, 20, 20) if _luma(canvas.getpixel((int(cx), int(cy)))) > 110 else (240, 240, 240)
        stroke = int(rng.integers(0, 2)) * ss
        draw.text((cx, cy), scene.word.upper(), fill=ink, font=font, anchor="mm", stroke_width=stroke, stroke_fill=ink)
        if boxes is not None:
            left, top, right, bottom = draw.textbbox((cx, cy), scene.word.upper(), font=font, anchor="mm",
                                                     stroke_width=stroke)
            boxes.append(Box(-1, (left + right) / 2 / ss, (top + bottom) / 2 / ss, (right - left) / 2 / ss,
                             (bottom - top) / 2 / ss))
    image = canvas.resize((w, h), Image.Resampling.LANCZOS) if ss > 1 else canvas
    return _encode_decode(rng, image)


def make_example(seed: int, boxes: list[Box] | None = None) -> tuple[Scene, Image.Image]:
    """The scene and picture for `seed` (the same seed gives the same pair); boxes as in `render`."""
    rng = np.random.default_rng(seed)
    scene = draw_scene(rng)
    return scene, render(scene, rng, boxes)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    # Greys and pale or dark tints: far in hue saturation from every shape colour.
    base = rng.integers(0, 256)
    tint = rng.integers(-18, 19, 3)
    top = np.clip(base + tint, 0, 255)
    if rng.random() < 0.3:
        bottom = np.clip(top + rng.integers(-50, 51), 0, 255)
        t = np.linspace(0, 1, h)[:, None, None]
        arr = top * (1 - t) + bottom * t
        return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8))
    return Image.new("RGB", (w, h), tuple(int(v) for v in top))


def _outline_style(rng: np.random.Generator) -> tuple[tuple[int, int, int], int] | None:
    if rng.random() < 0.6:
        return None
    color = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    return color, int(rng.integers(1, 4))


def _place(rng: np.random.Generator, slot: str, w: int, h: int, unit: float) -> tuple[float, float]:
    fx, fy = SLOTS[slot]
    # Slots are placed on the central square (of side `unit`) so that wide canvases keep them apart.
    x = w / 2 + (fx - 0.5) * unit + rng.uniform(-0.03, 0.03) * unit
    y = h / 2 + (fy - 0.5) * unit + rng.uniform(-0.03, 0.03) * unit
    if fx != 0.5:
        x = w / 2 + (x - w / 2) * w / unit  # spread left/right to the canvas' width
    if fy != 0.5:
        y = h / 2 + (y - h / 2) * h / unit
    return x, y


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in rgb)


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple,
           outline: tuple | None, ss: int, turn: float) -> None:
    line, width = (outline[0], outline[1] * ss) if outline else (None, 0)
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=line, width=width)
        return
    if kind == "square":
        a = r * 0.85
        pts = [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    elif kind == "triangle":
        angles = [turn * 0.3 + k * 2 * math.pi / 3 for k in range(3)]
        pts = [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in angles]
    else:  # five-pointed star
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            ang = turn * 0.2 + k * math.pi / 5
            pts.append((cx + rad * math.sin(ang), cy - rad * math.cos(ang)))
    draw.polygon(pts, fill=fill, outline=line, width=width)


def _encode_decode(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buf, "JPEG", quality=int(rng.integers(55, 96)))
    else:
        image.save(buf, "PNG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
