"""`llama3v quantize`: one GGUF in, the same kind of file in another type out.

An mmproj (architecture `clip`) goes through quant/requantize.py, whose kept-precision rule it
shares with `convert`; an LLM (architecture `llama` or `mllama`) through llama.cpp's own quantizer (quant/llm.py).
It imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.gguf_header import read_gguf
from llama3v.progress import Progress, bars
from llama3v.quant.llm import quantize_llm
from llama3v.quant.requantize import requantize_mmproj

# convert's names: mmproj-<type>.gguf, model-<type>.gguf (mllama models: llama.cpp knows them through patch 0005)
_PREFIX = {"clip": "mmproj", "llama": "model", S.MLLAMA_LLM_ARCH: "model"}


def quantize_file(src: str | Path, qtype: str, dst: str | Path | None = None, force: bool = False,
                  allow_requantize: bool = False, n_threads: int | None = None,
                  progress: Progress | None = None) -> Path:
    """Write mmproj or LLM `src` as `qtype` to `dst` (default: mmproj-<type>.gguf or model-<type>.gguf beside it)."""
    src = Path(src)
    arch = read_gguf(src).get("general.architecture")
    if arch not in _PREFIX:
        raise Llama3vError(f"{src}: architecture {arch!r} is neither an mmproj ('clip') nor a llama or mllama model")
    dst = Path(dst) if dst is not None else src.with_name(f"{_PREFIX[arch]}-{qtype.lower()}.gguf")
    if arch == "clip":
        return requantize_mmproj(src, dst, qtype, force=force, allow_requantize=allow_requantize, progress=progress)
    if allow_requantize:
        raise Llama3vError("--allow-requantize applies to mmproj files; an LLM is quantized from f32, f16 or bf16")
    return quantize_llm(src, dst, qtype, force=force, n_threads=n_threads)


def quantize_command(args: argparse.Namespace) -> int:
    """`llama3v quantize SRC TYPE [-o OUT] [--force] [--allow-requantize] [--threads N]`; prints the output path.

    argparse arguments: `src` (Path); `type` (str: an mmproj type of quant.types.MMPROJ_TYPES for an
    mmproj, an LLM type of quant.types.LLM_QUANT_TYPES for a model); `-o/--output` (Path, default
    None: beside SRC); `--force` (store_true); `--allow-requantize` (store_true); `--threads` (int, default
    None); `-q/--quiet` from the common options.
    """
    if not args.quiet:
        print(f"quantizing {args.src} to {args.type}", file=sys.stderr)
    out = quantize_file(args.src, args.type, args.output, force=args.force, allow_requantize=args.allow_requantize,
                        n_threads=args.threads, progress=bars(args.quiet))
    print(out)
    return 0
