"""The tiny model's whole recipe in one command: stage 1, stage 2, the shipped files.

    nice -n 19 python -m llama3v.training.recipe WORKDIR [--install]

Runs `llama3v.training.train` in WORKDIR/vision (tower + projector) and `llama3v.training.train_lm` in
WORKDIR/lm (the LM's adapter, on the rows of the tower just trained), with the settings below, then
copies vision.safetensors, lora.safetensors and both training logs to WORKDIR/shipped (with --install: also into the
package, where `llama3v demo` and the tests take them). Each stage resumes from its saved state, so
an interrupted run goes on where it stopped. `.venv/bin/python bench/tiny_accuracy.py --weights
WORKDIR/shipped` measures the result before it is installed. Cost and accuracy: docs/tiny-model.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from llama3v.training import train, train_lm
from llama3v.training.tiny_llava import SHIPPED

STAGE1 = ["--steps", "5500", "--lr", "2e-3", "--train-scenes", "30000", "--eval-scenes", "300", "--eval-every", "250"]
STAGE2 = ["--steps", "700", "--batch", "8", "--rank", "16", "--layers", "16", "--clips", "3", "--eval-every", "100"]


def main(argv: list[str] | None = None) -> int:
    """Train both stages (or resume them) and collect the shipped files."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--install", action="store_true", help=f"also copy the files into {SHIPPED}")
    args = ap.parse_args(argv)
    vision = args.workdir / "vision" / "export" / "vision.safetensors"
    train.main([str(args.workdir / "vision"), *STAGE1])
    train_lm.main([str(args.workdir / "lm"), *STAGE2, "--vision", str(vision)])
    shipped = args.workdir / "shipped"
    shipped.mkdir(parents=True, exist_ok=True)
    lm = args.workdir / "lm" / "export"
    files = {vision: "vision.safetensors", vision.with_name("training.json"): "vision_training.json",
             lm / "lora.safetensors": "lora.safetensors", lm / "lm_training.json": "lm_training.json"}
    for src, name in files.items():
        shutil.copyfile(src, shipped / name)
        if args.install:
            shutil.copyfile(src, SHIPPED / name)
    print(f"[recipe] done: {shipped}" + (f", installed in {SHIPPED}" if args.install else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
