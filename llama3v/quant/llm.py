"""Quantize an LLM GGUF with llama.cpp's own quantizer (`llama_model_quantize`): every type llama.cpp makes.

llama.cpp's quantizer picks a type per tensor (q4_k_m keeps half the attention and FFN down
projections in q6_k, the output head in q6_k, ...) and falls back to a compatible type where a
row is not a whole number of blocks, so the LLM gets exactly what `llama-quantize` would write.
It runs in libllama, loaded through the runtime's engine; the input is checked first (llama.cpp trusts
its input), the output is written under a temporary name and renamed into place once it reads back.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from gguf import GGMLQuantizationType

from llama3v.atomic import atomic_output
from llama3v.errors import Llama3vError
from llama3v.quant.types import LLM_QUANT_TYPES
from llama3v.runtime import engine
from llama3v.runtime.gguf_check import check_llm, read_model

_FLOAT = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_FILE_TYPE = "general.file_type"


def quantize_llm(src: str | Path, dst: str | Path, qtype: str, force: bool = False,
                 n_threads: int | None = None) -> Path:
    """Quantize the f32/f16/bf16 llama GGUF `src` to `qtype` (a key of LLM_QUANT_TYPES) at `dst`; returns `dst`."""
    ftype = LLM_QUANT_TYPES.get(qtype.lower())
    if ftype is None:
        raise Llama3vError(f"unknown LLM type {qtype!r}; choose one of {', '.join(LLM_QUANT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise Llama3vError(f"{dst} already exists; pass --force to overwrite")
    if src.is_file() and dst.resolve() == src.resolve():
        raise Llama3vError(f"{dst}: the output would replace its own input; choose another name")
    info = read_model(src)  # bounds-checked: llama.cpp aborts on some malformed files
    check_llm(info)
    quantized = [(n, t.type.name) for n, t in info.tensors.items() if t.type not in _FLOAT]
    if quantized:
        raise Llama3vError(f"{src} is already quantized ({quantized[0][0]} is {quantized[0][1]}); "
                           "start from the converter's f32, f16 or bf16 model")
    llama, _ = engine.libs()
    params = llama.llama_model_quantize_default_params()
    params.nthread = n_threads or engine.default_threads()
    params.ftype = int(ftype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp:
        engine.take_log()
        if llama.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise engine.failure(f"{src}: llama.cpp could not quantize this model to {qtype}")
        written = read_model(tmp)
        check_llm(written)
        if written.get(_FILE_TYPE) != int(ftype):
            raise Llama3vError(f"{tmp}: llama.cpp wrote file type {written.get(_FILE_TYPE)}, expected {int(ftype)}")
    return dst
