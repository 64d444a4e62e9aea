"""Video decode+sample throughput, peak memory, and tokens before and after the budget.

Usage: .venv/bin/python bench/video.py [--seconds 20] [--repeats 5]
Makes (once, cached under the llama3v cache) a 1080p and a 480p mp4v clip at 30 fps: a textured
still background, a moving disc and a frame counter; adds tests/data/clip.mp4 (real H.264
footage) where present. Prints Markdown tables:
  - throughput: clip seconds decoded and sampled per wall second (x real time) for each sampling
    and read mode, median of interleaved runs (mode A B C A B C ...) after a warm-up, with min and max;
  - seek cost: one seek (CAP_PROP_POS_FRAMES + read) in sequentially grabbed frames, which the
    auto mode weighs against the gap to the next frame;
  - peak memory of a fresh process that reads the frames, from after its imports (/proc/self/clear_refs
    resets the peak): RSS (resource.getrusage, FFmpeg's buffers included) and Python+numpy
    allocations (tracemalloc), beside a process that reads nothing;
  - tokens: a ViT-L/14-336 grid (24 x 24 = 576 rows a frame) with stand-in embeddings 64 wide (the
    real width, 4096, changes no count and no pixel-measured decision; it only costs memory), fitted
    to the default budget of a 4096 and an 8192 context (60 prompt tokens, 256 for the answer, an
    estimated 8 per timestamp) and to a tight one of 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from llama3v.paths import TEST_MEDIA, cache_dir
from llama3v.runtime.image_processing import ImageSpec, prepare_tile
from llama3v.runtime.video import Limits, Sampling, VideoReader, read_video
from llama3v.runtime.video_budget import default_budget, plan_budget

CLIPS = {"1080p": (1920, 1080), "480p": (854, 480)}
FPS = 30
SAMPLINGS = {"uniform 16": Sampling(16), "uniform 64": Sampling(64), "1 fps (<= 64)": Sampling(64, fps=1.0),
             "every frame": Sampling(100_000)}
UNLIMITED = Limits(max_sampled_frames=100_000)  # reading every frame streams them; nothing is kept
GRID, WIDTH, TILE = 24, 64, 336
TIMESTAMP_TOKENS = 8  # an estimate of `<t=12.5s>` in Llama-3 tokens, for the default budget


def make_clip(path: Path, size: tuple[int, int], seconds: int) -> Path:
    """A clip with a still textured background, a disc crossing it and the frame number."""
    if path.exists():
        return path
    w, h = size
    rng = np.random.default_rng(0)
    bg = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
    for i in range(seconds * FPS):
        f = bg.copy()
        cv2.circle(f, ((i * w // (4 * FPS)) % w, h // 2), h // 8, (0, 0, 255), -1)
        cv2.putText(f, str(i), (20, h // 10), cv2.FONT_HERSHEY_SIMPLEX, h / 500, (255, 255, 255), max(h // 300, 1))
        writer.write(f)
    writer.release()
    os.replace(tmp, path)
    return path


def throughput(path: Path, repeats: int) -> list[str]:
    """Table rows: x real time per sampling and mode, interleaved runs."""
    rows = []
    for name in ("uniform 16", "1 fps (<= 64)", "every frame"):
        sampling = SAMPLINGS[name]
        modes = ("auto", "grab", "seek") if name != "every frame" else ("grab",)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for rep in range(repeats + 1):
            for mode in modes:
                t0 = time.perf_counter()
                with VideoReader(path, UNLIMITED) as reader:
                    n = sum(1 for _ in reader.frames(reader.indices(sampling), mode))
                    duration = reader.info.duration
                if rep:  # the first round warms up
                    times[mode].append(duration / (time.perf_counter() - t0))
        for mode, xs in times.items():
            rows.append(f"| {path.stem} | {name} | {n} | {mode} | {statistics.median(xs):.1f} | {min(xs):.1f} | "
                        f"{max(xs):.1f} |")
    return rows


def seek_cost(path: Path) -> tuple[float, float, float]:
    """(ms per grabbed frame, ms per seek + read, seek in grabbed frames), measured with OpenCV directly."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    t0 = time.perf_counter()
    grabbed = sum(1 for _ in iter(cap.grab, False))
    grab_ms = (time.perf_counter() - t0) * 1e3 / grabbed
    seeks = []
    for i in np.random.default_rng(1).integers(FPS, n - 1, 12):
        t0 = time.perf_counter()
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        cap.read()
        seeks.append((time.perf_counter() - t0) * 1e3)
    cap.release()
    seek_ms = statistics.median(seeks)
    return grab_ms, seek_ms, seek_ms / grab_ms


