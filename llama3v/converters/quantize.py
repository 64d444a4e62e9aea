"""Output tensor types: the one rule for which tensors keep precision, and the numpy encoders."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError

Q = GGMLQuantizationType
OUTTYPES: dict[str, GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
# general.file_type numbers the whole file's type differently from the tensor types.
_FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
_FLOAT = (Q.F32, Q.F16, Q.BF16)
# Small tensors that every output keeps in f16 or better: position and patch embeddings feed
# every token, so their rounding error is not averaged away.
_EMBEDDINGS_KEPT = (S.PATCH_EMBD, S.POSITION_EMBD)


def parse_outtype(name: str) -> GGMLQuantizationType:
    """Map a CLI type name (f32, f16, q8_0) to its GGML type."""
    try:
        return OUTTYPES[name.lower()]
    except KeyError:
        raise Llama3vError(f"unknown output type {name!r}; choose one of {', '.join(OUTTYPES)}") from None


def file_type(outtype: GGMLQuantizationType) -> int:
    """The general.file_type value for a file written as `outtype`."""
    return int(_FILE_TYPES[outtype])


def storage_type(name: str, shape: tuple[int, ...], requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type tensor `name` is stored in when `requested` is asked for (shared by every output)."""
    if len(shape) == 1 or name == S.ROPE_FREQS:
        return Q.F32  # norms, biases, class embedding, rope factors: tiny and precision-critical
    if requested in _FLOAT:
        return requested
    block = GGML_QUANT_SIZES[requested][0]
    if name in _EMBEDDINGS_KEPT or shape[-1] % block != 0:
        return Q.F16
    return requested


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode a float32 array as `qtype` (the raw bytes gguf-py writes)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf_quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
