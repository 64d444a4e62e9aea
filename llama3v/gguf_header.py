"""Parse a GGUF file's header and tensor table with bounds checks, without reading tensor data.

Every length, count, offset and size is checked against the file, so a truncated or corrupt file
becomes a Llama3vError naming it (llama.cpp itself can abort on such files). Long arrays (the
vocabulary) are skipped unless asked for by name, which keeps parsing a 128k-token model fast.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llama3v.errors import Llama3vError

V = GGUFValueType
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
_SMALL_ARRAY = 64  # arrays up to this length are kept as values; longer ones (vocab) are skipped
_MAX_DIMS = 4


@dataclass
class Tensor:
    """One entry of the tensor table: ggml dims (ne order), type, and byte range in the file."""

    dims: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Number of rows (ne[1]); a matrix stored from an HF [out, in] weight has `out` rows."""
        return self.dims[1] if len(self.dims) > 1 else 1


@dataclass
class GGUFInfo:
    """What a GGUF header says: metadata (type, value) and the tensor table."""

    path: Path
    version: int
    kv: dict[str, tuple[GGUFValueType, object]]
    tensors: dict[str, Tensor]

    def get(self, key: str, default: object = None) -> object:
        """A metadata value (None for long arrays, which are not kept)."""
        return self.kv[key][1] if key in self.kv else default

    def fail(self, problem: str) -> Llama3vError:
        """An error naming this file."""
        return Llama3vError(f"{self.path}: {problem}")


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise Llama3vError(f"{self.path}: truncated GGUF header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise Llama3vError(f"{self.path}: truncated GGUF header (string of {n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def strings(self, count: int, keep: bool) -> list[str] | None:
        """A string array: decoded strictly when kept, else only skipped (the vocabulary is long)."""
        buf, pos, end, length = self.buf, self.pos, len(self.buf), _U64.unpack_from
        raw = [] if keep else None
        try:
            for _ in range(count):
                (n,) = length(buf, pos)
                pos += 8
                if n > end:
                    pos = end + 1
                    break
                if keep:
                    raw.append(buf[pos:pos + n])
                pos += n
        except struct.error:
            pos = end + 1
        if pos > end:
            raise Llama3vError(f"{self.path}: truncated GGUF header (string array)")
        self.pos = pos
        if raw is None:
            return None
        try:
            return [r.decode("utf-8") for r in raw]
        except UnicodeDecodeError:
            raise Llama3vError(f"{self.path}: a string in the header is not valid UTF-8") from None


def read_gguf(path: str | Path, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Parse and bounds-check a GGUF file's header and tensor table; long arrays only if named."""
    path = Path(path)
    if not path.is_file():
        raise Llama3vError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise Llama3vError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        if bytes(buf[:4]) != b"GGUF":
            raise Llama3vError(f"{path}: not a GGUF file (bad magic)")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise Llama3vError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        if n_tensors > size // 24 or n_kv > size // 16:
            raise Llama3vError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        kv = {}
        for _ in range(n_kv):
            key = c.string()
            kv[key] = _read_value(c, key, key in arrays)
        alignment = kv.get("general.alignment", (V.UINT32, 32))[1]
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise Llama3vError(f"{path}: invalid general.alignment {alignment}")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise Llama3vError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            dims = tuple(c.take("<Q") for _ in range(n_dims))
            raw_type = c.take("<I")
            offset = c.take("<Q")
            infos.append((name, dims, raw_type, offset))
        data_start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, dims, raw_type, offset in infos:
        tensors[name] = _check_tensor(path, name, dims, raw_type, offset, data_start, size, alignment)
    if len(tensors) != len(infos):
        raise Llama3vError(f"{path}: duplicate tensor names")
    return GGUFInfo(path, version, kv, tensors)


def _read_value(c: _Cursor, key: str, keep: bool) -> tuple[GGUFValueType, object]:
    raw = c.take("<I")
    try:
        vtype = V(raw)
    except ValueError:
        raise Llama3vError(f"{c.path}: key {key!r} has unknown value type {raw}") from None
    if vtype == V.STRING:
        return vtype, c.string()
    if vtype != V.ARRAY:
        return vtype, c.take(_SCALARS[vtype])
    raw_elem, count = c.take("<I"), c.take("<Q")
    try:
        elem = V(raw_elem)
    except ValueError:
        raise Llama3vError(f"{c.path}: key {key!r} is an array of unknown type {raw_elem}") from None
    if elem == V.ARRAY:
        raise Llama3vError(f"{c.path}: key {key!r} is a nested array")
    if elem == V.STRING:
        return vtype, c.strings(count, keep or count <= _SMALL_ARRAY)
    width = struct.calcsize(_SCALARS[elem])
    if c.pos + width * count > len(c.buf):
        raise Llama3vError(f"{c.path}: truncated GGUF header (array {key!r})")
    values = list(struct.unpack_from(f"<{count}{_SCALARS[elem][1]}", c.buf, c.pos)) \
        if count <= _SMALL_ARRAY or keep else None
    c.pos += width * count
    return vtype, values


def _check_tensor(path: Path, name: str, dims: tuple[int, ...], raw_type: int, offset: int,
                  data_start: int, size: int, alignment: int) -> Tensor:
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise Llama3vError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
    if any(d <= 0 for d in dims) or dims[0] % block:
        raise Llama3vError(f"{path}: tensor {name!r} has invalid shape {list(dims)} for {qtype.name}")
    n = 1
    for d in dims:
        n *= d
    nbytes = n // block * type_size
    if offset % alignment or data_start + offset + nbytes > size:
        raise Llama3vError(
            f"{path}: tensor {name!r} lies outside the file (offset {offset}, {nbytes} bytes; "
            f"file is {size} bytes): truncated or corrupt")
    return Tensor(dims, qtype, data_start + offset, nbytes)




def read_tensor(info: GGUFInfo, name: str) -> np.ndarray:
    """One f32 or f16 tensor's values as float32, numpy order (for small tensors the runtime needs)."""
    t = info.tensors[name]
    dtypes = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if t.type not in dtypes:
        raise Llama3vError(f"{info.path}: tensor {name!r} is {t.type.name}; expected F32 or F16")
    count = t.nbytes // np.dtype(dtypes[t.type]).itemsize
    data = np.fromfile(info.path, dtype=dtypes[t.type], count=count, offset=t.offset)
    return data.astype(np.float32).reshape(tuple(reversed(t.dims)))
