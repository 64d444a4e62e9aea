"""Build small deterministic random-weight LLaVA-Llama-3 checkpoints, in every layout llama3v reads.

Tests and the demo build their models here (model hubs are unreachable offline). The weights are
random but the architecture is real: a CLIP or SigLIP tower, an MLP or linear projector, a Llama-3
decoder with GQA and optional llama3 rope scaling, and a byte-level BPE tokenizer. Layouts:
  hf-4.45    llava-hf as transformers 4.45 saved it (vision_tower.vision_model.*, rope_theta)
  hf-4.52    llava-hf with model.* prefixes (model.vision_tower.vision_model.*, model.language_model.*)
  hf-5       llava-hf as transformers 5.x saves it (vision_tower.*, rope_parameters)
  original   LLaVA / xtuner (model.mm_projector.*, tower weights inside, its config in a side directory)
  original-separate   the same with the tower's weights only in the side directory
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llama3v.hf.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from llama3v.progress import Progress
from llama3v.testing.bpe import Tokenizer, llama3_tokenizer, train_tiny

LAYOUTS = ("hf-4.45", "hf-4.52", "hf-5", "original", "original-separate")
IMAGE_TOKEN = "<image>"
TOWER_DIR = "vision_tower"


@dataclass
class TinySpec:
    """Shapes and knobs of a built checkpoint (defaults: small, odd widths, GQA, CLIP with class token)."""

    vision: str = "clip"  # clip | siglip
    vision_hidden: int = 48
    vision_heads: int = 3
    vision_layers: int = 3
    vision_ff: int = 80
    image_size: int = 56
    patch_size: int = 14
    vision_act: str | None = None  # default: quick_gelu (CLIP), gelu_pytorch_tanh (SigLIP)
    feature_layer: int = -2
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    text_hidden: int = 72
    text_heads: int = 6
    text_kv_heads: int = 2
    text_layers: int = 2
    text_ff: int = 160
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"factor": 8.0, "original_max_position_embeddings": 64}
    max_position_embeddings: int = 4096
    tied: bool = False
    vocab: str = "tiny"  # tiny | llama3
    preprocess_pad: bool = False
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT: (height, width) grids
    s2_scales: tuple[int, ...] | None = None  # Bunny v1.1's S2 tower (original layouts): image sizes
    seed: int = 0
    weight_scale: float = 1.0
    extra: dict = field(default_factory=dict)


def build_weights(spec: TinySpec, n_vocab: int) -> dict[str, np.ndarray]:
    """Random float32 weights under canonical names (see llama3v/hf/key_formats.py)."""
    rng = np.random.default_rng(spec.seed)
    s = spec.weight_scale

    def lin(out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * gain * s / np.sqrt(in_dim)).astype(np.float32)

    def vec(n: int, center: float = 0.0, spread: float = 0.1) -> np.ndarray:
        return (center + spread * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    d, p, clip = spec.vision_hidden, spec.patch_size, spec.vision == "clip"
    n_pos = (spec.image_size // p) ** 2 + (1 if clip else 0)
    w["vision.embeddings.patch_embedding.weight"] = (
        rng.standard_normal((d, 3, p, p)) * 2.0 / np.sqrt(3 * p * p)).astype(np.float32)
    w["vision.embeddings.position_embedding.weight"] = vec(n_pos * d, spread=0.5).reshape(n_pos, d)
    if clip:
        w["vision.embeddings.class_embedding"] = vec(d, spread=1.0)
        w["vision.pre_layrnorm.weight"], w["vision.pre_layrnorm.bias"] = vec(d, 1.0), vec(d)
    else:
        w["vision.embeddings.patch_embedding.bias"] = vec(d)
    for i in range(spec.vision_layers):
        pre = f"vision.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[pre + f"self_attn.{name}.weight"] = lin(d, d, 1.5 if name in ("q_proj", "k_proj") else 1.0)
            w[pre + f"self_attn.{name}.bias"] = vec(d)
        for name in ("layer_norm1", "layer_norm2"):
            w[pre + f"{name}.weight"], w[pre + f"{name}.bias"] = vec(d, 1.0), vec(d)
        w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"] = lin(spec.vision_ff, d, 2.0), vec(spec.vision_ff)
        w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"] = lin(d, spec.vision_ff), vec(d)
    w["vision.post_layernorm.weight"], w["vision.post_layernorm.bias"] = vec(d, 1.0), vec(d)

    h = spec.text_hidden
    w["projector.linear_1.weight"] = lin(h, d * len(spec.s2_scales or (0,)), 1.0)
    w["projector.linear_1.bias"] = vec(h)
    if spec.projector == "mlp2x_gelu":
        w["projector.linear_2.weight"], w["projector.linear_2.bias"] = lin(h, h, 1.5), vec(h)

    head_dim = h // spec.text_heads
    kv = spec.text_kv_heads * head_dim
    w["text.embed_tokens.weight"] = (rng.standard_normal((n_vocab, h)) * s).astype(np.float32)
    for i in range(spec.text_layers):
        pre = f"text.layers.{i}."
        w[pre + "input_layernorm.weight"] = vec(h, 1.0)
        w[pre + "post_attention_layernorm.weight"] = vec(h, 1.0)
        w[pre + "self_attn.q_proj.weight"] = lin(h, h, 2.0)
        w[pre + "self_attn.k_proj.weight"] = lin(kv, h, 2.0)
        w[pre + "self_attn.v_proj.weight"] = lin(kv, h)
        w[pre + "self_attn.o_proj.weight"] = lin(h, h)
        w[pre + "mlp.gate_proj.weight"] = lin(spec.text_ff, h, 1.5)
        w[pre + "mlp.up_proj.weight"] = lin(spec.text_ff, h)
        w[pre + "mlp.down_proj.weight"] = lin(h, spec.text_ff)
    w["text.norm.weight"] = vec(h, 1.0)
    if not spec.tied:
        w["lm_head.weight"] = lin(n_vocab, h, 4.0)
    if spec.grid_pinpoints:
        w["image_newline"] = vec(h, spread=1.0)
    return w


# canonical prefix -> checkpoint prefix, per layout
_PREFIXES = {
    "hf-4.45": {"vision.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.",
                "text.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                "image_newline": "image_newline"},
    "hf-4.52": {"vision.": "model.vision_tower.vision_model.", "projector.": "model.multi_modal_projector.",
                "text.": "model.language_model.", "lm_head.": "lm_head.", "image_newline": "model.image_newline"},
    "hf-5": {"vision.": "vision_tower.", "projector.": "multi_modal_projector.",
             "text.": "language_model.model.", "lm_head.": "language_model.lm_head.", "image_newline": "image_newline"},
    "original": {"vision.": "model.vision_tower.vision_tower.vision_model.",
                 "projector.linear_1.": "model.mm_projector.0.", "projector.linear_2.": "model.mm_projector.2.",
                 "text.": "model.", "lm_head.": "lm_head.", "image_newline": "model.image_newline"},
}


def checkpoint_name(canonical: str, layout: str, projector: str) -> str:
    """The name a canonical tensor has in a given layout."""
    prefixes = _PREFIXES["original" if layout.startswith("original") else layout]
    if layout.startswith("original") and projector == "linear" and canonical.startswith("projector.linear_1."):
        return "model.mm_projector." + canonical.rsplit(".", 1)[1]
    for canon, real in prefixes.items():
        if canonical.startswith(canon):
            return real + canonical[len(canon):]
    raise KeyError(canonical)


def make_checkpoint(out: str | Path, spec: TinySpec | None = None, layout: str = "hf-5", dtype: str = "f32",
                    shards: int = 1, fmt: str = "safetensors", tokenizer: Tokenizer | None = None,
                    progress: Progress | None = None) -> Path:
    """Write a checkpoint directory for `spec` in `layout`; returns its path."""
    spec = spec or TinySpec()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = progress or (lambda *_: None)
    step("building checkpoint", 0, 3)
    tok = tokenizer or (llama3_tokenizer() if spec.vocab == "llama3" else train_tiny())
    step("building checkpoint", 1, 3)
    hf = layout.startswith("hf")
    # Every layout gets the same vocabulary: llava-hf's image token is appended for all of them.
    image_token_index = tok.vocab_size
    n_vocab = tok.vocab_size + 1
    weights = build_weights(spec, n_vocab)

    main, tower = {}, {}
    for canon, arr in weights.items():
        if layout == "original-separate" and canon.startswith("vision."):
            tower["vision_model." + canon[len("vision."):]] = arr
        elif not (layout.startswith("original") and canon.startswith("vision.post_layernorm")):
            main[checkpoint_name(canon, layout, spec.projector)] = arr
    _write_weights(out, main, dtype, shards, fmt)
    step("building checkpoint", 2, 3)
    tok.write(out, {IMAGE_TOKEN: image_token_index})
    preprocessor = _preprocessor_config(spec)
    pinpoints = [list(p) for p in spec.grid_pinpoints or ()]
    if pinpoints:
        preprocessor.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=pinpoints,
                            do_pad=True)

    vision_cfg = _vision_config(spec)
    text_cfg = _text_config(spec, n_vocab, rope_parameters=layout == "hf-5")
    if hf:
        config = {
            "architectures": ["LlavaNextForConditionalGeneration" if pinpoints else "LlavaForConditionalGeneration"],
            "model_type": "llava_next" if pinpoints else "llava",
            "vision_config": vision_cfg, "text_config": text_cfg, "image_token_index": image_token_index,
            "projector_hidden_act": "gelu", "vision_feature_layer": spec.feature_layer,
            "vision_feature_select_strategy": "default" if spec.vision == "clip" else "full",
            "image_seq_length": (spec.image_size // spec.patch_size) ** 2,
            "tie_word_embeddings": spec.tied, "multimodal_projector_bias": True,
        }
        if pinpoints:
            config["image_grid_pinpoints"] = pinpoints
        _write_json(out / "preprocessor_config.json", preprocessor)
    else:
        config = {
            "architectures": ["LlavaLlamaForCausalLM"], **text_cfg, "model_type": "llava_llama",
            "mm_vision_tower": TOWER_DIR, "mm_hidden_size": spec.vision_hidden,
            "mm_projector_type": spec.projector, "mm_vision_select_layer": spec.feature_layer,
            "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad" if spec.preprocess_pad else "square",
        }
        if pinpoints:
            config.update(image_aspect_ratio="anyres", image_grid_pinpoints=pinpoints,
                          mm_patch_merge_type="spatial_unpad")
        if spec.s2_scales:
            config.update(use_s2=True, s2_scales=",".join(map(str, spec.s2_scales)),
                          mm_hidden_size=spec.vision_hidden * len(spec.s2_scales))
        tower_dir = out / TOWER_DIR
        tower_dir.mkdir(exist_ok=True)
        _write_json(tower_dir / "config.json", vision_cfg)
        _write_json(tower_dir / "preprocessor_config.json", preprocessor)
        if tower:
            _write_weights(tower_dir, tower, dtype, 1, fmt)
    config.update(spec.extra)
    _write_json(out / "config.json", config)
    _write_json(out / "llama3v_spec.json", asdict(spec))
    step("building checkpoint", 3, 3)
    return out


def _vision_config(spec: TinySpec) -> dict:
    clip = spec.vision == "clip"
    return {
        "model_type": "clip_vision_model" if clip else "siglip_vision_model",
        "hidden_size": spec.vision_hidden, "intermediate_size": spec.vision_ff,
        "num_hidden_layers": spec.vision_layers, "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size, "patch_size": spec.patch_size, "num_channels": 3,
        "hidden_act": spec.vision_act or ("quick_gelu" if clip else "gelu_pytorch_tanh"),
        "layer_norm_eps": 1e-5 if clip else 1e-6, "projection_dim": spec.text_hidden,
    }


def _text_config(spec: TinySpec, n_vocab: int, rope_parameters: bool) -> dict:
    cfg = {
        "model_type": "llama", "hidden_size": spec.text_hidden, "intermediate_size": spec.text_ff,
        "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads, "vocab_size": n_vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "head_dim": spec.text_hidden // spec.text_heads,
    }
    scaling = None
    if spec.rope_scaling:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, **spec.rope_scaling}
    if rope_parameters:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta, **(scaling or {})}
    else:
        cfg["rope_theta"] = spec.rope_theta
        cfg["rope_scaling"] = scaling
    return cfg


def _preprocessor_config(spec: TinySpec) -> dict:
    n = spec.image_size
    if spec.vision == "clip":
        return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": n},
                "crop_size": {"height": n, "width": n}, "do_center_crop": True, "do_pad": spec.preprocess_pad,
                "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "resample": 3}
    return {"image_processor_type": "SiglipImageProcessor", "size": {"height": n, "width": n},
            "do_pad": spec.preprocess_pad, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
            "resample": 3}


def _write_weights(out: Path, tensors: dict[str, np.ndarray], dtype: str, shards: int, fmt: str) -> None:
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    weight_map = {}
    for fname, group in zip(files, groups, strict=True):
        part = {n: tensors[n] for n in group}
        if fmt == "safetensors":
            write_safetensors(out / fname, part, dtype)
        else:
            _write_bin(out / fname, part, dtype)
        weight_map.update({n: fname for n in group})
    if shards > 1:
        _write_json(out / f"{stem}.{ext}.index.json", {"metadata": {}, "weight_map": weight_map})


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write a safetensors file in f32, f16 or bf16 (bf16 rounded to nearest even)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw, tag = _encode(arr, dtype)
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)


def _encode(arr: np.ndarray, dtype: str) -> tuple[bytes, str]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "f32":
        return arr.tobytes(), "F32"
    if dtype == "f16":
        return arr.astype(np.float16).tobytes(), "F16"
    if dtype == "bf16":
        bits = arr.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return rounded.tobytes(), "BF16"
    raise ValueError(f"unknown dtype {dtype!r}")


def _write_bin(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    import torch

    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.save({n: torch.from_numpy(np.ascontiguousarray(a)).to(torch_dtype) for n, a in tensors.items()}, path)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
