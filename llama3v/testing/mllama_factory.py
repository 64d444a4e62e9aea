"""Build tiny random Llama-3.2-Vision (MllamaForConditionalGeneration) checkpoints in Hugging Face's format.

The checkpoint is written here with numpy, like the LLaVA factory's (transformers is only the tests'
oracle): config.json as transformers writes an MllamaConfig (`vision_config.attention_heads`,
`cross_attention_layers`, `supported_aspect_ratios`), every tensor of MllamaForConditionalGeneration
under its saved name (`embed_tokens` with vocab_size + 8 rows), preprocessor_config.json for
MllamaImageProcessor, and the factory's tiny trained BPE with `<|image|>` = vocab_size, as in Meta's
checkpoints. The tests load each checkpoint with transformers and require every parameter to come
from the file. Weights are drawn so that every part matters: non-zero tanh gates, tile and position
tables large enough to change the output, logits spread over several units. Layouts:
  hf-5      as transformers 5.x saves it: vision_model.*, multi_modal_projector.*,
            language_model.model.*, language_model.lm_head.*, and `rope_parameters`
  hf-4.45   the same keys with `rope_theta` / `rope_scaling`, as transformers 4.45 saved it
  hf-4.52   model.vision_model.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*
            (the module paths of transformers' refactored classes since 4.52, which some checkpoints
            store), with `rope_theta` / `rope_scaling`
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llama3v.hf.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llama3v.mllama_format import IMAGE_TOKEN, aspect_ratios
from llama3v.testing.bpe import train_tiny
from llama3v.testing.factory import write_safetensors

LAYOUTS = ("hf-5", "hf-4.45", "hf-4.52")
# The saved prefix -> the module path of transformers' refactored classes (4.52+).
_PREFIXES_452 = (("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."),
                 ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


@dataclass
class TinyMllamaSpec:
    """Shapes of a tiny mllama (defaults: 17 positions per tile padded to 24, GQA, two cross-attention layers)."""

    vision_hidden: int = 40
    vision_heads: int = 2
    vision_layers: int = 4
    global_layers: int = 2
    vision_ff: int = 72
    intermediate_layers: tuple[int, ...] = (1, 3)
    image_size: int = 28
    patch_size: int = 7
    max_tiles: int = 4
    vision_act: str = "gelu"
    text_hidden: int = 48
    text_heads: int = 4
    text_kv_heads: int = 2
    text_layers: int = 4
    text_ff: int = 88
    cross_layers: tuple[int, ...] = (1, 3)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 fields, e.g. {"factor": 8.0, "original_max_position_embeddings": 32}
    seed: int = 0
    gate: float = 0.9  # tanh gates are drawn around this value, so the image visibly matters
    extra: dict = field(default_factory=dict)  # merged into config.json


def shapes(spec: TinyMllamaSpec, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of MllamaForConditionalGeneration under its saved name (hf-5 layout), with its shape."""
    d, f, hd = spec.vision_hidden, spec.vision_ff, spec.text_hidden // spec.text_heads
    n_pos, t = (spec.image_size // spec.patch_size) ** 2 + 1, spec.max_tiles
    n_ids = len(aspect_ratios(t)) + 1  # id 0 is padding
    v = "vision_model."
    out: dict[str, tuple[int, ...]] = {
        v + "patch_embedding.weight": (d, 3, spec.patch_size, spec.patch_size),
        v + "class_embedding": (d,),
        v + "gated_positional_embedding.embedding": (n_pos, d),
        v + "gated_positional_embedding.gate": (1,),
        v + "gated_positional_embedding.tile_embedding.weight": (n_ids, t * n_pos * d),
        v + "layernorm_pre.weight": (d,), v + "layernorm_pre.bias": (d,),
        v + "layernorm_post.weight": (d,), v + "layernorm_post.bias": (d,),
        "multi_modal_projector.weight": (spec.text_hidden, d * (1 + len(spec.intermediate_layers))),
        "multi_modal_projector.bias": (spec.text_hidden,),
    }
    for when in ("pre", "post"):
        out[f"{v}{when}_tile_positional_embedding.embedding.weight"] = (n_ids, t * d)
        out[f"{v}{when}_tile_positional_embedding.gate"] = (1,)
    for group, n in (("transformer", spec.vision_layers), ("global_transformer", spec.global_layers)):
        for i in range(n):
            p = f"{v}{group}.layers.{i}."
            out |= {p + f"self_attn.{x}_proj.weight": (d, d) for x in "qkvo"}
            out |= {p + f"{norm}.{k}": (d,) for norm in ("input_layernorm", "post_attention_layernorm")
                    for k in ("weight", "bias")}
            out |= {p + "mlp.fc1.weight": (f, d), p + "mlp.fc1.bias": (f,), p + "mlp.fc2.weight": (d, f),
                    p + "mlp.fc2.bias": (d,)}
            if group == "global_transformer":
                out |= {p + "gate_attn": (1,), p + "gate_ffn": (1,)}
    h, kv, ff = spec.text_hidden, spec.text_kv_heads * hd, spec.text_ff
    lm = "language_model.model."
    out |= {lm + "embed_tokens.weight": (vocab + 8, h), lm + "norm.weight": (h,),
            "language_model.lm_head.weight": (vocab, h)}
    for i in range(spec.text_layers):
        p = f"{lm}layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff)}
        attn = "cross_attn." if i in spec.cross_layers else "self_attn."
        out |= {p + attn + "q_proj.weight": (h, h), p + attn + "k_proj.weight": (kv, h),
                p + attn + "v_proj.weight": (kv, h), p + attn + "o_proj.weight": (h, h)}
        if i in spec.cross_layers:
            out |= {p + "cross_attn.q_norm.weight": (hd,), p + "cross_attn.k_norm.weight": (hd,),
                    p + "cross_attn_attn_gate": (1,), p + "cross_attn_mlp_gate": (1,)}
    return out


def _draw(name: str, shape: tuple[int, ...], rng: np.random.Generator, spec: TinyMllamaSpec) -> np.ndarray:
    """O(1) activations, non-zero gates, tile and position tables that matter."""
    noise = rng.standard_normal(shape)
    if "gate" in name and shape == (1,):
        return spec.gate + 0.3 * noise
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * noise
    if "embedding" in name and "patch" not in name:
        return 0.5 * noise  # class, position and tile tables
    if len(shape) == 1:
        return 0.2 * noise
    return noise * 1.5 / math.sqrt(math.prod(shape[1:]))


def _config(spec: TinyMllamaSpec, vocab: int, layout: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, **spec.rope_scaling}
    text = {
        "model_type": "mllama_text_model", "hidden_size": spec.text_hidden, "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads, "num_hidden_layers": spec.text_layers,
        "intermediate_size": spec.text_ff, "vocab_size": vocab, "cross_attention_layers": list(spec.cross_layers),
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": vocab - 5, "eos_token_id": vocab - 4, "pad_token_id": None}
    if layout == "hf-5":
        text["rope_parameters"] = rope
    else:
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    vision = {
        "model_type": "mllama_vision_model", "hidden_size": spec.vision_hidden, "attention_heads": spec.vision_heads,
        "num_hidden_layers": spec.vision_layers, "num_global_layers": spec.global_layers,
        "intermediate_size": spec.vision_ff, "image_size": spec.image_size, "patch_size": spec.patch_size,
        "max_num_tiles": spec.max_tiles, "hidden_act": spec.vision_act, "norm_eps": 1e-5, "num_channels": 3,
        "intermediate_layers_indices": list(spec.intermediate_layers),
        "supported_aspect_ratios": [list(r) for r in aspect_ratios(spec.max_tiles)],
        "vision_output_dim": spec.vision_hidden * (1 + len(spec.intermediate_layers))}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": vocab,
            "tie_word_embeddings": False, "vision_config": vision, "text_config": text,
            "transformers_version": {"hf-5": "5.0.0", "hf-4.45": "4.45.0", "hf-4.52": "4.52.0"}[layout], **spec.extra}


def make_mllama_checkpoint(out: str | Path, spec: TinyMllamaSpec | None = None, layout: str = "hf-5") -> Path:
    """Write a tiny mllama checkpoint directory for `spec` in `layout`; returns its path."""
    spec = spec or TinyMllamaSpec()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny()
    vocab = tok.vocab_size
    rng = np.random.default_rng(spec.seed)
    tensors = {}
    for name, shape in shapes(spec, vocab).items():
        if layout == "hf-4.52":
            name = next(new + name[len(old):] for old, new in _PREFIXES_452 if name.startswith(old))
        tensors[name] = _draw(name, shape, rng, spec).astype(np.float32)
    write_safetensors(out / "model.safetensors", tensors, "f32")
    tok.write(out, {IMAGE_TOKEN: vocab})
    _write_json(out / "config.json", _config(spec, vocab, layout))
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_pad": True, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "max_image_tiles": spec.max_tiles,
        "size": {"height": spec.image_size, "width": spec.image_size}})
    _write_json(out / "llama3v_spec.json", asdict(spec))
    return out


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
