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

from llama3v.progress import Progress
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageInput, ImageSpec, load_image, prepare_tile, process_image
from llama3v.runtime.tile_arrangement import arrange_anyres, n_rows, slice_separators
from llama3v.runtime.video import Sampling, VideoReader
from llama3v.runtime.video_budget import DEFAULT_MEASURE, plan_budget, timestamp_text


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
class MediaInfo:
    """What one image or video became in the prompt: one record, shared by all its blocks of rows.

    The encode times fill in as tiles and frames are encoded (0 for those found in the cache), so
    `encode_ms` is their sum whenever it is read.
    """

    media: int  # position among the prompt's media
    kind: str  # "image" or "video"
    tile_encode_ms: list[float]  # per tile (image) or sampled frame (video)
    rows: int = 0  # rows it puts in the context, once its parts are made
    # Images (runtime/image_processing.py, runtime/tile_arrangement.py).
    layout: str | None = None  # "single", "anyres" or "slices"
    grid: list[int] | None = None  # tile rows and columns
    n_tiles: int | None = None
    image_size: list[int] | None = None  # width and height before tiling
    # Videos (runtime/video_budget.py).
    n_frames: int | None = None  # frames sampled
    frames_kept: int = 0  # frames that keep any rows within the budget
    rows_before: int | None = None  # rows of all sampled frames, unpooled
    budget: int | None = None  # None: no limit
    pooled: bool | None = None
    threshold: float | None = None  # pruning threshold, 0 when nothing was pruned

    @property
    def encode_ms(self) -> float:
        """Milliseconds spent encoding its tiles or frames."""
        return sum(self.tile_encode_ms)

    def to_json(self, encode_times: bool = True) -> dict:
        """The `--json` and `embed` form: an image's or a video's fields (with the encode times unless told)."""
        out: dict = {"media": self.media, "kind": self.kind}
        if self.kind == "image":
            out.update(layout=self.layout, grid=self.grid, n_tiles=self.n_tiles)
        else:
            out.update(n_frames=self.n_frames, frames_kept=self.frames_kept, rows_before=self.rows_before,
                       budget=self.budget, pooled=self.pooled, threshold=self.threshold)
        if encode_times:
            out.update(tile_encode_ms=self.tile_encode_ms, rows=self.rows, encode_ms=self.encode_ms)
        return out


@dataclass
class Rows:
    """A block of embedding rows: identity key, row count, the media item it belongs to and where in it, and how
    to compute them."""

    key: str
    n: int
    info: MediaInfo
    compute: Callable[[], np.ndarray] = field(repr=False)
    tile: int | None = None  # image: the tile (None for an anyres image, whose tiles are one block)
    style: str | None = None  # anyres: the arrangement, "hf" or "llama.cpp"
    frame: int | None = None  # video: the frame's index in the file
    timestamp: float | None = None  # video: its time in seconds

    def to_json(self) -> dict:
        """This block for `embed`'s OUT.json: its media item's fields, then where in it the block is."""
        out = self.info.to_json(encode_times=False)
        if self.info.kind == "image":
            out["tile"] = self.tile
            if self.style is not None:
                out["style"] = self.style
        else:
            out.update(frame=self.frame, timestamp=self.timestamp)
        return out

    def data(self) -> np.ndarray:
        """The rows [n, n_embd], computed on first use."""
        if not hasattr(self, "_data"):
            self._data = self.compute()
        return self._data


Part = str | Rows


def describe(parts: list[Part]) -> MediaInfo:
    """The record of the media item whose prompt parts these are, with its row count."""
    blocks = [p for p in parts if isinstance(p, Rows)]
    info = blocks[0].info
    info.rows = sum(b.n for b in blocks)
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
    info = MediaInfo(video.index, "video", frame_ms, n_frames=n, rows_before=n * g * g, budget=budget,
                     pooled=plan.pooled, threshold=plan.threshold)
    parts: list[Part] = []
    for f in range(n):
        positions = plan.positions[f]
        if len(positions) == 0:
            continue
        info.frames_kept += 1
        key = hashlib.sha256((video.keys[f] + str(plan.pooled)).encode() + positions.tobytes()).hexdigest()[:32]
        parts.append(video.timestamp_texts[f])
        parts.append(Rows(key, len(positions), info, lambda f=f: plan.take(f, frame_rows(f)),
                          frame=video.frames[f], timestamp=video.timestamps[f]))
    return parts


def image_spec(encoder: VisionEncoder, max_tiles: int | None = None) -> ImageSpec:
    """The encoder's image spec with a session's --max-tiles applied."""
    return replace(encoder.spec, max_tiles=max_tiles) if max_tiles is not None else encoder.spec


def image_parts(source: ImageInput, index: int, encoder: VisionEncoder, cache: EncodeCache,
                max_tiles: int | None = None, layout_style: str | None = None,
                progress: Progress | None = None) -> list[Part]:
    """The prompt parts of one image: its tiles' rows, arranged as its layout says (runtime/tile_arrangement.py)."""
    spec = image_spec(encoder, max_tiles)
    processed = process_image(load_image(source, spec=spec), spec)
    layout, g = processed.layout, encoder.grid
    keys = [_key(encoder, tile) for tile in processed.tiles]
    tile_ms = [0.0] * len(keys)  # encode time per tile; stays 0 for tiles found in the cache
    info = MediaInfo(index, "image", tile_ms, layout=layout.kind, grid=list(layout.grid), n_tiles=len(keys),
                     image_size=list(layout.image_size))

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
        return [Rows(key, n_rows(layout, g, style), info,
                     lambda: arrange_anyres([tile_rows(i) for i in range(len(keys))], layout, g, style,
                                            encoder.newline), style=style)]
    parts: list[Part] = []
    separators = slice_separators(layout) if layout.kind == "slices" else [""]
    for i, sep in enumerate(separators):
        parts.append(Rows(keys[i], g * g, info, lambda i=i: tile_rows(i), tile=i))
        if sep:
            parts.append(sep)
    return parts


def _key(encoder: VisionEncoder, tile: np.ndarray) -> str:
    h = hashlib.sha256(str(encoder.path.resolve()).encode())
    h.update(tile.tobytes())
    return h.hexdigest()[:32]
