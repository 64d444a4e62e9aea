"""`llama3v fix-mmproj`: give an mmproj without `clip.vision.feature_layer` the key, so libmtmd runs all its blocks.

llama.cpp's legacy LLaVA converter (convert_image_encoder_to_gguf.py) drops the tower's last block
for LLaVA's feature layer -2 and writes `block_count` = the blocks it kept, but no feature layer;
libmtmd then runs `block_count - 1` blocks (upstream #25817), one short. The fix is metadata only:
the file is copied with `feature_layer = [block_count]` and its tensors byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

from llama3v import gguf_schema as S
from llama3v.atomic import atomic_output
from llama3v.errors import Llama3vError
from llama3v.gguf_header import read_gguf

V = GGUFValueType


def rewrite_metadata(src: Path, dst: Path, add: dict[str, list[int]] | None = None,
                     remove: tuple[str, ...] = ()) -> None:
    """Copy GGUF `src` to `dst` (atomically) with int32-array keys `add` set and keys `remove` left out."""
    add = dict(add or {})
    reader = GGUFReader(src)
    arch = reader.get_field(Keys.General.ARCHITECTURE).contents()
    with atomic_output(dst) as tmp:
        writer = GGUFWriter(tmp, arch, endianess=reader.endianess)
        alignment = reader.get_field(Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        for f in reader.fields.values():
            # general.architecture is written by GGUFWriter itself; GGUF.* are the reader's header fields.
            if f.name == Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in remove or f.name in add:
                continue
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if f.types[0] == V.ARRAY
                                 else None)
        for key, value in add.items():
            writer.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        read_gguf(tmp)  # the copy must parse before it replaces anything


def fix_mmproj(src: str | Path, dst: str | Path | None = None) -> tuple[Path, list[int] | None]:
    """Add `clip.vision.feature_layer = [block_count]` to an mmproj lacking it (in place unless `dst`).

    Returns the path written and the key it added, or the file and None when it already had the key."""
    src = Path(src)
    info = read_gguf(src)
    if info.get("general.architecture") != S.CLIP_ARCH:
        raise Llama3vError(f"{src}: not an mmproj file (architecture {info.get('general.architecture')!r})")
    if S.FEATURE_LAYER in info.kv:
        return src, None
    blocks = info.get(S.BLOCK_COUNT)
    if not isinstance(blocks, int) or blocks < 1:
        raise Llama3vError(f"{src}: {S.BLOCK_COUNT} missing or not a positive integer")
    out = Path(dst) if dst is not None else src
    rewrite_metadata(src, out, add={S.FEATURE_LAYER: [blocks]})
    return out, [blocks]
