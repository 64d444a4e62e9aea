"""Convert a Hugging Face checkpoint (LLaVA-style or mllama; a directory or a Hub id) into `model-<type>.gguf`
and `mmproj-<type>.gguf`.

All or nothing: both files are written into a hidden staging folder inside the destination
(`.llama3v-convert.PID.partial`) and renamed into place together only when both are complete, so an
interrupted, killed or failed conversion leaves neither file. A staging folder left by a killed
conversion (its process gone) is deleted by the next conversion to that destination.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from llama3v.atomic import alive, remove_stale_partials
from llama3v.chat_formats import resolve
from llama3v.converters import llm as llava_llm
from llama3v.converters import mllama_gguf
from llama3v.converters import mmproj as llava_mmproj
from llama3v.converters.tokenizer import choose_chat_format, load_vocab
from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import open_checkpoint
from llama3v.hf.hub import resolve_checkpoint
from llama3v.hf.key_formats import load_llava
from llama3v.hf.mllama_key_formats import is_mllama, load_mllama
from llama3v.progress import Progress
from llama3v.quant.storage import parse_outtype
from llama3v.quant.types import CONVERT_LLM_TYPES, MMPROJ_TYPES

STAGING = ".llama3v-convert.{pid}.partial"


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
    progress: Progress | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
) -> tuple[Path, Path]:
    """Convert `src` (a checkpoint directory, else a Hub id at `revision`) and return the LLM and mmproj paths.

    `chat_template` (a format name or a template file) replaces the prompt format the checkpoint names.
    """
    model_type = parse_outtype(model_outtype, CONVERT_LLM_TYPES)
    mmproj_type = parse_outtype(mmproj_outtype, MMPROJ_TYPES)
    outdir = Path(outdir)
    model_path, mmproj_path = output_paths(outdir, model_outtype, mmproj_outtype)
    existing = [str(p) for p in (model_path, mmproj_path) if p.exists()]
    if existing and not force:
        raise Llama3vError(f"{', '.join(existing)} already exists; pass --force to overwrite")

    root = resolve_checkpoint(src, revision)
    if is_mllama(open_checkpoint(root).config):
        if vision_tower is not None:
            raise Llama3vError("--vision-tower applies to LLaVA checkpoints; an mllama checkpoint holds its encoder")
        ckpt = load_mllama(root)
        mm, llm = mllama_gguf, mllama_gguf
    else:
        tower = resolve_checkpoint(vision_tower) if vision_tower is not None else None
        # Named after the directory or the id's last part, so a Hub snapshot (named by commit) converts alike.
        ckpt = load_llava(root, tower, name=Path(src).name)
        mm, llm = llava_mmproj, llava_llm
    # Plan both files before writing either, so a missing tensor fails before any work.
    mmproj_plans = mm.mmproj_plan(ckpt, mmproj_type)
    llm_plans = llm.llm_plan(ckpt, model_type)
    if mm is mllama_gguf:
        vocab = mllama_gguf.load_mllama_vocab(ckpt)
        if chat_template:
            vocab = replace(vocab, chat=resolve(chat_template))
    else:
        vocab = load_vocab(ckpt.main, ckpt.config.text.vocab_size, choose_chat_format(ckpt, chat_template))

    try:
        outdir.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(outdir)
        for path in (model_path, mmproj_path):  # left by versions that wrote beside the destination
            remove_stale_partials(path)
        staging = outdir / STAGING.format(pid=os.getpid())
        staging.mkdir()
    except OSError as e:
        raise Llama3vError(f"{outdir}: cannot write the output there ({e.strerror})") from None
    try:
        mm.write_mmproj(ckpt, staging / mmproj_path.name, mmproj_type, mmproj_plans, progress)
        llm.write_llm(ckpt, staging / model_path.name, model_type, llm_plans, vocab, progress)
        _publish(staging, model_path, mmproj_path)
    except OSError as e:
        raise Llama3vError(f"{outdir}: writing the output failed ({e.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path, mmproj_path


def _publish(staging: Path, first: Path, second: Path) -> None:
    """Rename both files from the staging folder into place; if the second rename fails, take back the first.
    Two renames in one folder: only a kill in the microseconds between them can leave one file."""
    os.replace(staging / first.name, first)
    try:
        os.replace(staging / second.name, second)
    except BaseException:
        first.unlink(missing_ok=True)
        raise


def _remove_stale_staging(outdir: Path) -> None:
    """Delete staging folders that killed conversions (kill -9, power loss) left in `outdir`."""
    for old in outdir.glob(STAGING.format(pid="*")):
        pid = old.name.split(".")[2]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
