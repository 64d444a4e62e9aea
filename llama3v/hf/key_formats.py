"""Recognise the key formats LLaVA checkpoints are saved in and present one canonical view of them.

Canonical tensor names are HF's module names below a fixed root:
  vision.*     the CLIP/SigLIP vision transformer (embeddings, pre_layrnorm, encoder.layers.N...)
  projector.*  linear_1 (and linear_2 for an MLP projector)
  text.*       the Llama decoder (embed_tokens, layers.N..., norm); lm_head.weight
Key formats covered: llava-hf as saved by transformers 4.x (`vision_tower.vision_model.*`,
`language_model.model.*`) and 5.x (`vision_tower.*`, `model.language_model.*` or
`language_model.model.*`), and the original LLaVA / xtuner / Bunny format (`model.mm_projector.*`,
`model.vision_tower.vision_tower.vision_model.*`, the tower possibly in its own directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import Checkpoint, open_checkpoint
from llama3v.hf.config import (
    KNOWN_VISION_TOWERS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    S2_DEFAULT_SCALES,
    SIGLIP_MEAN,
    SIGLIP_STD,
    LlavaConfig,
    TextConfig,
    VisionConfig,
    feature_layer_from,
    mapping,
    pinpoints_from,
    s2_scales_from,
    select_strategy_from,
)

# First match wins; a key that matches nothing is not part of the model (CLIP text tower, etc.).
_NAME_RULES = [
    (r"^(?:model\.)?vision_tower\.vision_tower\.vision_model\.", "vision."),
    (r"^(?:model\.)?vision_tower\.vision_model\.", "vision."),
    (r"^(?:model\.)?vision_tower\.", "vision."),
    (r"^vision_model\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.mm_projector\.(weight|bias)$", r"projector.linear_1.\1"),
    (r"^(?:model\.)?image_newline$", "image_newline"),
    (r"^language_model\.model\.", "text."),
    (r"^model\.language_model\.", "text."),
    (r"^(?:language_model\.)?lm_head\.", "lm_head."),
    (r"^model\.", "text."),
]
_RULES = [(re.compile(p), r) for p, r in _NAME_RULES]


def canonical_name(name: str, rules: list[tuple[re.Pattern, str]] = _RULES) -> str | None:
    """Map a checkpoint tensor name to its canonical name by the first rule that matches, or None."""
    for pattern, repl in rules:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return None


@dataclass
class LlavaCheckpoint:
    """A LLaVA checkpoint under canonical tensor names, with its parsed configuration."""

    config: LlavaConfig
    key_format: str  # "llava-hf" or "llava-original"
    main: Checkpoint  # the directory holding config, tokenizer and (most) weights
    _sources: dict[str, tuple[Checkpoint, str]] = field(repr=False)
    name: str = ""  # the model's name in the GGUFs (general.name)

    @property
    def root(self) -> Path:
        """The checkpoint directory."""
        return self.main.root

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def names(self) -> list[str]:
        """All canonical tensor names present."""
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a canonical tensor."""
        ckpt, original = self._source(name)
        return ckpt.shapes[original]

    def get(self, name: str) -> np.ndarray:
        """Read a canonical tensor as float32."""
        ckpt, original = self._source(name)
        return ckpt.get(original)

    def source_dtype(self, name: str) -> str:
        """The dtype the checkpoint stores a tensor in."""
        ckpt, original = self._source(name)
        return ckpt.dtypes[original]

    def _source(self, name: str) -> tuple[Checkpoint, str]:
        if name not in self._sources:
            raise Llama3vError(f"{self.root}: the checkpoint lacks tensor {name!r} ({self.key_format} key format)")
        return self._sources[name]


