"""Build tiny random Llama-3.2-Vision (MllamaForConditionalGeneration) checkpoints with transformers.

The checkpoints are transformers' own (its MllamaForConditionalGeneration saves them), with weights
re-drawn at scales that make every part matter: non-zero tanh gates, tile and position tables
large enough to change the output, logits spread over several units. The byte-level BPE is the
factory's tiny trained one with `<|image|>` = vocab_size, as in Meta's checkpoints. Layouts:
  hf-5      as transformers 5.x saves it: the original key names (vision_model.*,
            multi_modal_projector.*, language_model.model.*, language_model.lm_head.*) and
            `rope_parameters`
  hf-4.45   the same keys with `rope_theta` / `rope_scaling`, as transformers 4.45 saved it
  hf-4.52   `model.vision_model.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
            `lm_head.*` (the names of transformers' refactored classes since 4.52, which some
            checkpoints store) with `rope_theta` / `rope_scaling`
transformers is a test-only dependency: it is imported when a checkpoint is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama3v.converters.checkpoint import open_checkpoint
from llama3v.converters.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llama3v.mllama_format import IMAGE_TOKEN, aspect_ratios
from llama3v.models.bpe import train_tiny
from llama3v.models.factory import write_safetensors

LAYOUTS = ("hf-5", "hf-4.45", "hf-4.52")
# The original prefix -> the module path of transformers' refactored classes (4.52+).
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
    extra: dict = field(default_factory=dict)


def _hf_config(spec: TinyMllamaSpec, vocab: int):
    import transformers

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, **spec.rope_scaling}
    vision = dict(
        hidden_size=spec.vision_hidden, attention_heads=spec.vision_heads, num_hidden_layers=spec.vision_layers,
        num_global_layers=spec.global_layers, intermediate_size=spec.vision_ff, image_size=spec.image_size,
        patch_size=spec.patch_size, max_num_tiles=spec.max_tiles, hidden_act=spec.vision_act,
        intermediate_layers_indices=list(spec.intermediate_layers),
        supported_aspect_ratios=[list(r) for r in aspect_ratios(spec.max_tiles)],
        vision_output_dim=spec.vision_hidden * (1 + len(spec.intermediate_layers)))
    text = dict(
        hidden_size=spec.text_hidden, num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
        num_hidden_layers=spec.text_layers, intermediate_size=spec.text_ff, vocab_size=vocab,
        cross_attention_layers=list(spec.cross_layers), rope_parameters=rope, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=vocab - 5, eos_token_id=vocab - 4, pad_token_id=None)
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab)


def randomize(model, spec: TinyMllamaSpec) -> None:
    """Re-draw every weight: O(1) activations, non-zero gates, tile and position tables that matter."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "gate" in name and p.numel() == 1:
                p.copy_(spec.gate + 0.3 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name and "patch" not in name:
                p.copy_(0.5 * noise)  # class, position, tile and token tables
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * 1.5 / math.sqrt(p[0].numel()))


def make_mllama_checkpoint(out: str | Path, spec: TinyMllamaSpec | None = None, layout: str = "hf-5") -> Path:
    """Build, randomise and save a tiny MllamaForConditionalGeneration in `layout`; returns the directory."""
    import torch
    import transformers

    spec = spec or TinyMllamaSpec()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    tok = train_tiny()
    vocab = tok.vocab_size
    torch.manual_seed(spec.seed)
    model = transformers.MllamaForConditionalGeneration(_hf_config(spec, vocab)).eval()
    randomize(model, spec)
    model.save_pretrained(out)
    tok.write(out, {IMAGE_TOKEN: vocab})
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
        "do_pad": True, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "max_image_tiles": spec.max_tiles,
        "size": {"height": spec.image_size, "width": spec.image_size}})
    if layout != "hf-5":
        _to_4x(out, rename=layout == "hf-4.52")
    _write_json(out / "llama3v_spec.json", asdict(spec))
    return out


def _to_4x(out: Path, rename: bool) -> None:
    """Rewrite a 5.x checkpoint as transformers 4.x saved it: rope_theta / rope_scaling, 4.52's prefixes if `rename`."""
    if rename:
        ckpt = open_checkpoint(out)
        tensors = {}
        for name in ckpt.shapes:
            new = next((cur + name[len(old):] for old, cur in _PREFIXES_452 if name.startswith(old)), name)
            tensors[new] = ckpt.get(name)
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        write_safetensors(out / "model.safetensors", tensors, "f32")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    config["transformers_version"] = "4.52.0" if rename else "4.45.0"
    _write_json(out / "config.json", config)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
