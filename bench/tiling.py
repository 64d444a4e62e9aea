"""Token counts and encode times per image mode on a CLIP ViT-L/14-336-shaped random tower.

Usage: .venv/bin/python bench/tiling.py [--image PATH] [--threads N] [--outtype f16]
Builds (once, cached under the llama3v cache) a random-weight LLaVA-NeXT checkpoint with a ViT-L/14-336
tower and a 4096-wide projector, then encodes the image as a single tile, LLaVA-NeXT anyres (HF and
llama.cpp layouts) and slices (--max-tiles 4 and 6), printing a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llama3v.converters.convert import convert
from llama3v.evaluation.scenes import scene
from llama3v.paths import cache_dir
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.media import EncodeCache, Rows, image_parts
from llama3v.testing.factory import TinySpec, make_checkpoint

VIT_L_336 = dict(vision_hidden=1024, vision_heads=16, vision_layers=24, vision_ff=4096, image_size=336,
                 patch_size=14, text_hidden=4096, text_heads=32, text_kv_heads=8, text_layers=1, text_ff=256)
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def build(outtype: str) -> tuple[Path, Path]:
    """The LLaVA-NeXT mmproj and a LLaVA-1.5-style mmproj (no pinpoints) of the same tower."""
    out = []
    for name, extra in (("vitl336-next", {"grid_pinpoints": PINPOINTS}), ("vitl336", {})):
        root = cache_dir() / "bench" / name
        mmproj = root / "gguf" / f"mmproj-{outtype}.gguf"
        if not mmproj.exists():
            make_checkpoint(root / "ckpt", TinySpec(**VIT_L_336, **extra), "hf-5")
            convert(root / "ckpt", root / "gguf", "f16", outtype, force=True)
        out.append(mmproj)
    return out[0], out[1]


def main() -> None:
    """Print a table: mode, tiles, rows, separator texts, encode ms per tile and in total."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--outtype", default="f16")
    args = ap.parse_args()
    image = args.image or scene(0, 1280, 960)
    next_mmproj, plain_mmproj = build(args.outtype)
    print(f"image {args.image or 'drawn scene 1280x960'}, mmproj {args.outtype}, threads {args.threads or 'all'}\n")
    print("| mode | tiles | grid | image rows | text separators | encode ms per tile (median) | encode ms total |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    runs = [("single tile (LLaVA-1.5)", plain_mmproj, {}),
            ("anyres, HF layout", next_mmproj, {"layout_style": "hf"}),
            ("anyres, llama.cpp layout", next_mmproj, {"layout_style": "llama.cpp"}),
            ("slices, --max-tiles 4", plain_mmproj, {"max_tiles": 4}),
            ("slices, --max-tiles 6", plain_mmproj, {"max_tiles": 6})]
    encoders = {}
    for name, mmproj, opts in runs:
        if mmproj not in encoders:
            encoders[mmproj] = VisionEncoder(mmproj, n_threads=args.threads)
        encoder = encoders[mmproj]
        encoder.encode(encoder_warmup_tile(encoder))  # first encode allocates buffers
        t0 = time.perf_counter()
        parts = image_parts(image, 0, encoder, EncodeCache(), **opts)
        for p in parts:
            if isinstance(p, Rows):
                p.data()
        total = (time.perf_counter() - t0) * 1e3
        info = next(p for p in parts if isinstance(p, Rows)).info
        per_tile = sorted(info.tile_encode_ms)[len(info.tile_encode_ms) // 2]
        seps = [p for p in parts if isinstance(p, str)]
        print(f"| {name} | {info.n_tiles} | {info.grid[0]} x {info.grid[1]} | "
              f"{sum(p.n for p in parts if isinstance(p, Rows))} | {len(seps)} | {per_tile:.0f} | {total:.0f} |")


def encoder_warmup_tile(encoder: VisionEncoder):
    """A blank tile of the tower's size."""
    import numpy as np

    return np.zeros((encoder.spec.size, encoder.spec.size, 3), np.uint8)


if __name__ == "__main__":
    main()
