"""Write a trained tower + projector as the file the repository ships (f16 safetensors) and its notes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama3v.testing.factory import write_safetensors
from llama3v.training.tiny_llava import PROJECTOR_PREFIX, TOWER_PREFIX


def vision_tensors(model: torch.nn.Module) -> dict:
    """The tower's and projector's weights under the original LLaVA layout's names, float32 numpy."""
    out = {}
    for name, t in model.tower.state_dict().items():
        out[TOWER_PREFIX + name] = t.detach().float().numpy()
    for name, t in model.projector.state_dict().items():
        idx = {"linear_1": "0", "linear_2": "2"}[name.split(".")[0]]
        out[f"{PROJECTOR_PREFIX}{idx}.{name.split('.', 1)[1]}"] = t.detach().float().numpy()
    return out


def export(model: torch.nn.Module, tokens: object, out: Path, log: list[dict]) -> Path:
    """Write out/vision.safetensors (f16) and out/training.json (token set, training log)."""
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "vision.safetensors", vision_tensors(model), "f16")
    (out / "training.json").write_text(json.dumps({"caption_token_ids": tokens.ids, "log": log}, indent=1))
    return out / "vision.safetensors"
