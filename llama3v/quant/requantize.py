"""Write an existing mmproj GGUF in another type (`llama3v quantize`), by the rule `convert` uses.

Every tensor is decoded to float32 (gguf-py decodes every type, k-quants included) and stored
again as `storage_type` says, through the atomic, verified GGUF writer the converter uses; the
metadata is copied except the keys that describe the new type. It needs llama.cpp only for k-quant
encoding, and gets that from libggml-base directly (quant/ggml_quants.py), not through the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants
from gguf.gguf_reader import ReaderTensor

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.gguf_writer import TensorPlan, write_gguf
from llama3v.progress import Progress
from llama3v.quant.storage import encode, file_type, kept_precision, parse_outtype, storage_type

Q = GGMLQuantizationType
_FLOAT = (Q.F32, Q.F16, Q.BF16)
_FILE_TYPE = "general.file_type"
# Keys the writer sets itself, or that the new type changes (the file type is rewritten, not copied).
_NOT_COPIED = ("GGUF.", "general.architecture", "general.alignment", S.KEPT_PRECISION)


def requantize_mmproj(src: str | Path, dst: str | Path, outtype: str, force: bool = False,
                      allow_requantize: bool = False, progress: Progress | None = None) -> Path:
    """Write mmproj `src` as `outtype` to `dst` (atomically); returns `dst`.

    A source with quantized matrices is refused unless `allow_requantize`: their rounding error
    would add to the new type's.
    """
    qtype = parse_outtype(outtype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise Llama3vError(f"{src}: no such file")
    if dst.exists() and not force:
        raise Llama3vError(f"{dst} already exists; pass --force to overwrite")
    if dst.resolve() == src.resolve():
        raise Llama3vError(f"{dst}: the output would replace its own input; choose another name")
    try:
        reader = GGUFReader(src)
    except Exception as e:  # gguf-py raises ValueError and others on a malformed file
        raise Llama3vError(f"{src}: not a readable GGUF file ({e})") from e
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != S.CLIP_ARCH:
        raise Llama3vError(f"{src}: not an mmproj file (architecture {arch.contents() if arch else None!r})")
    quantized = [t for t in reader.tensors if t.tensor_type not in _FLOAT]
    if quantized and not allow_requantize:
        raise Llama3vError(f"{src} is already quantized ({quantized[0].name} is {quantized[0].tensor_type.name}); "
                           "start from an f32/f16/bf16 mmproj, or pass --allow-requantize")

    plans = [_plan(t, qtype) for t in reader.tensors]
    kept = kept_precision(plans, qtype)

    def metadata(w: GGUFWriter) -> None:
        # Source order is kept, the new file type in the old one's place: requantizing the f32 file
        # gives the bytes a direct conversion would.
        fields = [f for f in reader.fields.values() if not f.name.startswith(_NOT_COPIED)]
        if all(f.name != _FILE_TYPE for f in fields):
            w.add_file_type(file_type(qtype))
        for field in fields:
            if field.name == _FILE_TYPE:
                w.add_file_type(file_type(qtype))
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        w.add_array(S.KEPT_PRECISION, kept)

    dst.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(dst, S.CLIP_ARCH, metadata, plans, encode, progress)
    return dst


def _plan(t: ReaderTensor, requested: GGMLQuantizationType) -> TensorPlan:
    shape = tuple(int(d) for d in reversed(t.shape))  # gguf-py lists ggml's ne order
    return TensorPlan(t.name, shape, storage_type(t.name, shape, requested), lambda: _decode(t, shape))


def _decode(t: ReaderTensor, shape: tuple[int, ...]) -> np.ndarray:
    return gguf_quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
