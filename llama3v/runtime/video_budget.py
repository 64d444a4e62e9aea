"""Fit a video's frame embeddings into a token budget, spending tokens where the video changes.

Each sampled frame is one tower tile whose encoder output is a g x g grid of rows (raster order).
`plan_budget` decides which rows each frame keeps, applying only as far as needed to meet `max_tokens`:
  1. nothing, when every frame's full grid fits;
  2. 2x2 average pooling of every frame's grid (as LLaVA-NeXT-Video pools video frames) to
     ceil(g/2) x ceil(g/2): an odd grid's last row and column are pooled in windows of 2 (or 1) cells,
     each averaged over the cells it holds, so no part of the frame is lost (floor, as
     avg_pool2d's default, would drop that edge: 1/27 of a SigLIP-384 frame per side);
  3. temporal pruning (VideoLLaMA 3's differential frame pruning): a cell of a later frame is
     dropped when its change since the last frame that kept that cell is below a threshold, raised
     by bisection to the smallest value that meets the budget, but never past MAX_CHANGE (beyond it
     the tokens carry real change). Cells that did not change at all (they repeat what the model
     already saw) go together at any threshold above 0, so the result may fall well below the
     budget. The first frame is always kept whole. Change is measured on
     `pixels` (mean absolute difference of the cell's tile pixels, 0..1; the default) or on
     `embeddings` (cosine distance of the pooled rows; zero rows count as unchanged);
  4. if pruning up to MAX_CHANGE is still over budget: fewer frames, spread uniformly over the
     sampled ones with the first and last kept (round(k * (n - 1) / (k_total - 1)), halves up),
     as many as fit with pruning at most MAX_CHANGE; then the smallest threshold for those.
A budget below one pooled frame is an error. Kept cells stay in raster order within a frame.
With `pixels` the plan needs no embeddings, so it is made before encoding: the prompt's length is
known up front and frames that keep nothing are never encoded. `BudgetPlan.take` then turns a frame's
encoder rows into the rows that enter the context.

In the prompt each frame that keeps tokens is preceded by its timestamp, TIMESTAMP_FORMAT, e.g.
`<t=12.5s>`; frames that keep none are left out, timestamp included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llama3v.errors import Llama3vError

TIMESTAMP_FORMAT = "<t={:.1f}s>"
MEASURES = ("pixels", "embeddings")
DEFAULT_MEASURE = "pixels"
# Largest change pruning may treat as "barely changed". Pixels: VideoLLaMA 3's default threshold. Embeddings: the
# cosine distance at the quantile of moving cells' changes where 0.1 sits for pixels, measured with a random-weight
# ViT-L/14-336 tower (no trained vision weights are reachable offline; recalibrate on a trained one).
MAX_CHANGE = {"pixels": 0.1, "embeddings": 0.02}
_TOLERANCE = 1e-6  # the bisection stops when the threshold is known to this fraction of MAX_CHANGE


@dataclass
class BudgetPlan:
    """Which rows each frame keeps: raster positions on the (pooled) grid, and which tools were needed."""

    grid: int  # the encoder's grid side
    pooled: bool
    threshold: float  # pruning threshold applied; 0.0: nothing pruned
    frames_used: list[int]  # frames pruning considered: all, unless the budget dropped whole frames (step 4)
    positions: list[np.ndarray]  # per input frame, int64 ascending; empty: the frame is left out

    @property
    def side(self) -> int:
        """Side of the grid the positions refer to: the encoder's, or ceil(grid/2) when pooled."""
        return math.ceil(self.grid / 2) if self.pooled else self.grid

    @property
    def n_tokens(self) -> int:
        """Rows in total, the number that counts against the budget."""
        return sum(len(p) for p in self.positions)

    def take(self, frame: int, rows: np.ndarray) -> np.ndarray:
        """The rows `frame` keeps, float32 [len(positions), D], from its [grid^2, D] encoder rows."""
        rows = np.asarray(rows, np.float32)
        if rows.shape[0] != self.grid * self.grid:
            raise Llama3vError(f"frame {frame} has {rows.shape[0]} rows, expected {self.grid * self.grid}")
        return (pool2x2(rows, self.grid) if self.pooled else rows)[self.positions[frame]]


