"""Llama-3.2-Vision (mllama) image preparation: canvas choice, resize, pad and tile split, as MllamaImageProcessor.

An image becomes a rows x cols grid of tile x tile RGB tiles (at most `max_tiles`): the canvas is
the grid that needs the least upscaling (or, when every grid shrinks the image, the least
downscaling; ties go to the smaller area); the image is resized with PIL's bilinear filter to fit
the canvas keeping its aspect ratio (never below one tile per side), padded with black at the
bottom and right, and cut into tiles row-major. The aspect-ratio id names the grid (see
llama3v.mllama_format.aspect_ratios). The encoder pads every image to `max_tiles` tiles of zeros
*after* normalisation, which uint8 cannot express: that padding is the encoder's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llama3v.errors import Llama3vError
from llama3v.mllama_format import aspect_ratios


@dataclass(frozen=True)
class MllamaTiles:
    """One image as the mllama encoder takes it: uint8 tiles [n, tile, tile, 3], grid and aspect-ratio id."""

    tiles: np.ndarray
    grid: tuple[int, int]  # rows, columns
    aspect_ratio_id: int

    @property
    def n_tiles(self) -> int:
        """Real tiles (the encoder adds padding tiles up to its maximum)."""
        return len(self.tiles)


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The grid (rows, columns) MllamaImageProcessor picks for an image of `height` x `width`."""
    best, best_key = (1, 1), None
    # Prefer the smallest upscale >= 1; failing that, the largest downscale; then the smallest area,
    # then the first grid in id order (HF compares the float scales exactly, so do we).
    for rows, cols in aspect_ratios(max_tiles):
        scale = min(rows * tile / height, cols * tile / width)
        key = ((0, scale) if scale >= 1 else (1, -scale), rows * cols)
        if best_key is None or key < best_key:
            best, best_key = (rows, cols), key
    return best


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The (height, width) an image is resized to inside a canvas: aspect kept, each side clipped to [tile, canvas]."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def mllama_tiles(image: Image.Image, tile: int, max_tiles: int) -> MllamaTiles:
    """Resize, pad and split an RGB image into mllama tiles."""
    if image.mode != "RGB":
        raise Llama3vError(f"mllama tiles need an RGB image, got mode {image.mode}")
    if tile < 1 or max_tiles < 1:
        raise Llama3vError(f"tile size {tile} and max tiles {max_tiles} must be positive")
    width, height = image.size
    rows, cols = best_canvas(height, width, max_tiles, tile)
    new_h, new_w = fit_to_canvas(height, width, rows * tile, cols * tile, tile)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    tiles = canvas.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).reshape(rows * cols, tile, tile, 3)
    return MllamaTiles(np.ascontiguousarray(tiles), (rows, cols), aspect_ratios(max_tiles).index((rows, cols)) + 1)
