"""Write the vision tower and projector of a LLaVA checkpoint as a llama.cpp mmproj GGUF."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from llama3v import gguf_schema as S
from llama3v.converters import tensor_map
from llama3v.errors import Llama3vError
from llama3v.gguf_writer import TensorPlan, write_gguf
from llama3v.hf.config import VISION_ACTIVATIONS
from llama3v.hf.key_formats import LlavaCheckpoint
from llama3v.progress import Progress
from llama3v.quant.storage import encode, file_type, kept_precision, storage_type


def mmproj_plan(ckpt: LlavaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """The mmproj's tensors: the tower cut at the feature layer, then the projector."""
    cfg = ckpt.config
    if cfg.vision.intermediate_size == cfg.vision.hidden_size:
        # clip.cpp swaps ffn_up/ffn_down when ffn_down's input width equals n_embd (a fix for
        # legacy files), which would silently misread this tower.
        raise Llama3vError("vision towers with intermediate_size == hidden_size are misread by libmtmd")
    names = tensor_map.vision_tensors(cfg.vision.is_clip, cfg.n_feature_blocks)
    if cfg.patch_merge == "spatial_unpad":
        names.update(tensor_map.NEXT_ONLY)
    plans = [_plan(ckpt, src, dst, outtype) for src, dst in names.items()]
    return plans + _projector_plans(ckpt, outtype)


def _plan(ckpt: LlavaCheckpoint, src: str, dst: str, outtype: GGMLQuantizationType) -> TensorPlan:
    shape = ckpt.shape(src)  # raises, naming the tensor, when the checkpoint lacks it
    return TensorPlan(dst, shape, storage_type(dst, shape, outtype), lambda: ckpt.get(src))


