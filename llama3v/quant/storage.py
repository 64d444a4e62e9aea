"""Output tensor types: the one rule for which tensors keep precision, and the encoders.

`storage_type` is the predicate every quantized output shares (the converter's mmproj and LLM
files, and `requantize` on an existing mmproj). gguf-py encodes the float types, q8_0, q5_x and
q4_x in numpy; k-quants come from llama.cpp's own C quantizer (`ggml_quants`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.quant import ggml_quants
from llama3v.quant.types import MMPROJ_TYPES

if TYPE_CHECKING:
    from llama3v.gguf_writer import TensorPlan

Q = GGMLQuantizationType
F = LlamaFileType
# general.file_type numbers the whole file's type differently from the tensor types; a file of
# one k-quant is what llama.cpp calls the _S variant (Q6_K has only one).
_FILE_TYPES = {
    Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0, Q.Q6_K: F.MOSTLY_Q6_K,
    Q.Q5_K: F.MOSTLY_Q5_K_S, Q.Q5_1: F.MOSTLY_Q5_1, Q.Q5_0: F.MOSTLY_Q5_0, Q.Q4_K: F.MOSTLY_Q4_K_S,
    Q.Q4_1: F.MOSTLY_Q4_1, Q.Q4_0: F.MOSTLY_Q4_0,
}
_FLOAT = (Q.F32, Q.F16, Q.BF16)
# gguf-py only decodes these; llama.cpp's C quantizer encodes them.
_K_QUANTS = (Q.Q6_K, Q.Q5_K, Q.Q4_K)
# Small tensors that every output keeps in f16 or better: position, tile and patch embeddings feed
# every token, so their rounding error is not averaged away.
_EMBEDDINGS_KEPT = (S.PATCH_EMBD, S.POSITION_EMBD,
                    S.MLLAMA_TILE_POSITION_EMBD, S.MLLAMA_PRE_TILE_EMBD, S.MLLAMA_POST_TILE_EMBD)


def parse_outtype(name: str, choices: dict[str, GGMLQuantizationType] = MMPROJ_TYPES) -> GGMLQuantizationType:
    """Map a CLI type name (f32, f16, q8_0, q4_k, ...) to its GGML type, among `choices`."""
    try:
        return choices[name.lower()]
    except KeyError:
        raise Llama3vError(f"unknown output type {name!r}; choose one of {', '.join(choices)}") from None


def file_type(outtype: GGMLQuantizationType) -> int:
    """The general.file_type value for a file written as `outtype`."""
    return int(_FILE_TYPES[outtype])


_NUMPY_SIDE = S.S2_PROJ_LAYER.split("{")[0]


def storage_type(name: str, shape: tuple[int, ...], requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type tensor `name` is stored in when `requested` is asked for (shared by every output).

    1-D tensors (norms, biases, class embedding) and rope factors: f32. Float requests apply to
    every matrix. Quantized requests apply to matrices whose rows are whole blocks (32 values for
    q8_0/q5_x/q4_x, 256 for k-quants); patch and position embeddings and every other matrix stay f16.
    Matrices the runtime multiplies in numpy (an S2 projector) are f32 in an f32 file, else f16.
    """
    if len(shape) == 1 or name == S.ROPE_FREQS:
        return Q.F32  # tiny and precision-critical
    if name.startswith(_NUMPY_SIDE):  # computed by the runtime in numpy, which has f32 and f16 only
        return Q.F32 if requested == Q.F32 else Q.F16
    if requested in _FLOAT:
        return requested
    block = GGML_QUANT_SIZES[requested][0]
    if name in _EMBEDDINGS_KEPT or shape[-1] % block != 0:
        return Q.F16
    return requested


def kept_precision(plans: Iterable[TensorPlan], requested: GGMLQuantizationType) -> list[str]:
    """The matrices `storage_type` left above the requested type (recorded as llama3v.quant.kept_precision)."""
    return [p.name for p in plans if p.qtype != requested and len(p.shape) > 1]


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode a float32 array as `qtype` (the raw bytes gguf-py writes)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    if qtype in _K_QUANTS:
        return ggml_quants.quantize(array, qtype)
    return gguf_quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
