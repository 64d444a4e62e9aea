"""Turn an image into the RGB tile(s) the vision tower sees, exactly as Hugging Face prepares them.

Tiles are handed to libmtmd at exactly the tower's input size, so libmtmd's own resize and grey
padding (which differ from HF's) never run. Modes (docs/formats.md):
  resize  CLIP: shortest edge to the tower size (bicubic), then centre crop
  squash  SigLIP: resize both edges to the tower size (bicubic)
  pad     LLaVA-1.5: pad to a square with the mean colour, then as `resize`
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from llama3v.errors import Llama3vError

MODES = ("resize", "squash", "pad")
MAX_PIXELS = 100_000_000  # refuse larger images (decompression bombs); ImageSpec.max_pixels overrides

ImageInput = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its images: tower input size, preprocessing mode, mean colour for padding."""

    size: int
    mode: str = "resize"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise Llama3vError(f"unknown preprocessing mode {self.mode!r}; choose one of {', '.join(MODES)}")


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, bytes, a PIL image or a uint8 array; return it decoded, upright, RGB."""
    if isinstance(source, np.ndarray):
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
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data) if data is not None else source)
                w, h = image.size
                if w * h > max_pixels:
                    raise Llama3vError(f"{name}: {w}x{h} image exceeds the {max_pixels:,}-pixel limit")
                image.load()
        except Llama3vError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL clips wide greyscale at 255 when converting; rescale to 8 bits instead.
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size else 0
        image = Image.fromarray((arr * (255.0 / top) if top > 0 else arr).clip(0, 255).astype(np.uint8))
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
    if spec.mode == "pad":
        image = expand_to_square(image, tuple(int(m * 255) for m in spec.mean))
    if spec.mode == "squash":
        image = image.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    else:
        image = resize_shortest_edge(image, spec.size)
        image = center_crop(image, spec.size)
    return np.asarray(image, dtype=np.uint8)


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
