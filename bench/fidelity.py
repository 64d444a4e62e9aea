"""Measure llama.cpp's fidelity to the PyTorch reference, under the parity settings and the defaults.

Usage: .venv/bin/python bench/fidelity.py [--image PATH]... > table.md
Parity settings: libmtmd flash attention off, F32 KV cache. Defaults: flash attention auto, F16 KV.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from llama3v.converters.convert import convert
from llama3v.evaluation.parity import embedding_parity, generation_parity
from llama3v.evaluation.scenes import scene
from llama3v.models.llava import LlavaReference
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec, make_checkpoint

TOWERS = {
    "CLIP quick_gelu, 3 blocks, layer -2": TinySpec(vision_hidden=64, vision_heads=4, vision_ff=160, text_hidden=96,
                                                    text_heads=6, text_ff=192, seed=2),
    "CLIP gelu, 1 block, layer -1": TinySpec(vision_hidden=64, vision_heads=4, vision_ff=160, vision_layers=1,
                                             feature_layer=-1, vision_act="gelu", text_hidden=96, text_heads=6,
                                             text_ff=192, seed=2),
    "SigLIP, 3 blocks, layer -1": TinySpec(vision="siglip", vision_hidden=64, vision_heads=2, vision_ff=128,
                                           image_size=64, patch_size=8, feature_layer=-1, text_hidden=96,
                                           text_heads=8, text_kv_heads=4, text_ff=224, seed=3),
}
E2E = {"CLIP + GQA decoder": (TinySpec(seed=2), "Describe the picture."),
       "SigLIP + GQA decoder": (TinySpec(vision="siglip", vision_ff=96, image_size=64, patch_size=8,
                                         feature_layer=-1, seed=5), "What is in the image?")}


def main() -> None:
    """Print Markdown tables of embedding NMSE per file type and end-to-end agreement."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", action="append", type=Path, default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = args.image or []
        for i in range(3):
            scene(i, 320 - 40 * i, 240 + 30 * i).save(tmp / f"scene{i}.png")
            images.append(tmp / f"scene{i}.png")
        print("| tower | type | NMSE (flash off) | NMSE (default) | mean cosine |")
        print("| --- | --- | --- | --- | --- |")
        for name, spec in TOWERS.items():
            ckpt = make_checkpoint(tmp / name.replace(" ", "_"), spec, "hf-5")
            reference = LlavaReference.from_checkpoint(ckpt)
            for outtype in ("f32", "f16", "q8_0"):
                _, mmproj = convert(ckpt, ckpt / "out", "f32", outtype, force=True)
                exact = embedding_parity(reference, VisionEncoder(mmproj, flash_attn=False), images)
                default = embedding_parity(reference, VisionEncoder(mmproj), images)
                print(f"| {name} | {outtype} | {exact.nmse:.2e} | {default.nmse:.2e} | {exact.cosine:.6f} |")
        print()
        print("| model (f32 files) | settings | greedy tokens equal | prompt top-1 agree | max prompt logit diff |")
        print("| --- | --- | --- | --- | --- |")
        for name, (spec, prompt) in E2E.items():
            ckpt = make_checkpoint(tmp / name.replace(" ", "_"), spec, "hf-5")
            model, mmproj = convert(ckpt, ckpt / "out", "f32", "f32", force=True)
            reference = LlavaReference.from_checkpoint(ckpt)
            for label, kw in (("F32 KV, flash off", {"kv_type": "f32", "flash_attn": False}), ("defaults", {})):
                with Session(model, mmproj, n_ctx=1024, **kw) as s:
                    p = generation_parity(reference, s, prompt, images[:1], 16)
                same = sum(a == b for a, b in zip(p.tokens, p.reference_tokens, strict=False))
                print(f"| {name} | {label} | {same}/{len(p.tokens)} | {p.prompt_top1_agree}/{p.n_prompt} "
                      f"| {p.max_logit_diff:.2e} |")


if __name__ == "__main__":
    main()
