"""Media as prompt parts: embedding rows (computed lazily, cached) and the text that goes between them.

A media item expands into a list of parts, each either a string (tokenized by the LLM, e.g. a
separator) or `Rows`: a block of embedding rows with a key that identifies its content. Keys let
a session reuse the KV cache and the encode cache without encoding anything again.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageInput, load_image, prepare_tile, process_image
from llama3v.runtime.layout import arrange_anyres, n_rows, slice_separators
from llama3v.runtime.video import Sampling, VideoReader
from llama3v.runtime.video_budget import DEFAULT_MEASURE, plan_budget, timestamp_text

Progress = Callable[[str, int, int], None]  # (what, done, total)


class EncodeCache:
    """Embeddings by content key, least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached rows for `key`, computing and storing them on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        rows = compute()
        if rows.nbytes <= self.max_bytes:
            self._items[key] = rows
            self._bytes += rows.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return rows

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Rows:
    """A block of embedding rows: identity key, row count, description, and how to compute them."""

    key: str
    n: int
    meta: dict
    compute: Callable[[], np.ndarray] = field(repr=False)

    def data(self) -> np.ndarray:
        """The rows [n, n_embd], computed on first use."""
        if not hasattr(self, "_data"):
            self._data = self.compute()
        return self._data


Part = str | Rows


def describe(parts: list[Part]) -> dict:
    """A media item's summary for results and --json: kind, layout, tiles, rows, encode times (ms)."""
    blocks = [p for p in parts if isinstance(p, Rows)]
    meta = blocks[0].meta
    info = {k: v for k, v in meta.items() if k not in ("tile", "frame", "timestamp", "style")}
    info["rows"] = sum(b.n for b in blocks)
    info["encode_ms"] = sum(meta.get("tile_encode_ms", []))
    return info


@dataclass
class SampledVideo:
    """A video's sampled frames as tower-size tiles, before the token budget decides what they keep."""

    index: int
    source: str
    tiles: list[np.ndarray]
    keys: list[str]
    frames: list[int]
    timestamps: list[float]
    duration: float

    @property
    def timestamp_texts(self) -> list[str]:
        """The text before each frame's rows."""
        return [timestamp_text(t) for t in self.timestamps]


def sample_video(source: str | Path, index: int, encoder: VisionEncoder, sampling: Sampling,
                 progress: Progress | None = None) -> SampledVideo:
    """Decode the sampled frames of a video and prepare each as one tile in the model's own mode."""
    tiles, frames, stamps = [], [], []
    with VideoReader(source) as reader:
        indices = reader.indices(sampling)
        for frame in reader.frames(indices):
            tiles.append(prepare_tile(Image.fromarray(frame.rgb), encoder.spec))
            frames.append(frame.index)
            stamps.append(frame.timestamp)
            if progress:
                progress(f"decoding {Path(source).name}", len(tiles), len(indices))
        duration = reader.info.duration
    return SampledVideo(index, str(source), tiles, [_key(encoder, t) for t in tiles], frames, stamps, duration)


def video_parts(video: SampledVideo, encoder: VisionEncoder, cache: EncodeCache, budget: int | None,
                measure: str = DEFAULT_MEASURE, progress: Progress | None = None) -> list[Part]:
    """A video's prompt parts within `budget` rows (None: no limit): for each frame that keeps rows, its
    timestamp text, then those rows (runtime/video_budget.py decides which)."""
    g, n = encoder.grid, len(video.tiles)
    frame_ms = [0.0] * n
    done = [0]

    def frame_rows(f: int) -> np.ndarray:
        def encode() -> np.ndarray:
            t0 = time.perf_counter()
            rows = encoder.encode(video.tiles[f])
            frame_ms[f] = (time.perf_counter() - t0) * 1e3
            done[0] += 1
            if progress:
                progress(f"encoding {Path(video.source).name}", done[0], n)
            return rows
        return cache.get(video.keys[f], encode)

    embeddings = [frame_rows(f) for f in range(n)] if measure == "embeddings" else None
    plan = plan_budget(n, g, budget if budget is not None else n * g * g, pixels=video.tiles,
                       embeddings=embeddings, measure=measure)
    meta = {"media": video.index, "kind": "video", "n_frames": n, "frames_kept": 0, "rows_before": n * g * g,
            "budget": budget,
            "pooled": plan.pooled, "threshold": plan.threshold, "tile_encode_ms": frame_ms}
    parts: list[Part] = []
    for f in range(n):
        positions = plan.positions[f]
        if len(positions) == 0:
            continue
        meta["frames_kept"] += 1
        key = hashlib.sha256((video.keys[f] + str(plan.pooled)).encode() + positions.tobytes()).hexdigest()[:32]
        parts.append(video.timestamp_texts[f])
        parts.append(Rows(key, len(positions), {**meta, "frame": video.frames[f], "timestamp": video.timestamps[f]},
                          lambda f=f: plan.take(f, frame_rows(f))))
    for part in parts:  # every block shares the summary counters
        if isinstance(part, Rows):
            part.meta.update(frames_kept=meta["frames_kept"])
    return parts


def image_parts(source: ImageInput, index: int, encoder: VisionEncoder, cache: EncodeCache,
                max_tiles: int | None = None, layout_style: str | None = None,
                progress: Progress | None = None) -> list[Part]:
    """The prompt parts of one image: its tiles' rows, arranged as its layout says (runtime/layout.py)."""
    spec = replace(encoder.spec, max_tiles=max_tiles) if max_tiles is not None else encoder.spec
    processed = process_image(load_image(source, spec=spec), spec)
    layout, g = processed.layout, encoder.grid
    keys = [_key(encoder, tile) for tile in processed.tiles]
    tile_ms = [0.0] * len(keys)  # encode time per tile; stays 0 for tiles found in the cache
    meta = {"media": index, "kind": "image", "layout": layout.kind, "grid": list(layout.grid),
            "n_tiles": len(keys), "tile_encode_ms": tile_ms}

    progress_tiles = len(keys) > 1 and progress

    def tile_rows(i: int) -> np.ndarray:
        def encode() -> np.ndarray:
            t0 = time.perf_counter()
            rows = encoder.encode(processed.tiles[i])
            tile_ms[i] = (time.perf_counter() - t0) * 1e3
            if progress_tiles:
                progress_tiles("encoding tiles", sum(1 for ms in tile_ms if ms), len(keys))
            return rows
        return cache.get(keys[i], encode)

    if layout.kind == "anyres":
        style = layout_style or encoder.default_layout
        key = hashlib.sha256(("".join(keys) + style).encode()).hexdigest()[:32]
        return [Rows(key, n_rows(layout, g, style), {**meta, "tile": None, "style": style},
                     lambda: arrange_anyres([tile_rows(i) for i in range(len(keys))], layout, g, style,
                                            encoder.newline))]
    parts: list[Part] = []
    separators = slice_separators(layout) if layout.kind == "slices" else [""]
    for i, sep in enumerate(separators):
        parts.append(Rows(keys[i], g * g, {**meta, "tile": i}, lambda i=i: tile_rows(i)))
        if sep:
            parts.append(sep)
    return parts


def _key(encoder: VisionEncoder, tile: np.ndarray) -> str:
    h = hashlib.sha256(str(encoder.path.resolve()).encode())
    h.update(tile.tobytes())
    return h.hexdigest()[:32]
