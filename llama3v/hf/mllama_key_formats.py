"""Open an MllamaForConditionalGeneration checkpoint under canonical tensor names.

Canonical names: `vision.*` (HF's MllamaVisionModel modules), `projector.*` (the linear
multi_modal_projector), `text.*` (MllamaTextModel: embed_tokens, layers.N..., norm), `lm_head.*`.
Layouts: transformers (4.45 and 5.x alike) saves `vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*` and `language_model.lm_head.*`; some checkpoints store the module paths of
its refactored classes (4.52+) instead: `model.vision_model.*`, `model.multi_modal_projector.*`,
`model.language_model.*` and `lm_head.*`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import Checkpoint, open_checkpoint
from llama3v.hf.key_formats import LlavaCheckpoint, canonical_name
from llama3v.hf.mllama_config import MllamaConfig

_RULES = [(re.compile(p), r) for p, r in [
    (r"^(?:model\.)?vision_model\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^language_model\.model\.", "text."),
    (r"^model\.language_model\.", "text."),
    (r"^(?:language_model\.)?lm_head\.", "lm_head."),
]]


def is_mllama(config: dict) -> bool:
    """Whether a config.json describes a Llama-3.2-Vision checkpoint."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "mllama" or "MllamaForConditionalGeneration" in archs


@dataclass
class MllamaCheckpoint(LlavaCheckpoint):
    """An mllama checkpoint under canonical tensor names, with its parsed configuration."""

    config: MllamaConfig  # type: ignore[assignment]


def load_mllama(src: str | Path) -> MllamaCheckpoint:
    """Open an MllamaForConditionalGeneration checkpoint directory (either key format)."""
    main: Checkpoint = open_checkpoint(src)
    if not is_mllama(main.config):
        raise Llama3vError(f"{main.root}: not an MllamaForConditionalGeneration checkpoint")
    config = MllamaConfig.from_dicts(main.config, main.read_json("preprocessor_config.json"))
    sources = {}
    for name in main.shapes:
        canon = canonical_name(name, _RULES)
        if canon is not None:
            sources[canon] = (main, name)
    key_format = "mllama-4.52" if any(n.startswith("model.") for n in main.shapes) else "mllama"
    return MllamaCheckpoint(config=config, key_format=key_format, main=main, _sources=sources)