def child_peak(path: Path | None, sampling: str, keep: bool) -> dict[str, float]:
    """Peaks in MB of a fresh process that reads `sampling` of `path` (None: reads nothing): RSS from getrusage,
    Python and numpy allocations from tracemalloc, and the pixels of the frames it keeps."""
    args = [sys.executable, __file__, "--child", str(path or ""), sampling, "keep" if keep else "stream"]
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def child(path: str, sampling: str, how: str) -> None:
    """The measured process: read and either keep every frame or drop each once seen."""
    with open("/proc/self/clear_refs", "w") as f:  # restart the peak here: the imports peak higher than they end
        f.write("5")
    tracemalloc.start()
    kept = 0
    if path:
        if how == "keep":
            kept = sum(f.rgb.nbytes for f in read_video(path, SAMPLINGS[sampling])[1])
        else:
            with VideoReader(path, UNLIMITED) as reader:
                for _ in reader.frames(reader.indices(SAMPLINGS[sampling])):
                    pass
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
                      "python_mb": tracemalloc.get_traced_memory()[1] / 2**20, "kept_mb": kept / 2**20}))


def tokens(path: Path) -> list[str]:
    """Table rows: rows before and after planning 16 and 64 sampled frames into budgets."""
    rows = []
    spec = ImageSpec(size=TILE, mode="resize")
    proj = np.random.default_rng(0).standard_normal((3 * 14 * 14, WIDTH)).astype(np.float32) / 24
    for name in ("uniform 16", "uniform 64"):
        _, frames = read_video(path, SAMPLINGS[name])
        tiles = [prepare_tile(Image.fromarray(f.rgb), spec) for f in frames]
        # stand-in embeddings: a fixed projection of each 14 px patch, so still patches give still rows
        emb = [np.tanh((t.reshape(GRID, 14, GRID, 14, 3).transpose(0, 2, 1, 3, 4).reshape(GRID * GRID, -1) / 255.0
                        - 0.5) @ proj) for t in tiles]
        prompt = 60 + TIMESTAMP_TOKENS * len(frames)
        budgets = {"n_ctx 8192": default_budget(8192, prompt, 256), "n_ctx 4096": default_budget(4096, prompt, 256),
                   "tight": 1024}
        for label, budget in budgets.items():
            for measure in ("pixels", "embeddings"):
                t0 = time.perf_counter()
                plan = plan_budget(len(frames), GRID, budget, pixels=tiles, embeddings=emb, measure=measure)
                ms = (time.perf_counter() - t0) * 1e3
                empty = sum(1 for p in plan.positions if len(p) == 0)
                rows.append(f"| {path.stem} | {name} | {len(frames) * GRID * GRID} | {label}: {budget} | {measure} | "
                            f"{plan.n_tokens} | {'yes' if plan.pooled else 'no'} | {plan.threshold:.2g} | "
                            f"{len(plan.frames_used)} | {empty} | {ms:.0f} |")
    return rows


def cpu() -> str:
    """CPU model and the SIMD flags that matter to decoding."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    simd = [x for x in ("sse4_2", "avx2", "fma", "avx512f", "avx512bw", "amx_tile") if x in flags]
    return f"{model}, {os.cpu_count()} CPUs, flags {' '.join(simd)}"


def main() -> None:
    """Print the tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    root = cache_dir() / "bench" / "video"
    root.mkdir(parents=True, exist_ok=True)
    clips = {k: make_clip(root / f"{k}-{args.seconds}s.mp4", size, args.seconds) for k, size in CLIPS.items()}
    real = TEST_MEDIA / "clip.mp4"
    if real.is_file():  # real footage (H.264, 720x358, 10 s): sensor noise, a long GOP
        clips["clip.mp4"] = real
    print(f"{cpu()}; OpenCV {cv2.__version__} (FFmpeg backend), {cv2.getNumThreads()} OpenCV threads; "
          f"clips mp4v {FPS} fps, {args.seconds} s\n")
    print("| clip | sampling | frames | mode | x real time (median) | min | max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in clips.values():
        print("\n".join(throughput(path, args.repeats)))
    print("\n| clip | ms per grabbed frame | ms per seek + read (median of 12) | seek in grabbed frames |")
    print("| --- | --- | --- | --- |")
    for path in clips.values():
        grab_ms, seek_ms, ratio = seek_cost(path)
        print(f"| {path.stem} | {grab_ms:.2f} | {seek_ms:.1f} | {ratio:.0f} |")
    base = child_peak(None, "", False)
    print(f"\n| clip | sampling | frames | kept frames' pixels (MB) | peak RSS (MB) | peak Python+numpy (MB) |\n"
          f"| --- | --- | --- | --- | --- | --- |\n| none | nothing read | 0 | 0 | {base['rss_mb']:.0f} | "
          f"{base['python_mb']:.1f} |")
    for path in clips.values():
        for name, keep in (("uniform 16", True), ("1 fps (<= 64)", True), ("every frame", False)):
            peak = child_peak(path, name, keep)
            kept = f"{peak['kept_mb']:.0f}" if keep else "0 (streamed)"
            with VideoReader(path, UNLIMITED) as reader:
                n = len(reader.indices(SAMPLINGS[name]))
            print(f"| {path.stem} | {name} | {n} | {kept} | {peak['rss_mb']:.0f} | {peak['python_mb']:.1f} |")
    print()
    print("| clip | sampling | rows before | budget | measure | rows after | pooled | threshold | frames used | "
          "frames left out | plan ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in clips.values():
        print("\n".join(tokens(path)))


if __name__ == "__main__":
    main()
