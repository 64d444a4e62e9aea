"""Write a trained tower + projector as the file the repository ships (f16 safetensors) and its notes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llama3v.hf.checkpoint import read_safetensors_file
from llama3v.hf.config import VisionConfig
from llama3v.models.vision import Projector, VisionTower
from llama3v.testing.factory import write_safetensors
from llama3v.training.tiny_llava import PROJECTOR_PREFIX, TOWER_PREFIX, VISION_CONFIG

PROJECTOR_INDEX = {"linear_1": "0", "linear_2": "2"}  # our Projector's layers -> the LLaVA mm_projector's indices


def vision_tensors(model: torch.nn.Module) -> dict:
    """The tower's and projector's weights under the original LLaVA layout's names, float32 numpy."""
    out = {}
    for name, t in model.tower.state_dict().items():
        out[TOWER_PREFIX + name] = t.detach().float().numpy()
    for name, t in model.projector.state_dict().items():
        layer, kind = name.split(".", 1)
        out[f"{PROJECTOR_PREFIX}{PROJECTOR_INDEX[layer]}.{kind}"] = t.detach().float().numpy()
    return out


def load_vision(path: Path) -> tuple[VisionTower, Projector]:
    """The tower and projector of a file `export` wrote (the inverse of `vision_tensors`), float32."""
    weights = {k: torch.from_numpy(v.astype(np.float32)) for k, v in read_safetensors_file(path).items()}
    tower = VisionTower(VisionConfig.from_dict(VISION_CONFIG))
    tower.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)})
    w1 = weights[f"{PROJECTOR_PREFIX}{PROJECTOR_INDEX['linear_1']}.weight"]
    projector = Projector(w1.shape[1], w1.shape[0], "mlp2x_gelu")
    projector.load_state_dict({f"{layer}.{kind}": weights[f"{PROJECTOR_PREFIX}{idx}.{kind}"]
                               for layer, idx in PROJECTOR_INDEX.items() for kind in ("weight", "bias")})
    return tower, projector


def export(model: torch.nn.Module, tokens: object, out: Path, log: list[dict]) -> Path:
    """Write out/vision.safetensors (f16) and out/training.json (token set, training log)."""
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "vision.safetensors", vision_tensors(model), "f16")
    (out / "training.json").write_text(json.dumps({"caption_token_ids": tokens.ids, "log": log}, indent=1))
    return out / "vision.safetensors"
