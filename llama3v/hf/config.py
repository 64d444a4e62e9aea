"""Model configuration as dataclasses whose fields mirror Hugging Face's config keys.

`VisionConfig` mirrors CLIPVisionConfig / SiglipVisionConfig, `TextConfig` mirrors LlamaConfig
(as saved by transformers 4.x and 5.x), `LlavaConfig` the LLaVA wrapper in both the llava-hf and
the original LLaVA / xtuner / Bunny spellings.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3v.errors import Llama3vError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Towers that original-layout checkpoints name in `mm_vision_tower` but whose config they do not
# carry (their weights may still be inside the checkpoint). Values: HF config fields.
KNOWN_VISION_TOWERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6),
}

# Activations libmtmd can run in the vision tower, by HF name -> (use_gelu, use_silu).
# ggml's gelu is the tanh approximation; HF's "gelu" is erf-exact (docs/fidelity.md).
VISION_ACTIVATIONS = {
    "quick_gelu": (False, False),
    "gelu": (True, False),
    "gelu_pytorch_tanh": (True, False),
    "gelu_new": (True, False),
    "silu": (False, True),
}


# Bounds on a config's counts, far above any real model: a crafted config.json (num_hidden_layers 1e9)
# must fail here, not when tensor names are planned for every layer it claims.
MAX_LAYERS = 512
MAX_WIDTH = 1 << 20


def mapping(d: object, what: str) -> dict:
    """`d` itself when it is a JSON object; a clean error naming `what` otherwise."""
    if not isinstance(d, dict):
        raise Llama3vError(f"{what} must be a JSON object, got {type(d).__name__}")
    return d


def _count(d: dict, key: str, upper: int, what: str) -> int:
    """A positive integer config value no larger than `upper` (JSON floats such as 1e9 included)."""
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not 1 <= value <= upper:
        raise Llama3vError(f"{what} {key} must be an integer from 1 to {upper:,}, got {value!r}")
    return int(value)


@dataclass
class VisionConfig:
    """A CLIP or SigLIP vision tower (HF CLIPVisionConfig / SiglipVisionConfig keys)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        """Build from an HF vision config dict (or a full CLIPConfig/SiglipConfig)."""
        d = mapping(d, "the vision config")
        if "vision_config" in d:
            d = mapping(d["vision_config"], "vision_config")
        model_type = d.get("model_type", "clip_vision_model")
        if model_type in ("clip", "siglip"):
            model_type += "_vision_model"
        if model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise Llama3vError(
                f"unsupported vision tower {model_type!r}: llama3v converts CLIP and SigLIP towers")
        defaults = {"hidden_act": "quick_gelu" if model_type.startswith("clip") else "gelu_pytorch_tanh",
                    "layer_norm_eps": 1e-5 if model_type.startswith("clip") else 1e-6}
        try:
            cfg = cls(
                model_type=model_type,
                hidden_size=_count(d, "hidden_size", MAX_WIDTH, "vision"),
                intermediate_size=_count(d, "intermediate_size", MAX_WIDTH, "vision"),
                num_hidden_layers=_count(d, "num_hidden_layers", MAX_LAYERS, "vision"),
                num_attention_heads=_count(d, "num_attention_heads", MAX_WIDTH, "vision"),
                image_size=_count(d, "image_size", MAX_WIDTH, "vision"),
                patch_size=_count(d, "patch_size", MAX_WIDTH, "vision"),
                hidden_act=d.get("hidden_act", defaults["hidden_act"]),
                layer_norm_eps=float(d.get("layer_norm_eps", defaults["layer_norm_eps"])),
            )
        except KeyError as e:
            raise Llama3vError(f"vision config lacks {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise Llama3vError(f"vision config: a value has the wrong type ({e})") from e
        if cfg.patch_size > cfg.image_size or cfg.hidden_size % cfg.num_attention_heads:
            raise Llama3vError(f"vision config: patch_size {cfg.patch_size} must be at most image_size "
                               f"{cfg.image_size}, and num_attention_heads {cfg.num_attention_heads} must divide "
                               f"hidden_size {cfg.hidden_size}")
        if cfg.hidden_act not in VISION_ACTIVATIONS:
            raise Llama3vError(f"vision tower activation {cfg.hidden_act!r} is not supported by libmtmd")
        return cfg

    @property
    def is_clip(self) -> bool:
        """CLIP towers have a class token and a pre-layernorm; SigLIP towers have neither."""
        return self.model_type == "clip_vision_model"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Image tokens per tile: every patch, never the class token."""
        return self.grid * self.grid


@dataclass
class TextConfig:
    """A Llama-3 decoder (HF LlamaConfig keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        """Build from an HF LlamaConfig dict; reads `rope_theta` (4.x) or `rope_parameters` (5.x)."""
        d = mapping(d, "the text config")
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "llava_llama", "llava", "llava_next", "bunny-llama", "bunny_llama"):
            raise Llama3vError(f"unsupported language model {model_type!r}: llama3v converts Llama decoders")
        rope = mapping(d.get("rope_parameters") or {}, "rope_parameters")
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = mapping(scaling, "rope_scaling")
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise Llama3vError(f"unsupported rope scaling {kind!r}: llama3v converts 'llama3' scaling")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise Llama3vError("Llama decoders with attention or MLP biases are not supported")
        try:
            n_heads = _count(d, "num_attention_heads", MAX_WIDTH, "text")
            cfg = cls(
                hidden_size=_count(d, "hidden_size", MAX_WIDTH, "text"),
                intermediate_size=_count(d, "intermediate_size", MAX_WIDTH, "text"),
                num_hidden_layers=_count(d, "num_hidden_layers", MAX_LAYERS, "text"),
                num_attention_heads=n_heads,
                num_key_value_heads=_count({"num_key_value_heads": d.get("num_key_value_heads") or n_heads},
                                           "num_key_value_heads", n_heads, "text"),
                vocab_size=_count(d, "vocab_size", 1 << 24, "text"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                head_dim=d.get("head_dim"),
            )
        except KeyError as e:
            raise Llama3vError(f"text config lacks {e.args[0]!r}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise Llama3vError(f"text config: a value has the wrong type ({e})") from e
        if cfg.hidden_size % n_heads or n_heads % cfg.num_key_value_heads:
            raise Llama3vError(f"text config: num_attention_heads {n_heads} must divide hidden_size "
                               f"{cfg.hidden_size}, and num_key_value_heads {cfg.num_key_value_heads} must divide it")
        return cfg

    @property
    def n_head_dim(self) -> int:
        """Per-head width."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class LlavaConfig:
    """A LLaVA-style model: vision tower, projector, Llama decoder, and how images are prepared."""

    vision: VisionConfig
    text: TextConfig
    projector: str  # "mlp2x_gelu" or "linear"
    vision_feature_layer: int  # HF index into hidden_states (-2: second to last block)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    preprocess: str  # "resize" (CLIP), "squash" (SigLIP, LLaVA-NeXT's base view) or "pad" (LLaVA-1.5)
    image_token_index: int | None = None
    grid_pinpoints: list[tuple[int, int]] | None = None  # LLaVA-NeXT: (height, width) tiling grids
    patch_merge: str = "flat"  # LLaVA-NeXT: "spatial_unpad" (unpad + image newline) or "flat"
    s2_scales: tuple[int, ...] | None = None  # Bunny v1.1's multi-scale tower: image sizes, smallest first

    @property
    def projector_in(self) -> int:
        """The projector's input width: the tower's, times the number of scales for S2."""
        return self.vision.hidden_size * len(self.s2_scales or (0,))

    @property
    def n_feature_blocks(self) -> int:
        """How many encoder blocks produce the selected feature layer (only these are written)."""
        n = self.vision.num_hidden_layers
        k = self.vision_feature_layer if self.vision_feature_layer >= 0 else n + 1 + self.vision_feature_layer
        if not 1 <= k <= n:
            raise Llama3vError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the tower's {n} layers")
        return k


def pinpoints_from(value: object, vision: VisionConfig) -> list[tuple[int, int]]:
    """Validate LLaVA-NeXT's `image_grid_pinpoints`: (height, width) pairs, multiples of the tower size."""
    try:
        pairs = [(int(h), int(w)) for h, w in value]
    except (TypeError, ValueError):
        raise Llama3vError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {value!r}") from None
    bad = [p for p in pairs if p[0] <= 0 or p[1] <= 0 or p[0] % vision.image_size or p[1] % vision.image_size]
    if not pairs or bad:
        raise Llama3vError(f"image_grid_pinpoints {bad or value} are not multiples of the tower size "
                           f"{vision.image_size}")
    return pairs


def feature_layer_from(value: object) -> int:
    """Validate an HF `vision_feature_layer` / `mm_vision_select_layer` value."""
    if isinstance(value, list):
        if len(value) != 1:
            raise Llama3vError(f"several vision feature layers {value} are not supported (one layer only)")
        value = value[0]
    if not isinstance(value, int):
        raise Llama3vError(f"vision feature layer must be an integer, got {value!r}")
    return value


def select_strategy_from(value: str, vision: VisionConfig) -> None:
    """Accept the strategies libmtmd can express: every patch, and never the class token.

    HF's "default" drops the first row whether or not it is a class token: right for CLIP, but for a
    SigLIP tower (no class token) it drops patch 0, which libmtmd cannot do; SigLIP llava-hf models
    use "full". The original layout's "patch" drops CLIP's class token and keeps every SigLIP patch
    (Bunny's tower).
    """
    if value not in ("default", "patch", "full", "cls_patch"):
        raise Llama3vError(f"unknown vision feature select strategy {value!r}")
    keeps_first_row = value in ("full", "cls_patch") or (value == "patch" and not vision.is_clip)
    if vision.is_clip and keeps_first_row:
        raise Llama3vError(
            f"vision feature select strategy {value!r} keeps the class token, which libmtmd always drops; "
            "this checkpoint cannot be expressed as a llama.cpp mmproj")
    if not vision.is_clip and not keeps_first_row:
        raise Llama3vError(
            f"vision feature select strategy {value!r} drops the first patch of a SigLIP tower (which has no "
            "class token), which libmtmd cannot express; SigLIP LLaVA checkpoints use 'full'")


S2_DEFAULT_SCALES = "384,768,1152"  # Bunny's SiglipVisionTowerS2 default


def s2_scales_from(value: object, vision: VisionConfig) -> tuple[int, ...]:
    """Validate Bunny's `s2_scales` ("384,768,1152" or a list): sorted, the smallest the tower's input size,
    each a multiple of it (the image is cut into whole crops and their features area-pooled exactly)."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        scales = tuple(sorted(int(v) for v in parts))
    except (TypeError, ValueError):
        raise Llama3vError(f"s2_scales must be comma-separated sizes, got {value!r}") from None
    if not scales or scales[0] != vision.image_size or any(s % scales[0] for s in scales) or len(set(scales)) != len(
            scales):
        raise Llama3vError(f"s2_scales {list(scales)} must be distinct multiples of the tower's image size "
                           f"{vision.image_size}, starting with it")
    return scales
