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
from dataclasses import dataclass, field

import numpy as np

from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageInput, load_image, prepare_tile


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
    encode_ms: float = 0.0

    def data(self) -> np.ndarray:
        """The rows [n, n_embd], computed on first use."""
        if not hasattr(self, "_data"):
            t0 = time.perf_counter()
            self._data = self.compute()
            self.encode_ms = (time.perf_counter() - t0) * 1e3
        return self._data


Part = str | Rows


def image_parts(source: ImageInput, index: int, encoder: VisionEncoder, cache: EncodeCache) -> list[Part]:
    """The prompt parts of one image: its tile's embedding rows."""
    tile = prepare_tile(load_image(source, encoder.spec.max_pixels), encoder.spec)
    key = _key(encoder, tile)
    meta = {"media": index, "kind": "image", "tile": 0}
    return [Rows(key, encoder.tokens_per_tile, meta, lambda: cache.get(key, lambda: encoder.encode(tile)))]


def _key(encoder: VisionEncoder, tile: np.ndarray) -> str:
    h = hashlib.sha256(str(encoder.path.resolve()).encode())
    h.update(tile.tobytes())
    return h.hexdigest()[:32]