def load_llava(src: str | Path, vision_tower: str | Path | None = None, name: str | None = None) -> LlavaCheckpoint:
    """Open a LLaVA-style checkpoint directory (and, optionally, a separate vision tower directory); `name`
    (default: the directory's) is the model's name in the GGUFs."""
    main = open_checkpoint(src)
    cfg = main.config
    if "vision_config" in cfg and "text_config" in cfg and cfg.get("model_type", "llava") in ("llava", "llava_next"):
        key_format = "llava-hf"
    elif any(k in cfg for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")):
        key_format = "llava-original"
    else:
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "unknown")
        raise Llama3vError(
            f"{main.root}: unsupported architecture {arch!r}; llama3v converts LLaVA-style checkpoints "
            "(LlavaForConditionalGeneration or the original LLaVA/xtuner/Bunny key format)")

    # A tower directory may hold only its config when the weights are in the main checkpoint.
    tower = open_checkpoint(vision_tower, weights_required=False) if vision_tower else _local_tower(main)
    sources: dict[str, tuple[Checkpoint, str]] = {}
    for ckpt in ([tower] if tower else []) + [main]:  # the main checkpoint wins on overlap
        for name in ckpt.shapes:
            canon = canonical_name(name)
            if canon is not None and not (ckpt is tower and not canon.startswith("vision.")):
                sources[canon] = (ckpt, name)

    if key_format == "llava-hf":
        config = _llava_hf_config(main)
    else:
        config = _original_config(main, tower, sources)
    if config.patch_merge == "spatial_unpad" and "image_newline" not in sources:
        raise Llama3vError(f"{main.root}: a LLaVA-NeXT checkpoint without its image_newline tensor")
    _check_layer_counts(main.root, config, sources)
    return LlavaCheckpoint(config=config, key_format=key_format, main=main, _sources=sources,
                           name=name or main.root.name)


def _check_layer_counts(root: Path, config: LlavaConfig, sources: dict) -> None:
    """The config's layer counts against the layers whose tensors the checkpoint holds, before any planning:
    a crafted count would otherwise size every later step."""
    def layers(prefix: str) -> int:
        found = {int(m.group(1)) for name in sources if (m := re.match(prefix + r"(\d+)\.", name))}
        return max(found) + 1 if found else 0

    n_text, n_vision = layers(r"text\.layers\."), layers(r"vision\.encoder\.layers\.")
    if config.text.num_hidden_layers != n_text:
        raise Llama3vError(f"{root}: the config says num_hidden_layers {config.text.num_hidden_layers} but the "
                           f"checkpoint holds {n_text} decoder layers")
    if config.n_feature_blocks > n_vision:
        raise Llama3vError(f"{root}: the feature layer needs {config.n_feature_blocks} vision layers but the "
                           f"checkpoint holds {n_vision}")


def _local_tower(main: Checkpoint) -> Checkpoint | None:
    """The separate tower directory an original-format config points at, when it exists locally."""
    ref = main.config.get("mm_vision_tower")
    if not ref:
        return None
    for candidate in (Path(ref), main.root / ref):
        if (candidate / "config.json").is_file():
            return open_checkpoint(candidate, weights_required=False)
    return None


def _llava_hf_config(main: Checkpoint) -> LlavaConfig:
    cfg = main.config
    vision = VisionConfig.from_dict(cfg["vision_config"])
    mapping(cfg["text_config"], "text_config")
    # transformers 5.x keeps tie_word_embeddings on the LLaVA config, not always on text_config.
    text = TextConfig.from_dict({**cfg["text_config"], "tie_word_embeddings": bool(
        cfg.get("tie_word_embeddings") or cfg["text_config"].get("tie_word_embeddings"))})
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise Llama3vError(f"projector activation {act!r} is not supported (libmtmd's MLP projector uses gelu)")
    select_strategy_from(cfg.get("vision_feature_select_strategy", "default"), vision)
    proc = main.read_json("preprocessor_config.json") or {}
    next_ = cfg.get("model_type") == "llava_next"
    return LlavaConfig(
        vision=vision,
        text=text,
        projector="mlp2x_gelu",
        vision_feature_layer=feature_layer_from(cfg.get("vision_feature_layer", -2)),
        image_mean=_triple(proc, "image_mean", vision),
        image_std=_triple(proc, "image_std", vision),
        # LLaVA-NeXT's base view is the image squashed to the tower size; its do_pad pads batches.
        preprocess="squash" if next_ else _preprocess_mode(vision, pad=bool(proc.get("do_pad", False))),
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id")),
        grid_pinpoints=pinpoints_from(cfg.get("image_grid_pinpoints"), vision) if next_ else None,
        patch_merge="spatial_unpad" if next_ else "flat",
    )


