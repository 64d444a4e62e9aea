"""`make eval`: the embedded tiny model's held-out accuracy per question type, llama.cpp next to the reference.

    .venv/bin/python bench/tiny_accuracy.py [--scenes N] [--clips N] [--detail N] [--outtype f16]
                                            [--no-reference] [--workdir DIR] [--weights DIR]

Assembles and converts the tiny model (cached like the demo), then asks every question type each
held-out scene can answer, with the held-out phrasings (llama3v.training.questions), greedily through
llama.cpp and through the float32 PyTorch reference. Prints a Markdown table and the first failures;
then the video questions about held-out drawn clips (llama3v.training.clips) through llama.cpp, next
to their chance level; then the same image questions about scenes drawn 4 times smaller in a larger
canvas (a detail the 112-pixel base view cannot resolve), without and with --max-tiles 16 slices.
--weights evaluates other trained weights than the shipped ones (a recipe run's WORKDIR/shipped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama3v.converters.convert import convert  # noqa: E402
from llama3v.evaluation.tiny_accuracy import clip_accuracy, detail_accuracy, run  # noqa: E402
from llama3v.evaluation.tiny_demo import build_tiny_model  # noqa: E402
from llama3v.paths import cache_dir  # noqa: E402
from llama3v.runtime.session import Session  # noqa: E402
from llama3v.training.questions import TYPES  # noqa: E402
from llama3v.training.tiny_llava import SHIPPED  # noqa: E402


def main() -> int:
    """Evaluate and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=40, help="held-out scenes (seeds 0..N-1)")
    ap.add_argument("--outtype", default="f16", help="GGUF type of both files (the demo's files are f16)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--clips", type=int, default=20, help="held-out drawn clips (video questions; 0: none)")
    ap.add_argument("--detail", type=int, default=20, help="held-out scenes drawn 4x smaller in a larger canvas, "
                    "asked with the base view and with --max-tiles 16 slices (0: none)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--weights", type=Path, default=SHIPPED,
                    help="folder with vision.safetensors and lora.safetensors (default: the shipped ones)")
    args = ap.parse_args()
    work = args.workdir or cache_dir() / ("tiny-demo" if args.weights == SHIPPED else "tiny-eval")
    ckpt, model, mmproj = build_tiny_model(work, lambda m: print(f"[eval] {m}", file=sys.stderr), args.weights)
    if args.outtype != "f16":
        model, mmproj = convert(ckpt, work / "gguf", args.outtype, args.outtype, force=True)
    t0 = time.perf_counter()
    cpp, ref = run(model, mmproj, None if args.no_reference else ckpt, range(args.scenes))
    print(f"held-out scenes 0..{args.scenes - 1}, held-out phrasings, greedy; {time.perf_counter() - t0:.0f} s\n")
    rows = [("llama.cpp " + args.outtype, cpp)] + ([("PyTorch reference (f32)", ref)] if ref else [])
    types = [t for t in TYPES if cpp.total[t]]
    print("| path | " + " | ".join(types) + " | overall |")
    print("|---" * (len(types) + 2) + "|")
    for name, acc in rows:
        cells = [f"{100 * acc.right[t] / acc.total[t]:.0f}% ({acc.right[t]}/{acc.total[t]})" for t in types]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * acc.overall:.1f}% |")
    for name, acc in rows:
        print(f"\nfirst failures, {name}:")
        for f in acc.failures[:8]:
            print("  ", f)
    if args.clips:
        t0 = time.perf_counter()
        with Session(model, mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as session:
            clips, chance = clip_accuracy(session, range(args.clips), work)
        print(f"\nvideo: held-out clips 0..{args.clips - 1} (6 s, 1 fps mp4), held-out phrasings; "
              f"{time.perf_counter() - t0:.0f} s: {clips.table()}; chance (one of the shapes that appear "
              f"later, at random) {100 * chance:.1f}%")
        for f in clips.failures[:8]:
            print("  ", f)
    if args.detail:
        with Session(model, mmproj, n_ctx=2048, kv_type="f32", flash_attn=False) as session:
            for tiles in (None, 16):
                acc = detail_accuracy(session, range(args.detail), tiles)
                print(f"\nsmall detail (scene 4x smaller in a 4x4-cell canvas), held-out scenes 0..{args.detail - 1}, "
                      f"{'base view only' if tiles is None else f'--max-tiles {tiles}'}: {acc.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