def timestamp_text(seconds: float) -> str:
    """The text that precedes a frame's rows in the prompt, e.g. `<t=12.5s>`."""
    return TIMESTAMP_FORMAT.format(seconds)


def default_budget(n_ctx: int, prompt_tokens: int, answer_tokens: int, n_videos: int = 1) -> int:
    """Rows each video may use: the context left after the prompt's other positions and the answer, shared equally.

    `prompt_tokens` counts every position that is not a video row: template, text, image rows and the
    timestamps of every sampled frame (an upper bound: frames that keep nothing drop theirs).
    """
    room = (n_ctx - prompt_tokens - answer_tokens) // max(n_videos, 1)
    if room < 1:
        raise Llama3vError(f"no room for video: the context holds {n_ctx} positions, the prompt needs {prompt_tokens} "
                           f"and the answer {answer_tokens}; raise --n-ctx or lower -n")
    return room


def pool2x2(rows: np.ndarray, grid: int) -> np.ndarray:
    """Average a grid x grid raster of rows over 2x2 windows: [grid^2, D] -> [ceil(grid/2)^2, D] (see above)."""
    d = rows.shape[1]
    side = math.ceil(grid / 2)
    padded = np.zeros((2 * side, 2 * side, d), np.float64)
    padded[:grid, :grid] = rows.reshape(grid, grid, d)
    counts = np.zeros((2 * side, 2 * side), np.float64)
    counts[:grid, :grid] = 1
    sums = padded.reshape(side, 2, side, 2, d).sum(axis=(1, 3))
    n = counts.reshape(side, 2, side, 2).sum(axis=(1, 3))
    return (sums / n[..., None]).reshape(side * side, d).astype(np.float32)


