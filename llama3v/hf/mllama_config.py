"""Llama-3.2-Vision (mllama) configuration: dataclasses whose fields mirror Hugging Face's MllamaConfig keys.

`MllamaVisionConfig` mirrors HF's MllamaVisionConfig (its `attention_heads` spelling, not
`num_attention_heads`), `MllamaConfig` the wrapper with the decoder's `TextConfig` plus
`cross_attention_layers`, and the image processor's `max_image_tiles`. Read from config.json as
transformers 4.45+ and 5.x write it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3v.errors import Llama3vError
from llama3v.hf.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VISION_ACTIVATIONS, TextConfig
from llama3v.mllama_format import aspect_ratios

# HF's MllamaTextModel embeds vocab_size + 8 rows: <|image|> = vocab_size and 7 spare rows.
EXTRA_EMBEDDING_ROWS = 8


@dataclass
class MllamaVisionConfig:
    """The tiled vision encoder (HF MllamaVisionConfig keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_global_layers: int
    attention_heads: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    intermediate_layers_indices: list[int]
    supported_aspect_ratios: list[tuple[int, int]]
    vision_output_dim: int
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> MllamaVisionConfig:
        """Build from the `vision_config` dict of an MllamaConfig."""
        try:
            max_tiles = int(d.get("max_num_tiles", 4))
            ratios = d.get("supported_aspect_ratios") or aspect_ratios(max_tiles)
            cfg = cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_global_layers=int(d["num_global_layers"]),
                attention_heads=int(d.get("attention_heads", d.get("num_attention_heads"))),
                image_size=int(d["image_size"]),
                patch_size=int(d["patch_size"]),
                max_num_tiles=max_tiles,
                intermediate_layers_indices=[int(i) for i in d.get("intermediate_layers_indices", [3, 7, 15, 23, 30])],
                supported_aspect_ratios=[(int(a), int(b)) for a, b in ratios],
                vision_output_dim=int(d["vision_output_dim"]),
                hidden_act=d.get("hidden_act", "gelu"),
                norm_eps=float(d.get("norm_eps", 1e-5)),
                num_channels=int(d.get("num_channels", 3)),
            )
        except (KeyError, TypeError) as e:
            raise Llama3vError(f"mllama vision config lacks or mangles {e}") from e
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise Llama3vError(f"mllama vision activation {self.hidden_act!r} is not supported by libmtmd")
        if self.num_channels != 3:
            raise Llama3vError(f"mllama vision towers with {self.num_channels} channels are not supported (RGB only)")
        if self.hidden_size % self.attention_heads:
            raise Llama3vError(f"vision hidden_size {self.hidden_size} is not a multiple of {self.attention_heads}")
        if self.image_size % self.patch_size:
            raise Llama3vError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise Llama3vError(f"intermediate_layers_indices {bad} lie outside the {self.num_hidden_layers} layers")
        want = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        if self.vision_output_dim != want:
            raise Llama3vError(f"vision_output_dim {self.vision_output_dim} is not hidden_size x (1 + "
                               f"{len(self.intermediate_layers_indices)} intermediate layers) = {want}")

    @property
    def n_patches(self) -> int:
        """Patches per tile, without the class token."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_positions(self) -> int:
        """Positions per tile: the class token and every patch (HF's `num_patches`)."""
        return self.n_patches + 1

    @property
    def n_padded(self) -> int:
        """Positions per tile after padding to a multiple of 8, as the encoder runs them."""
        return -(-self.n_positions // 8) * 8

    @property
    def max_aspect_ratio_id(self) -> int:
        """The largest aspect-ratio id; 0 is padding, so tile embeddings have this many rows plus one."""
        return len(self.supported_aspect_ratios)


@dataclass
class MllamaConfig:
    """A Llama-3.2-Vision model: tiled vision encoder, linear projector, Llama-3 decoder with cross-attention layers."""

    vision: MllamaVisionConfig
    text: TextConfig
    cross_attention_layers: list[int]
    image_token_index: int
    max_image_tiles: int  # the image processor's limit (preprocessor_config.json)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dicts(cls, config: dict, preprocessor: dict | None = None) -> MllamaConfig:
        """Build from config.json (MllamaConfig) and preprocessor_config.json (MllamaImageProcessor)."""
        if "vision_config" not in config or "text_config" not in config:
            raise Llama3vError("an mllama config.json needs vision_config and text_config")
        text_dict = dict(config["text_config"])
        vision = MllamaVisionConfig.from_dict(config["vision_config"])
        text = TextConfig.from_dict({**text_dict, "model_type": "llama", "tie_word_embeddings": bool(
            config.get("tie_word_embeddings") or text_dict.get("tie_word_embeddings"))})
        layers = [int(i) for i in text_dict.get("cross_attention_layers") or []]
        bad = [i for i in layers if not 0 <= i < text.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise Llama3vError(f"cross_attention_layers {layers} must be distinct layers of the "
                               f"{text.num_hidden_layers}-layer decoder")
        if not layers:
            raise Llama3vError("an mllama decoder without cross_attention_layers cannot see images")
        proc = preprocessor or {}
        size = proc.get("size", {}).get("height", vision.image_size)
        if size != vision.image_size:
            raise Llama3vError(f"the image processor's tile size {size} differs from the encoder's {vision.image_size}")
        max_image_tiles = int(proc.get("max_image_tiles", vision.max_num_tiles))
        if aspect_ratios(max_image_tiles) != vision.supported_aspect_ratios:
            raise Llama3vError(
                f"the image processor's grids for max_image_tiles={max_image_tiles} are not the encoder's "
                f"supported_aspect_ratios {vision.supported_aspect_ratios}: aspect-ratio ids would disagree")
        if max_image_tiles != vision.max_num_tiles:  # HF's encoder reshapes every image to max_num_tiles tiles
            raise Llama3vError(f"max_image_tiles {max_image_tiles} differs from the encoder's max_num_tiles "
                               f"{vision.max_num_tiles}")
        mean = tuple(float(v) for v in proc.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(v) for v in proc.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise Llama3vError("image_mean and image_std must have 3 values")
        image_token = int(config.get("image_token_index", config.get("image_token_id", text.vocab_size)))
        if not 0 <= image_token < text.vocab_size + EXTRA_EMBEDDING_ROWS:
            raise Llama3vError(f"image_token_index {image_token} lies outside the token embedding "
                               f"({text.vocab_size} + {EXTRA_EMBEDDING_ROWS} rows)")
        return cls(
            vision=vision,
            text=text,
            cross_attention_layers=sorted(layers),
            image_token_index=image_token,
            max_image_tiles=max_image_tiles,
            image_mean=mean,  # type: ignore[arg-type]
            image_std=std,  # type: ignore[arg-type]
        )

    @property
    def n_embedding_rows(self) -> int:
        """Rows of the token embedding: the vocabulary, <|image|> and HF's spare rows."""
        return self.text.vocab_size + EXTRA_EMBEDDING_ROWS
