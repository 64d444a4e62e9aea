"""The reference's video path: which frames to sample, 2x2 pooling and temporal pruning, in torch.

Written apart from the runtime (llama3v/runtime/video.py and video_budget.py, whose docstrings state
the rules) so tests can hold the two against each other: the sampling indices use exact fractions,
pooling is torch's avg_pool2d, and pruning carries a canvas of what the model last saw of each cell
instead of memoised frame pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6  # frames; the runtime's tolerance for timestamps computed in float
MAX_CHANGE = {"pixels": 0.1, "embeddings": 0.02}
TOLERANCE = 1e-6


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _uniform(first: int, m: int, n: int) -> list[int]:
    """n of the m frames from `first`, evenly, both ends included (one: the middle)."""
    n = min(n, m)
    if n == 1:
        return [first + (m - 1) // 2]
    return [first + _round_half_up(Fraction(k * (m - 1), n - 1)) for k in range(n)]


def sample_indices(frame_count: int, fps: float, frames: int, target_fps: float | None = None, start: float = 0.0,
                   end: float | None = None) -> list[int]:
    """Frame indices of a uniform (`frames`) or target-fps (`target_fps`, at most `frames`) sampling of [start, end)."""
    index = torch.arange(frame_count, dtype=torch.float64)
    inside = index >= start * fps - EPS
    if end is not None:
        inside &= index < end * fps - EPS
    window = torch.nonzero(inside).flatten()
    if len(window) == 0:
        raise ValueError(f"no frame in [{start}, {end}) s")
    first, m = int(window[0]), len(window)
    if target_fps is not None:
        step = max(fps / target_fps, 1.0)
        k = torch.arange(m, dtype=torch.float64)
        k = k[k <= (m - 1) / step + EPS]
        if len(k) <= frames:
            return (first + torch.floor(k * step + EPS).long()).tolist()
    return _uniform(first, m, frames)


def pool2x2(rows: np.ndarray, grid: int) -> np.ndarray:
    """[grid^2, D] rows -> [ceil(grid/2)^2, D]: avg_pool2d with ceil_mode (edge windows average what they hold)."""
    fmap = torch.from_numpy(np.asarray(rows, np.float64)).T.reshape(1, -1, grid, grid)
    pooled = F.avg_pool2d(fmap, 2, 2, ceil_mode=True)
    return pooled.flatten(2)[0].T.numpy().astype(np.float32)


def spread(n: int, k: int) -> list[int]:
    """k of n frames, evenly, the first (and for k > 1 the last) included: the budget's last resort."""
    return [0] if k == 1 else _uniform(0, n, k)


class Pruner:
    """Counts and picks the pooled cells each frame keeps at a threshold, tracking per cell what the model last saw."""

    def __init__(self, embeddings: Sequence[np.ndarray], pixels: Sequence[np.ndarray] | None, grid: int,
                 measure: str):
        self.pooled = [torch.from_numpy(pool2x2(e, grid)).double() for e in embeddings]
        self.measure = measure
        side = math.ceil(grid / 2)
        self.cells = side * side
        if measure == "pixels":
            self.pixels = [torch.from_numpy(np.array(p)).long() for p in pixels]  # copies: inputs may be read-only
            h, w = self.pixels[0].shape[:2]
            patch_rows = torch.div(torch.arange(grid + 1) * h, grid, rounding_mode="floor")
            patch_cols = torch.div(torch.arange(grid + 1) * w, grid, rounding_mode="floor")
            ends = torch.clamp(torch.arange(0, 2 * side + 1, 2), max=grid)
            self.row_edges, self.col_edges = patch_rows[ends], patch_cols[ends]
            self.row_sizes, self.col_sizes = self.row_edges.diff(), self.col_edges.diff()
            self.area = torch.outer(self.row_sizes, self.col_sizes).flatten().double() * 3 * 255

    def _cell_sums(self, image: torch.Tensor) -> torch.Tensor:
        """Sum of an [H, W] image over each cell, from an integral image."""
        integral = F.pad(image.cumsum(0).cumsum(1), (1, 0, 1, 0))
        r, c = self.row_edges, self.col_edges
        return (integral[r[1:]][:, c[1:]] - integral[r[:-1]][:, c[1:]] - integral[r[1:]][:, c[:-1]]
                + integral[r[:-1]][:, c[:-1]]).flatten()

    def keep(self, frames: list[int], threshold: float) -> dict[int, torch.Tensor]:
        """Boolean keep masks per frame: all cells of the first, then cells changed by >= threshold."""
        masks = {frames[0]: torch.ones(self.cells, dtype=torch.bool)}
        if self.measure == "pixels":
            canvas = self.pixels[frames[0]].clone()
        else:
            canvas = self.pooled[frames[0]].clone()
        for f in frames[1:]:
            if self.measure == "pixels":
                change = self._cell_sums((self.pixels[f] - canvas).abs().sum(2)).double() / self.area
            else:
                a = self.pooled[f]
                norms = torch.linalg.norm(a, dim=1) * torch.linalg.norm(canvas, dim=1)
                dots = (a * canvas).sum(1)
                change = torch.where(norms > 0, 1 - dots / torch.where(norms > 0, norms, 1), torch.zeros_like(dots))
            keep = change >= threshold
            if self.measure == "pixels":
                side = int(math.isqrt(self.cells))
                pix = keep.view(side, side).repeat_interleave(self.row_sizes, 0).repeat_interleave(self.col_sizes, 1)
                canvas = torch.where(pix[..., None], self.pixels[f], canvas)
            else:
                canvas = torch.where(keep[:, None], self.pooled[f], canvas)
            masks[f] = keep
        return masks

    def count(self, frames: list[int], threshold: float) -> int:
        """Cells kept in total."""
        return int(sum(int(m.sum()) for m in self.keep(frames, threshold).values()))


def fit_budget(embeddings: Sequence[np.ndarray], pixels: Sequence[np.ndarray] | None, grid: int, max_tokens: int,
               measure: str = "pixels") -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Per frame: kept raster positions and their rows, and the pruning threshold; the runtime's rules."""
    n = len(embeddings)
    if n * grid * grid <= max_tokens:
        return ([np.arange(grid * grid) for _ in range(n)], [np.asarray(e, np.float32) for e in embeddings], 0.0)
    pooled_np = [pool2x2(e, grid) for e in embeddings]
    cells = pooled_np[0].shape[0]
    if max_tokens < cells:
        raise ValueError(f"budget {max_tokens} is below one pooled frame ({cells})")
    if n * cells <= max_tokens:
        return [np.arange(cells) for _ in range(n)], pooled_np, 0.0
    pruner = Pruner(embeddings, pixels, grid, measure)
    cap = MAX_CHANGE[measure]
    k = n
    while pruner.count(spread(n, k), cap) > max_tokens:
        k -= 1
    frames = spread(n, k)
    threshold = 0.0
    if len(frames) * cells > max_tokens:
        lo, hi = 0.0, cap
        while hi - lo > cap * TOLERANCE:
            mid = (lo + hi) / 2
            if pruner.count(frames, mid) <= max_tokens:
                hi = mid
            else:
                lo = mid
        threshold = hi
    masks = pruner.keep(frames, threshold)
    positions = [torch.nonzero(masks[f]).flatten().numpy() if f in masks else np.zeros(0, np.int64)
                 for f in range(n)]
    return positions, [pooled_np[f][p] for f, p in enumerate(positions)], threshold