def plan_budget(n_frames: int, grid: int, max_tokens: int, pixels: Sequence[np.ndarray] | None = None,
                embeddings: Sequence[np.ndarray] | None = None, measure: str = DEFAULT_MEASURE) -> BudgetPlan:
    """Decide which rows of `n_frames` frames' grid x grid embeddings to keep within `max_tokens` (module docstring).

    `pixels` are the frames' tiles as the tower saw them (uint8 [S, S, 3], any S >= grid), needed to
    prune on pixels; `embeddings` the frames' [grid^2, D] encoder rows, needed to prune on embeddings.
    Neither is looked at unless pruning is needed.
    """
    if measure not in MEASURES:
        raise Llama3vError(f"unknown change measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if n_frames < 1:
        raise Llama3vError("a video needs at least one frame")
    every = list(range(n_frames))
    if n_frames * grid * grid <= max_tokens:
        return BudgetPlan(grid, False, 0.0, every, [np.arange(grid * grid)] * n_frames)
    side = math.ceil(grid / 2)
    cells = side * side
    if max_tokens < cells:
        raise Llama3vError(f"a video budget of {max_tokens} tokens is below one pooled frame ({cells} tokens)")
    if n_frames * cells <= max_tokens:
        return BudgetPlan(grid, True, 0.0, every, [np.arange(cells)] * n_frames)
    given = pixels if measure == "pixels" else embeddings
    if given is None or len(given) != n_frames:
        raise Llama3vError(f"pruning on {measure} needs the {measure} of each of the {n_frames} frames")
    change = _Change(pixels, embeddings, grid, measure)
    cap = MAX_CHANGE[measure]
    frames, k = every, n_frames
    while _count(change, frames, cap) > max_tokens:
        k -= 1
        frames = _spread(n_frames, k)
    threshold = 0.0
    if len(frames) * cells > max_tokens:
        lo, hi = 0.0, cap
        while hi - lo > cap * _TOLERANCE:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _count(change, frames, mid) <= max_tokens else (mid, hi)
        threshold = hi
    masks = _masks(change, frames, threshold)
    none = np.zeros(0, np.int64)
    return BudgetPlan(grid, True, threshold, frames, [np.flatnonzero(masks[f]) if f in masks else none for f in every])


class _Change:
    """Per-cell change between two frames on the pooled grid, computed only for the cells asked about and memoised:
    the bisection asks about the same frame pairs again and again."""

    def __init__(self, pixels: Sequence[np.ndarray] | None, embeddings: Sequence[np.ndarray] | None, grid: int,
                 measure: str):
        self.source = pixels if measure == "pixels" else embeddings
        self.grid, self.measure = grid, measure
        self.side = math.ceil(grid / 2)
        self.features: dict[int, np.ndarray] = {}  # per frame: its cells' pixels, or its pooled rows (float64)
        self.norms: dict[int, np.ndarray] = {}
        self.memo: dict[tuple[int, int], np.ndarray] = {}  # NaN: not computed yet
        if measure == "pixels":
            h, w = pixels[0].shape[:2]
            if any(p.shape != pixels[0].shape for p in pixels):
                raise Llama3vError("pruning on pixels needs every frame's tile at the same size")
            if h < grid or w < grid:
                raise Llama3vError(f"frame tiles of {w}x{h} are smaller than the {grid}x{grid} patch grid")
            # Cell k of the pooled grid covers patches 2k and 2k+1, patch i pixels [i*S//g, (i+1)*S//g). Each
            # cell's pixel indices, padded with an index of a zero appended to the tile, as one row per cell.
            rows_at = [min(2 * k, grid) * h // grid for k in range(self.side + 1)]
            cols_at = [min(2 * k, grid) * w // grid for k in range(self.side + 1)]
            flat = np.arange(h * w * 3).reshape(h, w, 3)
            cells = [flat[rows_at[i]:rows_at[i + 1], cols_at[j]:cols_at[j + 1]].ravel()
                     for i in range(self.side) for j in range(self.side)]
            self.gather = np.full((len(cells), max(map(len, cells))), h * w * 3)
            for i, c in enumerate(cells):
                self.gather[i, :len(c)] = c
            self.scale = np.array([len(c) for c in cells]) * 255.0

    def __call__(self, f: int, r: int, at: np.ndarray) -> np.ndarray:
        """The change of the cells in boolean mask `at` from frame r to frame f."""
        memo = self.memo.setdefault((f, r), np.full(self.side ** 2, np.nan))
        todo = np.flatnonzero(at & np.isnan(memo))
        if len(todo):
            a, b = self._features(f)[todo], self._features(r)[todo]
            if self.measure == "pixels":
                memo[todo] = (np.maximum(a, b) - np.minimum(a, b)).sum(axis=1, dtype=np.int64) / self.scale[todo]
            else:
                norms = self.norms[f][todo] * self.norms[r][todo]
                memo[todo] = 1.0 - np.divide((a * b).sum(axis=1), norms, out=np.ones(len(todo)), where=norms > 0)
        return memo[at]

    def _features(self, f: int) -> np.ndarray:
        if f not in self.features:
            if self.measure == "pixels":
                self.features[f] = np.append(np.asarray(self.source[f], np.uint8).ravel(), 0)[self.gather]
            else:
                rows = pool2x2(np.asarray(self.source[f], np.float32), self.grid).astype(np.float64)
                self.features[f], self.norms[f] = rows, np.linalg.norm(rows, axis=1)
        return self.features[f]


def _masks(change: _Change, frames: list[int], threshold: float) -> dict[int, np.ndarray]:
    """Which cells each frame keeps: all of the first; later ones where the cell changed by at least
    `threshold` since the last frame that kept it."""
    cells = change.side ** 2
    ref = np.full(cells, frames[0])  # per cell, the frame whose content the cell last showed the model
    masks = {frames[0]: np.ones(cells, bool)}
    for f in frames[1:]:
        d = np.empty(cells)
        for r in np.unique(ref):
            at = ref == r
            d[at] = change(f, int(r), at)
        keep = d >= threshold
        ref[keep] = f
        masks[f] = keep
    return masks


def _count(change: _Change, frames: list[int], threshold: float) -> int:
    return sum(int(m.sum()) for m in _masks(change, frames, threshold).values())


def _spread(n: int, k: int) -> list[int]:
    """k of n frames, uniformly, the first (and for k > 1 the last) included."""
    if k == 1:
        return [0]
    return [(2 * j * (n - 1) + k - 1) // (2 * (k - 1)) for j in range(k)]
