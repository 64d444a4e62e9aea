"""Check GGUF files are what llama3v can run before llama.cpp opens them.

llama.cpp trusts much of a GGUF: a u32 key written with another integer type, or a tensor that
runs past the end of the file, can abort the whole process. On top of the bounds-checked header
(gguf_header.py) this checks what llama3v needs of a model and an mmproj, so a bad file becomes
a Llama3vError naming the file and the problem.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFValueType

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.gguf_header import GGUFInfo, read_gguf
from llama3v.runtime.image_processing import MAX_PIXELS

V = GGUFValueType
_INTS = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)
_LLM_BLOCK_RE = re.compile(r"blk\.(\d+)\.")
VOCAB_ARRAYS = (S.TOKENS, S.TOKEN_TYPES)  # read in full; the merges are only checked to be there
# What llama3v's mllama engine (patches 0005, 0006) reads with an asserting getter: types checked first.
MLLAMA_MMPROJ_KEYS = {S.IMAGE_SIZE: V.UINT32, S.PATCH_SIZE: V.UINT32, S.EMBEDDING_LENGTH: V.UINT32,
                      S.HEAD_COUNT: V.UINT32, S.BLOCK_COUNT: V.UINT32, S.PROJECTION_DIM: V.UINT32,
                      S.LAYER_NORM_EPS: V.FLOAT32, S.MLLAMA_MAX_NUM_TILES: V.UINT32,
                      S.MLLAMA_GLOBAL_BLOCK_COUNT: V.UINT32, S.MLLAMA_OUTER_LN_EPS: V.FLOAT32,
                      S.MLLAMA_INTERMEDIATE_LAYERS: V.ARRAY, S.MLLAMA_ASPECT_RATIOS: V.ARRAY,
                      S.IMAGE_MEAN: V.ARRAY, S.IMAGE_STD: V.ARRAY}
__all__ = ["GGUFInfo", "read_gguf", "read_model", "check_llm", "check_mmproj", "check_pair", "is_mllama"]


def read_model(path: str | Path) -> GGUFInfo:
    """Parse a model GGUF with its vocabulary arrays (check_llm validates them)."""
    return read_gguf(path, arrays=VOCAB_ARRAYS)


def check_llm(info: GGUFInfo) -> int:
    """Check a model GGUF is a llama-architecture LLM llama3v can run; return its n_embd."""
    arch = info.get("general.architecture")
    if arch not in (S.LLM_ARCH, S.MLLAMA_LLM_ARCH):
        raise info.fail(f"architecture {arch!r} is not supported (llama3v runs 'llama' and 'mllama' models)")
    key = f"{arch}.embedding_length"
    n_embd = info.get(key)
    if info.kv.get(key, (None,))[0] != V.UINT32 or not n_embd:
        raise info.fail(f"{key} missing or not a u32")
    embd = info.tensors.get(S.TOKEN_EMBD)
    if embd is None or embd.dims[0] != n_embd:
        raise info.fail(f"{S.TOKEN_EMBD} missing or not {n_embd} wide")
    if arch == S.LLM_ARCH:
        _check_vocab(info, embd.rows)
        _check_llm_values(info, int(n_embd), embd.rows)
        return int(n_embd)
    # mllama: HF's spare embedding rows after the vocabulary; the llama value checks assume llama's keys
    n_tokens = _check_vocab(info, embd.rows, exact=False)
    image = info.get(S.MLLAMA_IMAGE_TOKEN_ID)
    if info.kv.get(S.MLLAMA_IMAGE_TOKEN_ID, (None,))[0] != V.UINT32 or not 0 <= image < n_tokens:
        raise info.fail(f"{S.MLLAMA_IMAGE_TOKEN_ID} missing, not a u32 or outside the vocabulary")
    if info.kv.get(S.MLLAMA_CROSS_ATTENTION_LAYERS, (None,))[0] != V.ARRAY:
        raise info.fail(f"{S.MLLAMA_CROSS_ATTENTION_LAYERS} missing")
    return int(n_embd)


def is_mllama(info: GGUFInfo) -> bool:
    """True for a Llama-3.2-Vision model or mmproj."""
    return (info.get("general.architecture") == S.MLLAMA_LLM_ARCH or
            info.get(S.PROJECTOR_TYPE) == S.MLLAMA_PROJECTOR_TYPE)


def _count(info: GGUFInfo, key: str, default: int | None = None) -> int:
    """An integer hyperparameter (a scalar of any integer type; llama.cpp refuses other types itself)."""
    if key not in info.kv:
        if default is None:
            raise info.fail(f"missing key {key}")
        return default
    vtype, value = info.kv[key]
    if vtype not in _INTS:
        raise info.fail(f"key {key} has type {vtype.name}, an integer is required")
    return int(value)


def _check_llm_values(info: GGUFInfo, n_embd: int, n_vocab: int) -> None:
    """Every count llama.cpp reads against the tensors present, every enum against llama.cpp's names:
    llama.cpp asserts (aborts the process) on several of them, and a wrong shape fails deep in its loader."""
    n_layer = _count(info, S.BLOCK_COUNT_LLM)
    blocks = {int(m.group(1)) for name in info.tensors if (m := _LLM_BLOCK_RE.match(name))}
    if not 1 <= n_layer <= S.MAX_LAYERS_LLM or blocks != set(range(n_layer)):
        raise info.fail(f"{S.BLOCK_COUNT_LLM} is {n_layer} but the file holds {len(blocks)} blocks "
                        f"(at most {S.MAX_LAYERS_LLM})")
    for key in S.ABSENT_FEATURES_LLM:  # llama.cpp reads expert_used_count as a scalar or a per-layer array
        value = info.get(key, 0)
        if value is None or (any(value) if isinstance(value, list) else value):  # None: a long array
            raise info.fail(f"{key} is {value}, but the file has no such tensors (llama3v runs dense llama models)")
    for key, upper in S.POSITIVE_FLOATS_LLM.items():
        value = info.get(key, 1.0)
        if not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 < value <= upper):
            raise info.fail(f"{key} is {value}, not a positive number up to {upper:g}")
    if _count(info, S.CONTEXT_LENGTH_LLM) < 1:
        raise info.fail(f"{S.CONTEXT_LENGTH_LLM} must be at least 1")
    scaling = info.get(S.ROPE_SCALING_TYPE, "linear")
    if scaling not in S.ROPE_SCALING_TYPES:
        raise info.fail(f"{S.ROPE_SCALING_TYPE} {scaling!r} is not one of llama.cpp's "
                        f"{', '.join(S.ROPE_SCALING_TYPES)}")
    n_head = _count(info, S.HEAD_COUNT_LLM)
    if n_head < 1 or n_embd % n_head:
        raise info.fail(f"{S.HEAD_COUNT_LLM} {n_head} does not divide the embedding width {n_embd}")
    n_head_kv = _count(info, S.HEAD_COUNT_KV_LLM, n_head)
    if n_head_kv < 1 or n_head % n_head_kv:
        raise info.fail(f"{S.HEAD_COUNT_KV_LLM} {n_head_kv} does not divide {S.HEAD_COUNT_LLM} {n_head}")
    head_k = _count(info, S.KEY_LENGTH_LLM, n_embd // n_head)
    head_v = _count(info, S.VALUE_LENGTH_LLM, n_embd // n_head)
    n_rot = _count(info, S.ROPE_DIMENSION_COUNT, head_k)
    if not 0 < n_rot == head_k or head_v < 1:
        raise info.fail(f"head widths (key {head_k}, value {head_v}, rope {n_rot}) are not consistent")
    n_ff = _count(info, S.FEED_FORWARD_LENGTH_LLM)
    required = {S.OUTPUT_NORM: (n_embd,)}
    if S.OUTPUT in info.tensors:
        required[S.OUTPUT] = (n_embd, n_vocab)
    for bid in range(n_layer):
        shapes = {"attn_norm": (n_embd,), "attn_q": (n_embd, n_head * head_k), "attn_k": (n_embd, n_head_kv * head_k),
                  "attn_v": (n_embd, n_head_kv * head_v), "attn_output": (n_head * head_v, n_embd),
                  "ffn_norm": (n_embd,), "ffn_gate": (n_embd, n_ff), "ffn_up": (n_embd, n_ff),
                  "ffn_down": (n_ff, n_embd)}
        required.update({S.LLM_BLOCK.format(bid=bid, part=part): shape for part, shape in shapes.items()})
    _require_tensors(info, required)


def _check_vocab(info: GGUFInfo, n_rows: int, exact: bool = True) -> int:
    """llama.cpp asserts (aborts) on a vocabulary with duplicate entries and misbehaves on others; return its size.

    `exact`: one embedding row per token (mllama files keep HF's spare rows after the vocabulary)."""
    model = info.get(S.TOKENIZER_MODEL)
    if model != "gpt2":
        raise info.fail(f"tokenizer {model!r} is not supported (llama3v runs Llama-3's byte-level BPE, 'gpt2')")
    tokens, types = (info.get(k) for k in VOCAB_ARRAYS)
    if not isinstance(tokens, list) or not tokens or info.kv.get(S.MERGES, (None,))[0] != V.ARRAY:
        raise info.fail("the vocabulary (tokenizer.ggml.tokens / merges) is missing or not read")
    # llama.cpp reads tokens as C strings: one with a NUL byte is cut there and may collide with another.
    if any("\0" in t for t in tokens):
        raise info.fail("a vocabulary token contains a NUL byte")
    if len(set(tokens)) != len(tokens):
        raise info.fail("the vocabulary has duplicate tokens")
    if len(tokens) != n_rows if exact else len(tokens) > n_rows:
        raise info.fail(f"the vocabulary has {len(tokens)} tokens but {S.TOKEN_EMBD} has {n_rows} rows")
    if types is not None and (len(types) != len(tokens) or any(not 1 <= t <= 5 for t in types)):
        raise info.fail("tokenizer.ggml.token_type does not match the vocabulary")
    for key in (S.BOS_ID, S.EOS_ID):
        if key in info.kv and not 0 <= info.get(key) < len(tokens):
            raise info.fail(f"{key} is outside the vocabulary")
    return len(tokens)


def check_mmproj(info: GGUFInfo) -> int:
    """Check an mmproj GGUF holds a vision encoder libmtmd can run safely; return its output width."""
    if info.get("general.architecture") != S.CLIP_ARCH:
        raise info.fail(f"not an mmproj file (architecture {info.get('general.architecture')!r}, expected 'clip')")
    if info.get(S.PROJECTOR_TYPE) == S.MLLAMA_PROJECTOR_TYPE:
        return _check_mllama_mmproj(info)
    for key, vtype in S.MMPROJ_REQUIRED.items():
        if key not in info.kv:
            raise info.fail(f"missing key {key}")
        if info.kv[key][0] != vtype:
            raise info.fail(f"key {key} has type {info.kv[key][0].name}, libmtmd requires {vtype.name}")
    for key, vtype in S.MMPROJ_OPTIONAL.items():
        if key in info.kv and info.kv[key][0] != vtype:
            raise info.fail(f"key {key} has type {info.kv[key][0].name}, libmtmd requires {vtype.name}")
    if info.get(S.PROJECTOR_TYPE) != S.PROJECTOR_MLP:
        raise info.fail(f"projector type {info.get(S.PROJECTOR_TYPE)!r} is not supported (llama3v runs LLaVA 'mlp')")
    if not info.get(S.HAS_VISION_ENCODER):
        raise info.fail("the file has no vision encoder")
    image, patch = info.get(S.IMAGE_SIZE), info.get(S.PATCH_SIZE)
    # The patch convolution drops a remainder (SigLIP-so400m-patch14-384: 27 x 27 patches), as in HF.
    if not patch or not image or image < patch:
        raise info.fail(f"image size {image} is smaller than patch size {patch}")
    for key in (S.IMAGE_MEAN, S.IMAGE_STD):
        value = info.get(key)
        if not isinstance(value, list) or len(value) != 3 or info.kv[key][1] is None:
            raise info.fail(f"{key} must be 3 floats")
    layers = info.get(S.FEATURE_LAYER) or []
    n_blocks = info.get(S.BLOCK_COUNT)
    if not 1 <= n_blocks <= S.MAX_BLOCKS_VISION or any(not 0 < k <= n_blocks for k in layers):
        raise info.fail(f"feature layer {layers} is outside the {n_blocks} blocks")
    width, n_head = info.get(S.EMBEDDING_LENGTH), info.get(S.HEAD_COUNT)
    if not n_head or width % n_head:
        raise info.fail(f"{S.HEAD_COUNT} {n_head} does not divide the tower's width {width}")
    eps = info.get(S.LAYER_NORM_EPS)
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise info.fail(f"{S.LAYER_NORM_EPS} {eps} is not a small positive number")
    _check_pinpoints(info, image)
    return _check_vision_tensors(info)


def _check_pinpoints(info: GGUFInfo, image: int) -> None:
    """LLaVA-NeXT grids: (width, height) pairs of multiples of the tile size, each within the pixel limit
    (the anyres resize allocates a canvas of that size)."""
    if S.GRID_PINPOINTS not in info.kv:
        return
    flat = info.get(S.GRID_PINPOINTS)
    if not isinstance(flat, list) or not flat or len(flat) % 2 or \
            any(not isinstance(v, int) or v <= 0 or v % image for v in flat):
        raise info.fail(f"{S.GRID_PINPOINTS} must be (width, height) pairs of multiples of {image}")
    if any(w * h > MAX_PIXELS for w, h in zip(flat[::2], flat[1::2], strict=True)):
        raise info.fail(f"{S.GRID_PINPOINTS} has a grid over the {MAX_PIXELS:,}-pixel limit")


def _check_vision_tensors(info: GGUFInfo) -> int:
    """Every matrix libmtmd's LLaVA graph multiplies is present with the shape the keys imply (clip.cpp loads
    them as optional, and a missing or misshapen one crashes or aborts the process); returns the output width."""
    d, ff, patch = (int(info.get(k)) for k in (S.EMBEDDING_LENGTH, S.FEED_FORWARD_LENGTH, S.PATCH_SIZE))
    n_pos = (int(info.get(S.IMAGE_SIZE)) // patch) ** 2 + (S.CLASS_EMBD in info.tensors)
    mm0, mm2 = (S.PROJ_LAYER.format(idx=i, kind="weight") for i in (0, 2))
    width = info.tensors[mm0].rows if mm0 in info.tensors else -1
    required = {S.PATCH_EMBD: (patch, patch, 3, d), S.POSITION_EMBD: (d, n_pos), mm0: (d, width)}
    # mm.2 is required although clip.cpp loads it as optional: its clip_n_mmproj_embd reads mm.2's width
    # unchecked, so an mm.0-only file crashes libmtmd at load (SIGSEGV, measured), and its graph applies
    # gelu after mm.0 anyway (docs/s2.md).
    required[mm2] = (width, info.tensors[mm2].rows if mm2 in info.tensors else -1)
    for bid in range(int(info.get(S.BLOCK_COUNT))):
        for part in S.VISION_ATTN_PARTS:
            required[S.VISION_BLOCK.format(bid=bid, part=part, kind="weight")] = (d, d)
        # Files from llama.cpp's older converter name the two FFN layers the other way round; clip.cpp swaps
        # them back by shape, so either orientation is fine.
        up, down = (S.VISION_BLOCK.format(bid=bid, part=p, kind="weight") for p in (S.FFN_UP, S.FFN_DOWN))
        swapped = down in info.tensors and tuple(info.tensors[down].dims) == (d, ff)
        required[up], required[down] = ((ff, d), (d, ff)) if swapped else ((d, ff), (ff, d))
    _require_tensors(info, required)
    width = info.tensors[mm2].rows
    return _s2_tensors(info, d, width) if S.S2_SCALES in info.kv else width


def _require_tensors(info: GGUFInfo, required: dict[str, tuple[int, ...]]) -> None:
    """Each named tensor present with exactly the shape (ggml order) the file's keys imply."""
    for name, shape in required.items():
        t = info.tensors.get(name)
        if t is None:
            raise info.fail(f"tensor {name} is missing")
        if tuple(t.dims) != shape or min(shape) <= 0:
            raise info.fail(f"tensor {name} has shape {list(t.dims)}, the file's keys imply {list(shape)}")


def _check_mllama_mmproj(info: GGUFInfo) -> int:
    """Check the keys llama3v's mllama encoder reads; return its output width."""
    for key, vtype in MLLAMA_MMPROJ_KEYS.items():
        if info.kv.get(key, (None,))[0] != vtype:
            raise info.fail(f"key {key} missing or not a {vtype.name}")
    return int(info.get(S.PROJECTION_DIM))


def _s2_tensors(info: GGUFInfo, d: int, mtmd_width: int) -> int:
    """An S2 mmproj (runtime/s2.py): sizes that cut into whole crops, libmtmd passing the tower's features
    through, and the runtime's projector (f32/f16, read by numpy); returns its output width."""
    scales = info.get(S.S2_SCALES)
    size = int(info.get(S.IMAGE_SIZE))
    if (info.kv[S.S2_SCALES][0] != V.ARRAY or not isinstance(scales, list) or not scales or scales[0] != size
            or any(not isinstance(s, int) or s <= 0 or s % size or s > 16 * size for s in scales)
            or scales != sorted(set(scales))):
        raise info.fail(f"{S.S2_SCALES} {scales} must be increasing multiples of the image size {size}, "
                        "starting with it")
    if mtmd_width != d:
        raise info.fail(f"an S2 mmproj's projector must pass the tower's {d} features through, not {mtmd_width}")
    w0, w2 = (info.tensors.get(S.S2_PROJ_LAYER.format(idx=i, kind="weight")) for i in (0, 2))
    if w0 is None or w2 is None:
        raise info.fail("an S2 mmproj lacks its projector (s2.mm.0, s2.mm.2)")
    n_embd = w2.rows
    required: dict[str, tuple[int, ...]] = {}
    for idx, shape in ((0, (d * len(scales), n_embd)), (2, (n_embd, n_embd))):
        required[S.S2_PROJ_LAYER.format(idx=idx, kind="weight")] = shape
        required[S.S2_PROJ_LAYER.format(idx=idx, kind="bias")] = (n_embd,)
    _require_tensors(info, required)
    for name in required:
        if name in info.tensors and info.tensors[name].type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise info.fail(f"tensor {name} must be F32 or F16")
    return n_embd


def check_pair(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """Check an mmproj feeds embeddings of the width the model expects, to a model of its family."""
    n_embd, width = check_llm(model), check_mmproj(mmproj)
    if is_mllama(model) != is_mllama(mmproj):
        raise Llama3vError(f"{mmproj.path} and {model.path} do not belong together: one is a Llama-3.2-Vision "
                           "(mllama) file and the other is not")
    if n_embd != width:
        raise Llama3vError(
            f"{mmproj.path} projects to {width}-wide embeddings but {model.path} expects {n_embd}: "
            "they do not belong together")
