"""Write a GGUF file atomically, one tensor at a time, and verify it by reading it back.

Tensors are produced, encoded and written one by one, so converting an 8B model needs memory for
its largest tensor, not for the model. The file is written under a hidden temporary name in the
destination directory (llama3v.atomic) and renamed into place only after it reads back correctly:
an interrupted or killed conversion leaves the destination as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from llama3v.atomic import atomic_output
from llama3v.errors import Llama3vError
from llama3v.gguf_header import read_gguf
from llama3v.progress import Progress


@dataclass
class TensorPlan:
    """A tensor to write: its GGUF name, float shape (numpy order), type and how to compute it."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        """Size of the encoded tensor."""
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * type_size


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[GGUFWriter], None],
    tensors: list[TensorPlan],
    encode: Callable[[np.ndarray, GGMLQuantizationType], np.ndarray],
    progress: Progress | None = None,
) -> None:
    """Write `tensors`, each float array encoded as its type by `encode`, and the metadata that `add_metadata`
    adds to `path`, atomically. `encode` is llama3v.quant.storage.encode (passed in: quant uses this writer)."""
    with atomic_output(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        add_metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors, 1):
            data = t.produce()
            if tuple(data.shape) != tuple(t.shape):
                raise Llama3vError(f"tensor {t.name}: expected shape {t.shape}, checkpoint has {data.shape}")
            writer.write_tensor_data(encode(data, t.qtype))
            if progress:
                progress(f"writing {path.name}", i, len(tensors))
        writer.close()
        _verify(tmp, tensors)


def _verify(path: Path, tensors: list[TensorPlan]) -> None:
    try:
        found = read_gguf(path).tensors
    except Llama3vError as e:
        raise Llama3vError(f"{path}: written file does not read back ({e})") from e
    for t in tensors:
        got = found.get(t.name)
        if got is None or got.type != t.qtype or got.nbytes != t.nbytes:
            raise Llama3vError(f"{path}: tensor {t.name} did not read back as written")

