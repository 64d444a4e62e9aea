"""llama.cpp's own quantizer (`ggml_quantize_chunk` in libggml-base) for the types gguf-py cannot encode.

gguf-py encodes f16, bf16, q8_0, q5_x and q4_x in numpy but only decodes k-quants. The k-quant
encoders live in ggml's C code, which llama-cpp-python ships as libggml-base next to libllama.
That library is plain C with no model or context state, so the converter loads it by file path
through ctypes: no `import llama_cpp` and no `llama3v.runtime` (the converter imports neither),
and the same file the runtime later maps, so the bytes are exactly what llama.cpp would write.
ggml aborts the whole process on a bad argument (GGML_ASSERT), so every call is checked first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llama3v.errors import Llama3vError

Q = GGMLQuantizationType
# Types ggml_quantize_chunk encodes without an importance matrix (others abort inside ggml): the
# k-quants, and the 32-block types, whose bytes equal gguf-py's (which tests use to check this binding).
QUANTIZABLE = frozenset({Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K})
_NAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
_lib: list[ctypes.CDLL] = []


def _library() -> ctypes.CDLL:
    """libggml-base from llama-cpp-python's lib directory, loaded once."""
    if not _lib:
        spec = importlib.util.find_spec("llama_cpp")  # locates the package without importing it
        name = _NAMES.get(sys.platform, _NAMES["linux"])
        path = Path(next(iter(spec.submodule_search_locations))) / "lib" / name if spec else None
        if path is None or not path.is_file():
            raise Llama3vError(f"k-quants need llama.cpp's {name} from llama-cpp-python, which is not installed; "
                               "run `make setup` (README.md, 'The engine')")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.POINTER(ctypes.c_float)]
        _lib.append(lib)
    return _lib[0]


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode a float array as `qtype` with ggml's quantizer: uint8 [..., bytes per row], as gguf-py returns."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    data = np.ascontiguousarray(array, dtype=np.float32)
    n_per_row = data.shape[-1]
    if qtype not in QUANTIZABLE or n_per_row % block:
        raise Llama3vError(f"ggml cannot encode rows of {n_per_row} as {qtype.name}")
    lib = _library()
    n_rows = data.size // n_per_row
    row_bytes = n_per_row // block * type_size
    out = np.empty((*data.shape[:-1], row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                      out.ctypes.data_as(ctypes.c_void_p), 0, n_rows, n_per_row, None)
    if written != out.size:
        raise Llama3vError(f"ggml wrote {written} bytes of {qtype.name}, expected {out.size}")
    return out
