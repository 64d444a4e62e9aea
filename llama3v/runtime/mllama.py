"""Llama-3.2-Vision (mllama) in llama3v's engine: the vision encoder and the images attached to a context.

The encoder is the ggml graph of patch 0006 (`llama_mllama_vision_*`): tiles in, the projected vision
states of every tile slot out (`tile_slots="all"`, transformers' arithmetic) or of the real tiles only
(`"real"`, a documented deviation that costs far less for images of few tiles). Those states never
enter the context as rows: `CrossImages` attaches them to the libllama context (patch 0005,
`llama_mllama_add_image`), which computes each image's cross-attention K/V once and keeps them for
every later batch. docs/mllama.md has the semantics.
"""

from __future__ import annotations

import ctypes
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.mllama_format import cross_attention_spans
from llama3v.runtime import engine
from llama3v.runtime.gguf_check import check_mmproj, read_gguf
from llama3v.runtime.image_processing import ImageInput, load_image
from llama3v.runtime.media import EncodeCache, MediaInfo
from llama3v.runtime.mllama_image import MllamaTiles, mllama_tiles
from llama3v.runtime.options import TILE_SLOTS

_F32P = ctypes.POINTER(ctypes.c_float)


class MllamaEncoder:
    """An mllama mmproj in llama3v's ggml encoder: an image in, its projected vision states out."""

    def __init__(self, mmproj_path: str | Path, n_threads: int | None = None):
        self.path = Path(mmproj_path)
        info = read_gguf(self.path, arrays=(S.IMAGE_MEAN, S.IMAGE_STD))
        self.n_embd = check_mmproj(info)
        self.tile = int(info.get(S.IMAGE_SIZE))
        self.max_tiles = int(info.get(S.MLLAMA_MAX_NUM_TILES))
        self.mean = np.asarray(info.get(S.IMAGE_MEAN), np.float32)
        self.std = np.asarray(info.get(S.IMAGE_STD), np.float32)
        self.n_threads = n_threads or engine.default_threads()
        self._lib = engine.mllama_lib()
        engine.take_log()
        self.ptr = self._lib.llama_mllama_vision_load(str(self.path).encode())
        if not self.ptr:
            raise engine.failure(f"{self.path}: llama3v's mllama encoder could not load this mmproj")
        self.n_rows = self._lib.llama_mllama_vision_n_rows(self.ptr)
        self.rows_per_tile = self.n_rows // self.max_tiles
        self.n_encodes = 0

    def tiles(self, source: ImageInput) -> MllamaTiles:
        """The image as MllamaImageProcessor tiles it for this encoder."""
        return mllama_tiles(load_image(source), self.tile, self.max_tiles)

    def encode(self, tiles: MllamaTiles, tile_slots: str = "all") -> np.ndarray:
        """Projected vision states [slots * positions per tile, n_embd]: every tile slot (padding tiles
        included) with `tile_slots="all"`, the real tiles only with `"real"`."""
        if tile_slots not in TILE_SLOTS:
            raise Llama3vError(f"tile slots must be one of {', '.join(TILE_SLOTS)}, not {tile_slots!r}")
        pixels = ((tiles.tiles.astype(np.float32) / 255 - self.mean) / self.std).transpose(0, 3, 1, 2)
        pixels = np.ascontiguousarray(pixels)
        n_rows = self.n_rows if tile_slots == "all" else tiles.n_tiles * self.rows_per_tile
        out = np.empty((n_rows, self.n_embd), np.float32)
        engine.take_log()
        rc = self._lib.llama_mllama_vision_encode(self.ptr, pixels.ctypes.data_as(_F32P), tiles.n_tiles,
                                                  tiles.aspect_ratio_id, tile_slots == "all",
                                                  out.ctypes.data_as(_F32P), self.n_threads)
        if rc != 0:
            raise engine.failure(f"mllama image encoding failed (code {rc})")
        self.n_encodes += 1
        return out

    def key(self, tiles: MllamaTiles, tile_slots: str = "all") -> str:
        """Identity of an image's states: this encoder's file, the tile slots computed and the exact tiles."""
        h = hashlib.sha256(str(self.path.resolve()).encode())
        h.update(repr((tiles.grid, tiles.aspect_ratio_id, tiles.tiles.shape, tile_slots)).encode())
        h.update(tiles.tiles.tobytes())
        return h.hexdigest()[:32]

    def close(self) -> None:
        """Free the encoder."""
        if getattr(self, "ptr", None):
            self._lib.llama_mllama_vision_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class MllamaImage:
    """One image of a prompt: its states' key and its tiles (encoded only when it must be attached)."""

    key: str
    tiles: MllamaTiles
    info: MediaInfo
    tile_slots: str = "all"


class CrossImages:
    """The images attached to a libllama context, with the spans of positions that see each of them.

    They are attached again only when the prompt's images or their places change; a follow-up turn about
    the same images keeps them (no cross K/V recomputed), which also keeps the KV prefix valid: text before
    the first image depends on every image (docs/mllama.md, rule 2), so any change drops the whole prefix.
    """

    def __init__(self, ctx_ptr: object):
        self._lib = engine.mllama_lib()
        self._ctx = ctx_ptr
        self.attached: list[tuple[str, int, int]] = []  # (key, first position, end or -1)

    def plan(self, ids: list[int], image_token_id: int, images: list[MllamaImage]) -> list[tuple[str, int, int]]:
        """(key, first position, end position or -1 for no end) of each image in prompt `ids`."""
        spans = cross_attention_spans(ids, image_token_id)
        if len(spans) != len(images):
            raise Llama3vError(f"the prompt has {len(spans)} <|image|> tokens for {len(images)} images")
        return [(img.key, a, -1 if e == len(ids) else e) for img, (a, e) in zip(images, spans, strict=True)]

    def sync(self, plan: list[tuple[str, int, int]], images: list[MllamaImage], encoder: MllamaEncoder,
             cache: EncodeCache) -> float:
        """Attach `images` as `plan` places them unless already attached so, encoding those not in `cache`.

        Returns the milliseconds spent computing cross-attention K/V (encode times go to each image's info)."""
        if plan == self.attached:
            return 0.0
        self.clear()
        cross_ms = 0.0
        for (_, a, e), img in zip(plan, images, strict=True):
            t0 = time.perf_counter()
            states = cache.get(img.key, lambda img=img: encoder.encode(img.tiles, img.tile_slots))
            t1 = time.perf_counter()
            img.info.tile_encode_ms[:] = [(t1 - t0) * 1e3]
            engine.take_log()
            rc = self._lib.llama_mllama_add_image(self._ctx, states.ctypes.data_as(_F32P), len(states),
                                                  img.tiles.n_tiles * encoder.rows_per_tile, a, e)
            if rc != 0:
                raise engine.failure(f"attaching an image's cross-attention states failed (code {rc})")
            cross_ms += (time.perf_counter() - t1) * 1e3
        self.attached = list(plan)
        return cross_ms

    def clear(self) -> None:
        """Detach every image."""
        self._lib.llama_mllama_clear_images(self._ctx)
        self.attached = []
