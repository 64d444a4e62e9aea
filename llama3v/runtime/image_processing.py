"""Turn an image into the RGB tiles the vision tower sees, exactly as Hugging Face prepares them.

Tiles are handed to libmtmd at exactly the tower's input size, so libmtmd's own resize and grey
padding (which differ from HF's) never run. One tile per image (docs/formats.md):
  resize  CLIP: shortest edge to the tower size (bicubic), then centre crop
  squash  SigLIP: resize both edges to the tower size (bicubic)
  pad     LLaVA-1.5: pad to a square with the mean colour, then as `resize`
High resolution (docs/high-resolution.md):
  anyres  LLaVA-NeXT: a base view squashed to the tower size, plus the image resized into the best
          grid of the checkpoint's pinpoints, padded with black and cut into tiles
  slices  single-resolution models: a global view in the model's own mode, plus up to max_tiles
          tower-size slices on the grid closest to the image's aspect ratio
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from llama3v.errors import Llama3vError

MODES = ("resize", "squash", "pad")
MAX_PIXELS = 100_000_000  # refuse larger images (decompression bombs); ImageSpec.max_pixels overrides
# Pillow's own bomb check (a warning past its limit, an error past twice that) would otherwise enforce its default
# of 89.48 M pixels; load_image checks the image's size against max_pixels itself, from the header.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

ImageInput = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its images: tower size, single-tile mode, padding colour, high-resolution options."""

    size: int
    mode: str = "resize"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = MAX_PIXELS
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width) pairs; non-empty: anyres
    max_tiles: int | None = None  # anyres: the largest grid allowed; otherwise >= 2 turns slices on

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise Llama3vError(f"unknown preprocessing mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise Llama3vError(f"--max-tiles must be at least 1, got {self.max_tiles}")
        for h, w in self.grid_pinpoints:
            if h <= 0 or w <= 0 or h % self.size or w % self.size:
                raise Llama3vError(f"grid pinpoint {h}x{w} is not a multiple of the tower size {self.size}")
            if h * w > self.max_pixels:  # the anyres canvas has this size
                raise Llama3vError(f"grid pinpoint {h}x{w} exceeds the {self.max_pixels:,}-pixel limit")


@dataclass(frozen=True)
class TileLayout:
    """How one image became tiles: `kind` single/anyres/slices; in the last two tiles[0] is the base view."""

    kind: str
    grid: tuple[int, int]  # rows, columns of high-resolution tiles; (0, 0) when there are none
    image_size: tuple[int, int]  # the image's (width, height) before tiling

    @property
    def n_tiles(self) -> int:
        """Tiles to encode, the base view included."""
        return 1 + self.grid[0] * self.grid[1] if self.kind != "single" else 1


@dataclass
class ProcessedImage:
    """An image's tiles, uint8 [n, size, size, 3], and their layout."""

    tiles: np.ndarray
    layout: TileLayout


def process_image(image: Image.Image, spec: ImageSpec) -> ProcessedImage:
    """The tiles of one image and how they are laid out (see the module docstring for the modes)."""
    size = (image.width, image.height)
    if spec.grid_pinpoints:
        return _anyres(image, spec)
    if spec.max_tiles and spec.max_tiles >= 2:
        grid = slice_grid(size, spec.size, spec.max_tiles)
        if grid != (0, 0):
            rows, cols = grid
            full = image.resize((cols * spec.size, rows * spec.size), Image.Resampling.BICUBIC)
            tiles = [prepare_tile(image, spec), *_cut(np.asarray(full), spec.size)]
            return ProcessedImage(np.stack(tiles), TileLayout("slices", grid, size))
    return ProcessedImage(prepare_tile(image, spec)[None], TileLayout("single", (0, 0), size))


def select_best_resolution(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of (height, width): most effective resolution, then least waste."""
    w, h = size
    best, best_effective, best_waste = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def anyres_fit(size: tuple[int, int], spec: ImageSpec) -> tuple[int, int, int, int] | None:
    """Where anyres puts an image of `size` (w, h): canvas height and width, resized width and height (centred
    on the canvas); None when --max-tiles is below every grid (the base view alone)."""
    pinpoints = tuple(p for p in spec.grid_pinpoints
                      if spec.max_tiles is None or (p[0] // spec.size) * (p[1] // spec.size) <= spec.max_tiles)
    if not pinpoints:
        return None
    th, tw = select_best_resolution(size, pinpoints)
    w, h = size
    scale_w, scale_h = tw / w, th / h  # HF's arithmetic, in HF's order: ceil(300 * (336 / 300)) is 337
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    return th, tw, nw, nh


def _anyres(image: Image.Image, spec: ImageSpec) -> ProcessedImage:
    size = (image.width, image.height)
    base = np.asarray(image.resize((spec.size, spec.size), Image.Resampling.BICUBIC))
    fit = anyres_fit(size, spec)
    if fit is None:
        return ProcessedImage(base[None], TileLayout("anyres", (0, 0), size))
    th, tw, nw, nh = fit
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != size else image
    canvas = np.zeros((th, tw, 3), np.uint8)  # HF pads with black
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(resized)
    tiles = [base, *_cut(canvas, spec.size)]
    return ProcessedImage(np.stack(tiles), TileLayout("anyres", (th // spec.size, tw // spec.size), size))


Box = tuple[float, float, float, float]  # x, y, width, height in the original image's pixels


def tile_boxes(layout: TileLayout, spec: ImageSpec) -> tuple[Box, list[Box]]:
    """What each tile of `layout` covers of the original image: the base (or single) view, then the
    high-resolution tiles row by row (the order they are encoded in). Padding is clipped away."""
    w, h = layout.image_size
    if spec.mode == "resize" and layout.kind != "anyres":  # shortest edge to the tower size, centre crop
        side = min(w, h)
        base = ((w - side) / 2, (h - side) / 2, float(side), float(side))
    else:  # squashed, or padded to a square around the whole image
        base = (0.0, 0.0, float(w), float(h))
    rows, cols = layout.grid
    if layout.kind == "slices":
        return base, [(c * w / cols, r * h / rows, w / cols, h / rows) for r in range(rows) for c in range(cols)]
    if layout.kind != "anyres" or rows == 0:
        return base, []
    th, tw, nw, nh = anyres_fit((w, h), spec)
    top, left, sx, sy, s = (th - nh) // 2, (tw - nw) // 2, w / nw, h / nh, spec.size
    tiles = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = max(c * s - left, 0) * sx, max(r * s - top, 0) * sy
            x1, y1 = min((c + 1) * s - left, nw) * sx, min((r + 1) * s - top, nh) * sy
            tiles.append((x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)))
    return base, tiles


def slice_grid(size: tuple[int, int], tile: int, max_tiles: int) -> tuple[int, int]:
    """Rows and columns of slices for an image: about one slice per tile-size area, at most `max_tiles`,
    on the grid whose aspect ratio is closest to the image's; (0, 0) when one tile already suffices."""
    w, h = size
    ideal = min(max_tiles, math.ceil(w * h / (tile * tile)))
    if ideal < 2 and max(w, h) <= tile:
        return (0, 0)
    ideal = max(ideal, 2)
    candidates = [(r, c) for n in (ideal - 1, ideal, ideal + 1) if 2 <= n <= max_tiles
                  for r in range(1, n + 1) for c in [n // r] if r * c == n]
    return min(candidates, key=lambda rc: (abs(math.log(w / h) - math.log(rc[1] / rc[0])), rc[0] * rc[1]))


def _cut(canvas: np.ndarray, size: int) -> list[np.ndarray]:
    """Row-major size x size tiles of an array whose sides are multiples of size."""
    rows, cols = canvas.shape[0] // size, canvas.shape[1] // size
    return [np.ascontiguousarray(canvas[r * size:(r + 1) * size, c * size:(c + 1) * size])
            for r in range(rows) for c in range(cols)]


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS, spec: ImageSpec | None = None) -> Image.Image:
    """Open an image from a path, bytes, a PIL image or a uint8 array; return it decoded, upright, RGB.

    The size is checked from the header before decoding: against `max_pixels` (`spec.max_pixels` when a spec is
    given) and, with a spec, against the intermediate its preprocessing would need (a very elongated image)."""
    if spec is not None:
        max_pixels = spec.max_pixels
    if isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > max_pixels:
            raise Llama3vError(f"{source.shape[1]}x{source.shape[0]} image exceeds the {max_pixels:,}-pixel limit")
        return _from_array(source)
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        name = str(source) if isinstance(source, (str, Path)) else f"<{len(source)} bytes>"
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise Llama3vError(f"{name}: no such image file")
        data = source if isinstance(source, bytes) else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked here, with our limit
                image = Image.open(io.BytesIO(data) if data is not None else source)
                w, h = image.size
                if w * h > max_pixels:
                    raise Llama3vError(f"{name}: {w}x{h} image exceeds the {max_pixels:,}-pixel limit")
                if spec is not None:
                    check_elongation(w, h, spec)
                image.load()
        except Llama3vError:
            raise
        except Image.DecompressionBombError as e:
            raise Llama3vError(f"{name}: image too large ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable data
            raise Llama3vError(f"{name}: not a readable image ({e})") from e
    w, h = image.size
    if w * h > max_pixels:
        raise Llama3vError(f"{name}: {w}x{h} image exceeds the {max_pixels:,}-pixel limit")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block should not cost the picture
        pass
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # PIL clips 16-bit greyscale at 255 when converting; map the full 16-bit range to 8 bits.
        image = Image.fromarray(np.round(np.asarray(image, np.float64) * (255 / 65535)).astype(np.uint8))
    elif image.mode in ("I", "F"):  # 32-bit values have no fixed range: stretch the image's own
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size else 0
        image = Image.fromarray((arr * (255.0 / top) if top > 0 else arr).clip(0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # As HF's convert_to_rgb: transparency is laid over white, not dropped.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise Llama3vError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if 0 in arr.shape:
            raise Llama3vError("image array is empty")
        return _to_rgb(Image.fromarray(arr))
    raise Llama3vError(f"image arrays must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")


def prepare_tile(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One tile of spec.size x spec.size, uint8 RGB [H, W, 3], prepared as HF's processor does."""
    check_elongation(*image.size, spec)
    if spec.mode == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in spec.mean))
    if spec.mode == "squash":
        image = image.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    else:
        image = resize_shortest_edge(image, spec.size)
        image = center_crop(image, spec.size)
    return np.asarray(image, dtype=np.uint8)


def check_elongation(w: int, h: int, spec: ImageSpec) -> None:
    """Refuse an image whose preprocessing intermediate would exceed the pixel limit.

    HF's steps build a padded square or a shortest-edge resize before cropping: for a very elongated image
    either can be far larger than the image (1x100000 -> 336 x 33.6M pixels)."""
    work = {"pad": max(w, h) ** 2, "resize": spec.size * int(spec.size * max(w, h) / max(min(w, h), 1)),
            "squash": 0}
    if work[spec.mode] > spec.max_pixels:
        raise Llama3vError(f"a {w}x{h} image is too elongated for {spec.mode!r} preprocessing "
                           f"(it would need a {work[spec.mode]:,}-pixel intermediate)")


def expand_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Pad the short side equally on both ends (HF's pad_to_square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short edge is `size`, the long edge truncated as HF computes it."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return image if new == (w, h) else image.resize(new, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the centre size x size (HF's rounding: offsets floor((dim - size) / 2))."""
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