def _original_config(main: Checkpoint, tower: Checkpoint | None, sources: dict) -> LlavaConfig:
    cfg = main.config
    if "vision_config" in cfg:
        vision = VisionConfig.from_dict(cfg["vision_config"])
    elif tower is not None:
        vision = VisionConfig.from_dict(tower.config)
    elif cfg.get("mm_vision_tower") in KNOWN_VISION_TOWERS:
        vision = VisionConfig.from_dict(KNOWN_VISION_TOWERS[cfg["mm_vision_tower"]])
    else:
        raise Llama3vError(
            f"{main.root}: the vision tower {cfg.get('mm_vision_tower')!r} is neither in the checkpoint's "
            "config nor a local directory; pass its directory with --vision-tower")
    s2 = s2_scales_from(cfg.get("s2_scales", S2_DEFAULT_SCALES), vision) if cfg.get("use_s2") else None
    if s2 and vision.is_clip:
        raise Llama3vError("S2 (use_s2) is only defined for SigLIP towers (Bunny's SiglipVisionTowerS2)")
    hidden = cfg.get("mm_hidden_size")
    if hidden is not None and int(hidden) != vision.hidden_size * len(s2 or (0,)):
        raise Llama3vError(
            f"mm_hidden_size {hidden} does not match the vision tower's hidden_size {vision.hidden_size}"
            + (f" times {len(s2)} scales" if s2 else ""))
    kind = cfg.get("mm_projector_type", "linear")
    if kind not in ("linear", "mlp2x_gelu"):
        raise Llama3vError(f"projector type {kind!r} is not supported (linear or mlp2x_gelu)")
    select_strategy_from(cfg.get("mm_vision_select_feature", "patch"), vision)
    proc = (tower.read_json("preprocessor_config.json") if tower else None) or \
        main.read_json("preprocessor_config.json") or {}
    anyres = str(cfg.get("image_aspect_ratio", "")).startswith("anyres")
    return LlavaConfig(
        vision=vision,
        text=TextConfig.from_dict(cfg),
        projector=kind,
        # LLaVA's training default; Bunny's tower drops its last block, which is the same thing.
        vision_feature_layer=feature_layer_from(cfg.get("mm_vision_select_layer", -2)),
        image_mean=_triple(proc, "image_mean", vision),
        image_std=_triple(proc, "image_std", vision),
        preprocess="squash" if anyres else _preprocess_mode(vision, pad=cfg.get("image_aspect_ratio") == "pad"),
        image_token_index=None,
        grid_pinpoints=pinpoints_from(cfg.get("image_grid_pinpoints"), vision) if anyres else None,
        patch_merge="spatial_unpad" if anyres and "unpad" in cfg.get("mm_patch_merge_type", "") else "flat",
        s2_scales=s2,
    )


def _triple(proc: dict, key: str, vision: VisionConfig) -> tuple[float, float, float]:
    default = {("image_mean", True): OPENAI_CLIP_MEAN, ("image_std", True): OPENAI_CLIP_STD,
               ("image_mean", False): SIGLIP_MEAN, ("image_std", False): SIGLIP_STD}[key, vision.is_clip]
    value = proc.get(key, default)
    if isinstance(value, (int, float)):
        value = [value] * 3
    if len(value) != 3:
        raise Llama3vError(f"preprocessor {key} must have 3 values, got {value}")
    return tuple(float(v) for v in value)


def _preprocess_mode(vision: VisionConfig, pad: bool) -> str:
    if pad:
        return "pad"
    return "resize" if vision.is_clip else "squash"
