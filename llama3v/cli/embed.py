"""`llama3v embed`: the media rows that would enter the LLM's context, without an LLM.

For an mllama mmproj, whose images never enter the context as rows, the projected vision states that
its model's cross-attention layers read instead."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from llama3v.atomic import atomic_output
from llama3v.errors import Llama3vError
from llama3v.progress import Progress
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.gguf_check import is_mllama, read_gguf
from llama3v.runtime.media import (
    EncodeCache,
    MediaInfo,
    Part,
    Rows,
    describe,
    image_parts,
    sample_video,
    video_parts,
)
from llama3v.runtime.mllama import MllamaEncoder
from llama3v.runtime.video import Sampling


def media_parts(encoder: VisionEncoder, media: list[tuple[str, object]], cache: EncodeCache,
                max_tiles: int | None = None, image_layout: str | None = None, sampling: Sampling | None = None,
                max_video_tokens: int | None = None, progress: Progress | None = None) -> list[list[Part]]:
    """Expand each (kind, source) into its prompt parts; videos use `max_video_tokens` each (None: all rows)."""
    out = []
    for i, (kind, source) in enumerate(media):
        if kind == "image":
            out.append(image_parts(source, i, encoder, cache, max_tiles, image_layout, progress))
        else:
            video = sample_video(source, i, encoder, sampling or Sampling(), progress)
            out.append(video_parts(video, encoder, cache, max_video_tokens, progress=progress))
    return out


def stack_parts(parts: list[list[Part]]) -> tuple[np.ndarray, list[dict]]:
    """Stack all rows in prompt order and describe each block of rows and each text in between."""
    blocks, entries, first = [], [], 0
    for item in parts:
        for part in item:
            if isinstance(part, Rows):
                rows = part.data()
                blocks.append(rows)
                entries.append({"type": "rows", **part.to_json(), "first_row": first, "n_rows": len(rows)})
                first += len(rows)
            else:
                entries.append({"type": "text", "text": part})
    width = blocks[0].shape[1] if blocks else 0
    return (np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)), entries


def mllama_states(mmproj: Path, media: list[tuple[str, object]],
                  n_threads: int | None = None) -> tuple[np.ndarray, list[dict], list[MediaInfo]]:
    """An mllama mmproj's projected vision states (the cross-attention K/V's source) of each image's real tiles.

    They never enter the context as rows (docs/mllama.md); padding tile slots are left out."""
    if any(kind != "image" for kind, _ in media):
        raise Llama3vError("a Llama-3.2-Vision (mllama) mmproj takes images, not videos")
    encoder = MllamaEncoder(mmproj, n_threads=n_threads)
    blocks, entries, infos, first = [], [], [], 0
    try:
        for i, (_, source) in enumerate(media):
            tiles = encoder.tiles(source)
            t0 = time.perf_counter()
            states = encoder.encode(tiles)[:tiles.n_tiles * encoder.rows_per_tile]
            info = MediaInfo(i, "image", [(time.perf_counter() - t0) * 1e3], layout="mllama",
                             grid=list(tiles.grid), n_tiles=tiles.n_tiles)
            blocks.append(states)
            entries.append({"type": "rows", "index": i, "kind": "image", "first_row": first, "n_rows": len(states),
                            "rows_per_tile": encoder.rows_per_tile, "aspect_ratio_id": tiles.aspect_ratio_id})
            infos.append(info)
            first += len(states)
    finally:
        encoder.close()
    return np.concatenate(blocks), entries, infos


def embed_to_files(mmproj: Path, media: list[tuple[str, object]], output: Path, n_threads: int | None = None,
                   progress: Progress | None = None, **options: object) -> None:
    """Encode `media` and write OUTPUT (.npy, float32 [n_rows, n_embd]) and OUTPUT.json atomically.

    Options as media_parts takes them: max_tiles, image_layout, sampling, max_video_tokens."""
    if not media:
        raise Llama3vError("give at least one --image or --video")
    output = Path(output)
    if output.suffix != ".npy":
        raise Llama3vError(f"{output}: the output must be a .npy file")
    if is_mllama(read_gguf(mmproj)):
        rows, entries, infos = mllama_states(mmproj, media, n_threads)
    else:
        encoder = VisionEncoder(mmproj, n_threads=n_threads)
        try:
            parts = media_parts(encoder, media, EncodeCache(), progress=progress, **options)
            rows, entries = stack_parts(parts)
        finally:
            encoder.close()
        infos = [describe(p) for p in parts]
    doc = {"n_rows": int(rows.shape[0]), "n_embd": int(rows.shape[1]), "parts": entries,
           "media": [{"index": i, "kind": k, "source": str(s), **info.to_json()}
                     for i, ((k, s), info) in enumerate(zip(media, infos, strict=True))]}
    with atomic_output(output) as tmp, open(tmp, "wb") as f:
        np.save(f, rows)
    with atomic_output(output.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))
