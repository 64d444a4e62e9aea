"""`llama3v embed`: the media rows that would enter the LLM's context, without an LLM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llama3v.errors import Llama3vError
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.media import EncodeCache, Part, Rows, image_parts


def media_parts(encoder: VisionEncoder, media: list[tuple[str, object]], cache: EncodeCache,
                max_tiles: int | None = None, image_layout: str | None = None) -> list[list[Part]]:
    """Expand each (kind, source) into its prompt parts."""
    out = []
    for i, (kind, source) in enumerate(media):
        if kind != "image":
            raise Llama3vError(f"{kind} input is not supported yet")
        out.append(image_parts(source, i, encoder, cache, max_tiles, image_layout))
    return out


def stack_parts(parts: list[list[Part]]) -> tuple[np.ndarray, list[dict]]:
    """Stack all rows in prompt order and describe each block of rows and each text in between."""
    blocks, entries, first = [], [], 0
    for item in parts:
        for part in item:
            if isinstance(part, Rows):
                rows = part.data()
                blocks.append(rows)
                entries.append({"type": "rows", **part.meta, "first_row": first, "n_rows": len(rows)})
                first += len(rows)
            else:
                entries.append({"type": "text", "text": part})
    width = blocks[0].shape[1] if blocks else 0
    return (np.concatenate(blocks) if blocks else np.zeros((0, width), np.float32)), entries


def embed_to_files(mmproj: Path, media: list[tuple[str, object]], output: Path, n_threads: int | None = None,
                   max_tiles: int | None = None, image_layout: str | None = None) -> None:
    """Encode `media` and write OUTPUT (.npy, float32 [n_rows, n_embd]) and OUTPUT.json atomically."""
    if not media:
        raise Llama3vError("give at least one --image or --video")
    output = Path(output)
    if output.suffix != ".npy":
        raise Llama3vError(f"{output}: the output must be a .npy file")
    encoder = VisionEncoder(mmproj, n_threads=n_threads)
    try:
        rows, entries = stack_parts(media_parts(encoder, media, EncodeCache(), max_tiles, image_layout))
    finally:
        encoder.close()
    doc = {"n_rows": int(rows.shape[0]), "n_embd": int(rows.shape[1]), "parts": entries,
           "media": [{"index": i, "kind": k, "source": str(s)} for i, (k, s) in enumerate(media)]}
    meta = output.with_suffix(".json")
    for path, write in ((output, lambda f: np.save(f, rows)),
                        (meta, lambda f: f.write(json.dumps(doc, indent=1).encode()))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
