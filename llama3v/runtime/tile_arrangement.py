"""Arrange the embeddings of an image's tiles into the rows and text that enter the context.

Layouts (docs/high-resolution.md):
  single   one tile's rows
  anyres, style "hf" (HF-faithful, the default where the mmproj carries an image-newline vector):
           the base view's rows, then the grid of tile features unpadded to the image's aspect
           ratio with the newline vector after each row, as LLaVA-NeXT's pack_image_features does
  anyres, style "llama.cpp": the tiles row-major, then the base view, no newline (what libmtmd
           does when it tiles by itself)
  slices   the global view, "\\n", then the slices row by row, " " between slices of a row and
           "\\n" after each row, so the model can tell them apart
"""

from __future__ import annotations

import numpy as np

from llama3v.errors import Llama3vError
from llama3v.runtime.image_processing import TileLayout

STYLES = ("hf", "llama.cpp")
SLICE_SEP, ROW_SEP = " ", "\n"


def unpadded_grid(layout: TileLayout, g: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the grid's feature map that cover the image, as HF's unpad_image."""
    rows, cols = layout.grid
    height, width = rows * g, cols * g
    w, h = layout.image_size
    if w / h > width / height:
        new_h = int(round(h * (width / w), 7))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(round(w * (height / h), 7))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def n_rows(layout: TileLayout, g: int, style: str) -> int:
    """How many embedding rows an image contributes (separator text not counted)."""
    if layout.kind == "anyres" and style == "hf":
        if layout.grid == (0, 0):
            return g * g + 1
        top, bottom, left, right = unpadded_grid(layout, g)
        return g * g + (bottom - top) * (right - left + 1)
    return layout.n_tiles * g * g


def arrange_anyres(tiles: list[np.ndarray], layout: TileLayout, g: int, style: str,
                   newline: np.ndarray | None) -> np.ndarray:
    """The rows of an anyres image from its tiles' rows (tiles[0] the base view)."""
    if style not in STYLES:
        raise Llama3vError(f"unknown image layout {style!r}; choose one of {', '.join(STYLES)}")
    base, rest = tiles[0], tiles[1:]
    if style == "llama.cpp":
        return np.concatenate([*rest, base])
    if newline is None:
        raise Llama3vError("the HF layout needs the mmproj's image-newline vector (v.image_newline)")
    if layout.grid == (0, 0):
        return np.concatenate([base, newline[None]])
    rows, cols = layout.grid
    d = base.shape[1]
    grid = np.stack(rest).reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    top, bottom, left, right = unpadded_grid(layout, g)
    grid = grid[top:bottom, left:right]
    lines = np.concatenate([grid, np.broadcast_to(newline, (grid.shape[0], 1, d))], axis=1)
    return np.concatenate([base, lines.reshape(-1, d)])


def slice_separators(layout: TileLayout) -> list[str]:
    """The text after each tile of a sliced image (the global view first); '' after the last."""
    rows, cols = layout.grid
    seps = [ROW_SEP]
    for r in range(rows):
        for c in range(cols):
            last = r == rows - 1 and c == cols - 1
            seps.append("" if last else (ROW_SEP if c == cols - 1 else SLICE_SEP))
    return seps
