"""Detect a libmtmd with the upstream LLaVA class-token bug (llama.cpp #25814) before trusting it.

The probe is a few-kilobyte mmproj whose output is known in closed form: one encoder block with
zero weights (an identity), identity projector matrices, so each output row is
gelu(patch_embedding + position_embedding). A fixed graph puts the class token first and gives
patch p the position p + 1; the unpatched graph appends it last, so every patch takes its
neighbour's position and the last row is the class token. The decision compares libmtmd's output
with both predictions. The encoder runs the probe (runtime/encoder.py: engine_verdict); this module
holds the probe and the decision, and imports no part of the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from llama3v import gguf_schema as S

SKIP_ENV = "LLAMA3V_SKIP_ENGINE_CHECK"  # lets a developer measure a stock build on purpose
FIXED, UNPATCHED, UNEXPECTED = "fixed", "unpatched", "unexpected"
_SIZE, _PATCH, _EMBD, _FF = 4, 2, 8, 16
_TOLERANCE = 0.05  # ggml's fp16 gelu table is off by ~1e-3; the two hypotheses differ by > 0.1

INSTALL_HINT = (
    "this llama-cpp-python build computes wrong embeddings for CLIP towers with a class token "
    "(upstream llama.cpp issue #25814): install llama3v's patched engine with `make setup` in a llama3v "
    "checkout (or `scripts/build_engine.sh` and `pip install --force-reinstall` the wheel it prints); "
    "see README.md, section 'The engine'"
)


def _probe_weights() -> dict[str, np.ndarray]:
    n_pos = (_SIZE // _PATCH) ** 2 + 1
    conv = np.zeros((_EMBD, 3, _PATCH, _PATCH), np.float32)
    for h in range(_EMBD):  # each hidden unit reads one pixel value of the patch
        c, r = divmod(h, _PATCH * _PATCH)
        conv[h, c % 3, r // _PATCH, r % _PATCH] = 1.0
    return {
        S.PATCH_EMBD: conv,
        S.CLASS_EMBD: np.linspace(1.5, 2.5, _EMBD, dtype=np.float32),
        S.POSITION_EMBD: (0.5 + 0.3 * np.arange(n_pos)[:, None] + 0.01 * np.arange(_EMBD)).astype(np.float32),
    }


def probe_pixels() -> np.ndarray:
    """The probe's input image: distinct values in every pixel and channel."""
    return (np.arange(_SIZE * _SIZE * 3, dtype=np.uint8).reshape(_SIZE, _SIZE, 3) * 5)


def predictions() -> tuple[np.ndarray, np.ndarray]:
    """Expected probe output of a fixed graph and of the unpatched one, [n_patches, embd] each."""
    w = _probe_weights()
    x = probe_pixels().astype(np.float32) / 255.0
    g = _SIZE // _PATCH
    patches = x.reshape(g, _PATCH, g, _PATCH, 3).transpose(0, 2, 4, 1, 3).reshape(g * g, 3, _PATCH, _PATCH)
    embd = np.einsum("ncij,hcij->nh", patches, w[S.PATCH_EMBD])
    pos = w[S.POSITION_EMBD]
    fixed = embd + pos[1:]
    buggy = np.concatenate([embd[1:], w[S.CLASS_EMBD][None]]) + pos[1:]
    return _gelu(fixed), _gelu(buggy)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def classify(output: np.ndarray, fixed: np.ndarray, buggy: np.ndarray) -> str:
    """Decide which graph produced `output`: FIXED, UNPATCHED or UNEXPECTED (neither)."""
    if output.shape != fixed.shape or not np.all(np.isfinite(output)):
        return UNEXPECTED
    if np.max(np.abs(output - fixed)) < _TOLERANCE:
        return FIXED
    if np.max(np.abs(output - buggy)) < _TOLERANCE:
        return UNPATCHED
    return UNEXPECTED


def write_probe(path: Path) -> None:
    """Write the probe mmproj."""
    w = GGUFWriter(path, S.CLIP_ARCH)
    w.add_bool(S.HAS_VISION_ENCODER, True)
    w.add_string(S.PROJECTOR_TYPE, S.PROJECTOR_MLP)
    w.add_bool(S.USE_GELU, False)
    w.add_bool(S.USE_SILU, False)
    for key, value in ((S.IMAGE_SIZE, _SIZE), (S.PATCH_SIZE, _PATCH), (S.EMBEDDING_LENGTH, _EMBD),
                       (S.FEED_FORWARD_LENGTH, _FF), (S.BLOCK_COUNT, 1), (S.PROJECTION_DIM, _EMBD),
                       (S.HEAD_COUNT, 1)):
        w.add_uint32(key, value)
    w.add_float32(S.LAYER_NORM_EPS, 1e-5)
    w.add_array(S.IMAGE_MEAN, [0.0, 0.0, 0.0])
    w.add_array(S.IMAGE_STD, [1.0, 1.0, 1.0])
    w.add_array(S.FEATURE_LAYER, [1])
    for name, value in _probe_weights().items():
        w.add_tensor(name, value)
    zeros = {**{part: (_EMBD, _EMBD) for part in S.VISION_ATTN_PARTS}, S.FFN_UP: (_FF, _EMBD), S.FFN_DOWN: (_EMBD, _FF)}
    for part, shape in zeros.items():
        w.add_tensor(S.VISION_BLOCK.format(bid=0, part=part, kind="weight"), np.zeros(shape, np.float32))
        w.add_tensor(S.VISION_BLOCK.format(bid=0, part=part, kind="bias"), np.zeros(shape[0], np.float32))
    for part in (S.LN1, S.LN2):
        w.add_tensor(S.VISION_BLOCK.format(bid=0, part=part, kind="weight"), np.ones(_EMBD, np.float32))
        w.add_tensor(S.VISION_BLOCK.format(bid=0, part=part, kind="bias"), np.zeros(_EMBD, np.float32))
    for idx in (0, 2):
        w.add_tensor(S.PROJ_LAYER.format(idx=idx, kind="weight"), np.eye(_EMBD, dtype=np.float32))
        w.add_tensor(S.PROJ_LAYER.format(idx=idx, kind="bias"), np.zeros(_EMBD, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
