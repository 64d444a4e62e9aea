"""Low-rank adapters (LoRA) on the LM's linear layers.

An adapter adds (alpha / rank) * B @ A to a frozen weight W. Shipped adapters are merged into the
decoder when the tiny model is assembled (llama3v.training.tiny_llava.merge_lora), so the checkpoint and
its GGUF hold an ordinary Llama decoder.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (B starts at zero: no change at step 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scale * x A^T B^T."""
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(layers: nn.ModuleList, first: int, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every target linear of layers[first:] in place; returns them by canonical `text.layers.N.*` name."""
    out = {}
    for i in range(first, len(layers)):
        for target in TARGETS:
            parent_name, attr = target.split(".")
            parent = getattr(layers[i], parent_name)
            wrapped = LoRALinear(getattr(parent, attr), rank, alpha)
            setattr(parent, attr, wrapped)
            out[f"text.layers.{i}.{target}"] = wrapped
    return out


def adapter_tensors(adapters: dict[str, LoRALinear]) -> dict[str, np.ndarray]:
    """The adapters as `<name>.lora_A` / `.lora_B` float32 arrays, B already multiplied by the scale."""
    out = {}
    for name, mod in adapters.items():
        out[name + ".lora_A"] = mod.lora_A.detach().float().numpy()
        out[name + ".lora_B"] = (mod.lora_B.detach().float() * mod.scale).numpy()
    return out

