"""Convert a LLaVA-style Hugging Face checkpoint into `model-<type>.gguf` and `mmproj-<type>.gguf`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llama3v.converters.layouts import load_llava
from llama3v.converters.llm import llm_plan, write_llm
from llama3v.converters.mmproj import mmproj_plan, write_mmproj
from llama3v.converters.quantize import LLM_TYPES, MMPROJ_TYPES, parse_outtype
from llama3v.converters.tokenizer import load_vocab
from llama3v.errors import Llama3vError


def output_paths(outdir: Path, model_outtype: str, mmproj_outtype: str) -> tuple[Path, Path]:
    """Where `convert` writes the LLM and the mmproj."""
    return outdir / f"model-{model_outtype.lower()}.gguf", outdir / f"mmproj-{mmproj_outtype.lower()}.gguf"


def convert(
    src: str | Path,
    outdir: str | Path,
    model_outtype: str = "f16",
    mmproj_outtype: str = "f16",
    vision_tower: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    chat_template: str | None = None,
) -> tuple[Path, Path]:
    """Convert `src` and return the paths of the LLM GGUF and the mmproj GGUF.

    `chat_template` (a format name or a template file) replaces the prompt format the checkpoint names.
    """
    model_type, mmproj_type = parse_outtype(model_outtype, LLM_TYPES), parse_outtype(mmproj_outtype, MMPROJ_TYPES)
    outdir = Path(outdir)
    model_path, mmproj_path = output_paths(outdir, model_outtype, mmproj_outtype)
    existing = [str(p) for p in (model_path, mmproj_path) if p.exists()]
    if existing and not force:
        raise Llama3vError(f"{', '.join(existing)} already exists; pass --force to overwrite")

    ckpt = load_llava(src, vision_tower)
    # Plan both files before writing either, so a missing tensor leaves nothing behind.
    mmproj_plan(ckpt, mmproj_type)
    llm_plan(ckpt, model_type)
    vocab = load_vocab(ckpt, chat_template)

    outdir.mkdir(parents=True, exist_ok=True)
    write_mmproj(ckpt, mmproj_path, mmproj_type, progress)
    write_llm(ckpt, model_path, model_type, vocab, progress)
    return model_path, mmproj_path
