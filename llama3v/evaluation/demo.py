"""`llama3v demo`: build a small random-weight LLaVA-Llama-3, convert it, run an image prompt through
llama.cpp and show how closely it follows the PyTorch reference."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from llama3v.converters.convert import convert
from llama3v.evaluation.scenes import scene
from llama3v.paths import TEST_MEDIA, cache_dir
from llama3v.progress import Progress, bars
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec, make_checkpoint

# Real architecture at small size: CLIP tower with class token (64 patches), mlp2x projector,
# GQA Llama-3 decoder with llama3 rope scaling, and the real 128k Llama-3 tokenizer.
DEMO_SPEC = TinySpec(vision_hidden=128, vision_heads=4, vision_layers=4, vision_ff=512, image_size=112,
                     text_hidden=192, text_heads=6, text_kv_heads=2, text_layers=4, text_ff=512,
                     rope_theta=500000.0, rope_scaling={"factor": 8.0, "original_max_position_embeddings": 8192},
                     vocab="llama3", seed=0)
QUESTION = "What is in this image?"
PHOTO = TEST_MEDIA / "photo.jpeg"  # a drawn scene stands in where the package runs without its checkout


def build_demo_model(workdir: Path, say: callable, progress: Progress | None = None) -> tuple[Path, Path, Path]:
    """Build (or reuse) the demo checkpoint and its f32 GGUFs; returns (checkpoint, model, mmproj)."""
    ckpt, out = workdir / "checkpoint", workdir / "gguf"
    spec_file = ckpt / "llama3v_spec.json"
    model, mmproj = out / "model-f32.gguf", out / "mmproj-f32.gguf"
    fresh = spec_file.is_file() and json.loads(spec_file.read_text()) == asdict(DEMO_SPEC)
    if not (fresh and model.is_file() and mmproj.is_file()):
        say(f"building the demo checkpoint in {ckpt} (random weights, real Llama-3 tokenizer)")
        t0 = time.perf_counter()
        make_checkpoint(ckpt, DEMO_SPEC, "hf-5", progress=progress)
        convert(ckpt, out, "f32", "f32", force=True, progress=progress)
        say(f"built and converted in {time.perf_counter() - t0:.1f} s")
    return ckpt, model, mmproj


def run_demo(workdir: Path | None = None, quiet: bool = False, parity: bool = False) -> int:
    """The embedded tiny model's demo when its weights are shipped, else (or with `parity`) the parity demo."""
    from llama3v.evaluation.tiny_demo import run_tiny_demo, shipped_weights_present

    if not parity and shipped_weights_present():
        return run_tiny_demo(Path(workdir or cache_dir() / "tiny-demo"), PHOTO, quiet)
    return run_parity_demo(workdir, quiet)


def run_parity_demo(workdir: Path | None = None, quiet: bool = False) -> int:
    """The random-weight demo: prints the answer, timings and agreement with the reference."""
    workdir = Path(workdir or cache_dir() / "demo")
    workdir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if not quiet:
            print(f"[demo] {msg}", file=sys.stderr)

    ckpt, model, mmproj = build_demo_model(workdir, say, bars(quiet))
    image = PHOTO if PHOTO.is_file() else workdir / "scene.png"
    if image != PHOTO:
        scene(0, 640, 480).save(image)
    print("llama3v demo: a small LLaVA-Llama-3 with RANDOM weights, run through llama.cpp.")
    print("The answer below is noise by design; what matters is that llama.cpp follows the PyTorch reference.\n")
    print(f"image:    {image}")
    print(f"question: {QUESTION}")
    print("answer:   ", end="", flush=True)
    with Session(model, mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as session:
        gen = session.generate(QUESTION, images=[image], temperature=0, max_tokens=24)
        for piece in gen:
            print(piece, end="", flush=True)
        result = gen.result
        t = result.timings
        print(f"\n\nprompt {result.n_prompt_tokens} positions ({result.media[0].rows} image rows); "
              f"encode {t['encode_ms']:.0f} ms, prompt {t['prompt_ms']:.0f} ms, "
              f"{len(result.tokens)} tokens at {t['decode_tokens_per_s']:.0f} tokens/s")
        _agreement(ckpt, session, image)
    print("\nTo run a real model, convert a LLaVA-Llama-3 checkpoint and ask it about your photo:")
    print("  llama3v convert path/to/llava-llama-3-8b -o models/ --outtype q8_0")
    print("  llama3v run --model models/model-q8_0.gguf --mmproj models/mmproj-q8_0.gguf --image photo.jpg "
          "-p 'What is in this image?'")
    return 0


def _agreement(ckpt: Path, session: Session, image: Path) -> None:
    try:
        from llama3v.evaluation.parity import embedding_parity, generation_parity
        from llama3v.models.llava import LlavaReference
    except ImportError:
        print("agreement with the PyTorch reference: skipped (needs torch: pip install 'llama3v[reference]')")
        return
    reference = LlavaReference.from_checkpoint(ckpt)
    emb = embedding_parity(reference, session.encoder, [image])
    session.reset()
    gen = generation_parity(reference, session, QUESTION, [image], n_steps=16)
    same = next((i for i, (a, b) in enumerate(zip(gen.tokens, gen.reference_tokens, strict=False)) if a != b),
                len(gen.tokens))
    print("agreement with the PyTorch reference (f32 files, f32 KV cache):")
    print(f"  image embeddings: NMSE {emb.nmse:.2e} (bound 1e-6), mean cosine {emb.cosine:.6f}, {emb.n_rows} rows")
    print(f"  prompt top-1 predictions: {gen.prompt_top1_agree}/{gen.n_prompt} positions agree "
          f"(max logit difference {gen.max_logit_diff:.2e})")
    print(f"  greedy tokens: {same}/{len(gen.tokens)} steps identical "
          f"(smallest reference top-1 margin {min(gen.margins):.3f})")
