"""Encode time per mmproj type, as docs/benchmarks.md measures: paired, interleaved rounds after a warm-up.

Usage: .venv/bin/python bench/quant_encode.py DIR [--types f32,f16,q8_0,...] [--rounds 5] [--threads N]
DIR holds mmproj-<type>.gguf files (e.g. a quant-report's OUTDIR/gguf). Each round encodes one drawn
scene with every type in turn (A B C ..., the order rotating each round); prints a Markdown table of
the median, min and max per type and its ratio to the first type's median, plus the CPU flags,
threads and the build the numbers come from. Flash attention off, as in the quant-report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from llama3v.evaluation.scenes import scene
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.engine import default_threads
from llama3v.runtime.image_processing import prepare_tile


def main() -> None:
    """Time every type's encode of the same tile and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q6_k,q5_k,q5_0,q4_k,q4_0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    types = args.types.split(",")
    encoders = {t: VisionEncoder(args.dir / f"mmproj-{t}.gguf", n_threads=args.threads, flash_attn=False)
                for t in types}
    tile = prepare_tile(scene(0), encoders[types[0]].spec)
    for enc in encoders.values():  # warm-up: graph allocation, page cache
        enc.encode(tile)
    times: dict[str, list[float]] = {t: [] for t in types}
    for r in range(args.rounds):
        order = types[r % len(types):] + types[:r % len(types)]
        for t in order:
            t0 = time.perf_counter()
            encoders[t].encode(tile)
            times[t].append(time.perf_counter() - t0)
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
    print(f"{platform.machine()}, {args.threads or default_threads()} threads, CPU flags: {' '.join(simd)}; "
          f"{args.rounds} interleaved rounds after a warm-up")
    print()
    print("| mmproj | median s | min s | max s | vs first |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = statistics.median(times[types[0]])
    for t in types:
        med = statistics.median(times[t])
        print(f"| {t} | {med:.2f} | {min(times[t]):.2f} | {max(times[t]):.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