def _projector_plans(ckpt: LlavaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    cfg = ckpt.config
    n_embd = cfg.text.hidden_size
    if cfg.s2_scales:
        return _s2_plans(ckpt, outtype)
    if cfg.projector == "mlp2x_gelu":
        plans = [_plan(ckpt, src, dst, outtype) for src, dst in tensor_map.PROJECTOR.items()]
        width = plans[2].shape[0]
        if width != n_embd:
            raise Llama3vError(f"projector output width {width} does not match the LLM's hidden size {n_embd}")
        return plans
    # libmtmd's "mlp" graph always applies gelu after mm.0, and has no plain linear projector.
    # gelu(h) - gelu(-h) == h for both the erf and the tanh form, so a linear W x + b becomes
    # mm.0 = [W; -W], [b; -b] and mm.2 = [I, -I]: exact up to ggml's fp16 gelu table.
    w_shape = ckpt.shape("projector.linear_1.weight")
    if w_shape[0] != n_embd:
        raise Llama3vError(f"projector output width {w_shape[0]} does not match the LLM's hidden size {n_embd}")

    def w0() -> np.ndarray:
        w = ckpt.get("projector.linear_1.weight")
        return np.concatenate([w, -w])

    def b0() -> np.ndarray:
        b = ckpt.get("projector.linear_1.bias")
        return np.concatenate([b, -b])

    def w2() -> np.ndarray:
        eye = np.eye(n_embd, dtype=np.float32)
        return np.concatenate([eye, -eye], axis=1)

    specs: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = [
        (S.PROJ_LAYER.format(idx=0, kind="weight"), (2 * n_embd, w_shape[1]), w0),
        (S.PROJ_LAYER.format(idx=0, kind="bias"), (2 * n_embd,), b0),
        (S.PROJ_LAYER.format(idx=2, kind="weight"), (n_embd, 2 * n_embd), w2),
        (S.PROJ_LAYER.format(idx=2, kind="bias"), (n_embd,), lambda: np.zeros(n_embd, np.float32)),
    ]
    return [TensorPlan(name, shape, storage_type(name, shape, outtype), fn) for name, shape, fn in specs]


def _s2_plans(ckpt: LlavaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """S2 (docs/s2.md): libmtmd runs the tower per crop and hands back its features unchanged, through
    mm.0 = [I; -I] and mm.2 = [I, -I] (gelu(h) - gelu(-h) == h); the checkpoint's projector, which needs all
    scales merged first, is stored as s2.mm.* for the runtime."""
    cfg = ckpt.config
    d, n_embd = cfg.vision.hidden_size, cfg.text.hidden_size
    if cfg.projector != "mlp2x_gelu":
        raise Llama3vError(f"S2 checkpoints with a {cfg.projector!r} projector are not supported (mlp2x_gelu)")
    shapes = {0: (n_embd, cfg.projector_in), 2: (n_embd, n_embd)}
    plans = []
    for (src, _), idx in zip(tensor_map.PROJECTOR.items(), (0, 0, 2, 2), strict=True):
        kind = src.rsplit(".", 1)[1]
        plans.append(_plan(ckpt, src, S.S2_PROJ_LAYER.format(idx=idx, kind=kind), outtype))
        want = shapes[idx] if kind == "weight" else shapes[idx][:1]
        if plans[-1].shape != want:
            raise Llama3vError(f"{src} has shape {list(plans[-1].shape)}, expected {list(want)} for "
                               f"{len(cfg.s2_scales)} S2 scales of a {d}-wide tower")
    eye = np.eye(d, dtype=np.float32)
    specs: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = [
        (S.PROJ_LAYER.format(idx=0, kind="weight"), (2 * d, d), lambda: np.concatenate([eye, -eye])),
        (S.PROJ_LAYER.format(idx=0, kind="bias"), (2 * d,), lambda: np.zeros(2 * d, np.float32)),
        (S.PROJ_LAYER.format(idx=2, kind="weight"), (d, 2 * d), lambda: np.concatenate([eye, -eye], axis=1)),
        (S.PROJ_LAYER.format(idx=2, kind="bias"), (d,), lambda: np.zeros(d, np.float32)),
    ]
    # +-1 and 0 are exact in f16 but not in every quantized type: the pass-through stays exact.
    exact = GGMLQuantizationType.F32 if outtype == GGMLQuantizationType.F32 else GGMLQuantizationType.F16
    return plans + [TensorPlan(name, shape, storage_type(name, shape, exact), fn) for name, shape, fn in specs]


def write_mmproj(ckpt: LlavaCheckpoint, path: Path, outtype: GGMLQuantizationType, plans: list[TensorPlan],
                 progress: Progress | None = None) -> None:
    """Write the checkpoint's vision side (`mmproj_plan`'s tensors) as an mmproj GGUF at `path` (atomically)."""
    cfg = ckpt.config
    v = cfg.vision
    use_gelu, use_silu = VISION_ACTIVATIONS[v.hidden_act]
    kept = kept_precision(plans, outtype)

    def metadata(w: GGUFWriter) -> None:
        w.add_name(f"{ckpt.name} vision")
        w.add_file_type(file_type(outtype))
        w.add_bool(S.HAS_VISION_ENCODER, True)
        w.add_string(S.PROJECTOR_TYPE, S.PROJECTOR_MLP)
        w.add_bool(S.USE_GELU, use_gelu)
        w.add_bool(S.USE_SILU, use_silu)
        w.add_uint32(S.IMAGE_SIZE, v.image_size)
        w.add_uint32(S.PATCH_SIZE, v.patch_size)
        w.add_uint32(S.EMBEDDING_LENGTH, v.hidden_size)
        w.add_uint32(S.FEED_FORWARD_LENGTH, v.intermediate_size)
        w.add_uint32(S.BLOCK_COUNT, cfg.n_feature_blocks)
        # With S2 libmtmd's output is the tower's own width; the runtime projects (s2.mm.*).
        w.add_uint32(S.PROJECTION_DIM, v.hidden_size if cfg.s2_scales else cfg.text.hidden_size)
        w.add_uint32(S.HEAD_COUNT, v.num_attention_heads)
        w.add_float32(S.LAYER_NORM_EPS, v.layer_norm_eps)
        w.add_array(S.IMAGE_MEAN, list(cfg.image_mean))
        w.add_array(S.IMAGE_STD, list(cfg.image_std))
        # Written explicitly: without it libmtmd runs block_count - 1 blocks (upstream #25817).
        w.add_array(S.FEATURE_LAYER, [cfg.n_feature_blocks])
        w.add_string(S.PREPROCESS_MODE, cfg.preprocess)
        if cfg.grid_pinpoints:
            # libmtmd reads (width, height) pairs; HF writes (height, width).
            w.add_array(S.GRID_PINPOINTS, [v for h, wd in cfg.grid_pinpoints for v in (wd, h)])
            w.add_string(S.PATCH_MERGE_TYPE, cfg.patch_merge)
        w.add_string(S.PROJECTOR_KIND, cfg.projector)
        w.add_int32(S.SOURCE_FEATURE_LAYER, cfg.vision_feature_layer)
        w.add_array(S.KEPT_PRECISION, kept)
        if cfg.s2_scales:
            w.add_array(S.S2_SCALES, list(cfg.s2_scales))

    write_gguf(path, S.CLIP_ARCH, metadata, plans, encode, progress)
