"""Check GGUF files are what llama3v can run before llama.cpp opens them.

llama.cpp trusts much of a GGUF: a u32 key written with another integer type, or a tensor that
runs past the end of the file, can abort the whole process. On top of the bounds-checked header
(gguf_header.py) this checks what llama3v needs of a model and an mmproj, so a bad file becomes
a Llama3vError naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType

from llama3v import gguf_schema as S
from llama3v.errors import Llama3vError
from llama3v.gguf_header import GGUFInfo, read_gguf

V = GGUFValueType
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
    n_tokens = _check_vocab(info, embd.rows, exact=arch == S.LLM_ARCH)
    if arch == S.MLLAMA_LLM_ARCH:
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
    if any(not 0 < k <= info.get(S.BLOCK_COUNT) for k in layers):
        raise info.fail(f"feature layer {layers} is outside the {info.get(S.BLOCK_COUNT)} blocks")
    return _check_vision_tensors(info)


def _check_vision_tensors(info: GGUFInfo) -> int:
    """Every matrix libmtmd's LLaVA graph multiplies is present with the shape the keys imply (clip.cpp loads
    them as optional, and a missing or misshapen one crashes or aborts the process); returns the output width."""
    d, ff, patch = (int(info.get(k)) for k in (S.EMBEDDING_LENGTH, S.FEED_FORWARD_LENGTH, S.PATCH_SIZE))
    n_pos = (int(info.get(S.IMAGE_SIZE)) // patch) ** 2 + (S.CLASS_EMBD in info.tensors)
    mm0, mm2 = (S.PROJ_LAYER.format(idx=i, kind="weight") for i in (0, 2))
    width = info.tensors[mm0].rows if mm0 in info.tensors else -1
    required = {S.PATCH_EMBD: (patch, patch, 3, d), S.POSITION_EMBD: (d, n_pos), mm0: (d, width)}
    if mm2 in info.tensors:  # absent: a linear projector, which libmtmd's "mlp" graph also runs
        required[mm2] = (width, info.tensors[mm2].rows)
    for bid in range(int(info.get(S.BLOCK_COUNT))):
        for part in S.VISION_ATTN_PARTS:
            required[S.VISION_BLOCK.format(bid=bid, part=part, kind="weight")] = (d, d)
        # Files from llama.cpp's older converter name the two FFN layers the other way round; clip.cpp swaps
        # them back by shape, so either orientation is fine.
        up, down = (S.VISION_BLOCK.format(bid=bid, part=p, kind="weight") for p in (S.FFN_UP, S.FFN_DOWN))
        swapped = down in info.tensors and tuple(info.tensors[down].dims) == (d, ff)
        required[up], required[down] = ((ff, d), (d, ff)) if swapped else ((d, ff), (ff, d))
    for name, shape in required.items():
        t = info.tensors.get(name)
        if t is None:
            raise info.fail(f"tensor {name} is missing")
        if tuple(t.dims) != shape or min(shape) <= 0:
            raise info.fail(f"tensor {name} has shape {list(t.dims)}, the file's keys imply {list(shape)}")
    return info.tensors[mm2 if mm2 in info.tensors else mm0].rows


def _check_mllama_mmproj(info: GGUFInfo) -> int:
    """Check the keys llama3v's mllama encoder reads; return its output width."""
    for key, vtype in MLLAMA_MMPROJ_KEYS.items():
        if info.kv.get(key, (None,))[0] != vtype:
            raise info.fail(f"key {key} missing or not a {vtype.name}")
    return int(info.get(S.PROJECTION_DIM))


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
