"""CLIP / SigLIP vision transformer and the LLaVA projector, matching Hugging Face in float32.

Module names mirror HF's CLIPVisionTransformer / SiglipVisionTransformer and LlavaMultiModalProjector,
so a checkpoint's canonical `vision.*` and `projector.*` tensors load by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3v.hf.config import VisionConfig


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (PyTorch's fused kernel, as HF's gelu_pytorch_tanh)."""
    return F.gelu(x, approximate="tanh")


def gelu_new(x: Tensor) -> Tensor:
    """GELU, tanh approximation spelled out as HF's gelu_new does (rounds slightly differently from the kernel)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # erf-exact, as HF; ggml approximates it (docs/fidelity.md)
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_new,
    "silu": F.silu,
}


class VisionEmbeddings(nn.Module):
    """Patchify with a strided convolution, prepend CLIP's class token, add learned positions."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=not cfg.is_clip)
        if cfg.is_clip:
            self.class_embedding = nn.Parameter(torch.empty(d))
        self.position_embedding = nn.Embedding(cfg.n_patches + int(cfg.is_clip), d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, n_positions, hidden]."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # row-major patches
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over all patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    """fc1, activation, fc2 (any vision config with hidden_size, intermediate_size and hidden_act)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D]."""
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer encoder block (CLIPEncoderLayer / SiglipEncoderLayer)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """A CLIP or SigLIP vision transformer truncated to its first `n_blocks` encoder blocks.

    LLaVA reads hidden_states[k], the output of block k before any post-layernorm, so the tower stops
    there and never holds the post-layernorm or SigLIP's pooling head.
    """

    def __init__(self, cfg: VisionConfig, n_blocks: int | None = None) -> None:
        super().__init__()
        n_blocks = cfg.num_hidden_layers if n_blocks is None else n_blocks
        if not 1 <= n_blocks <= cfg.num_hidden_layers:
            raise ValueError(f"n_blocks {n_blocks} is outside the tower's {cfg.num_hidden_layers} layers")
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.is_clip:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # HF's spelling
        # A ModuleDict gives the parameters HF's `encoder.layers.N.*` names.
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(VisionBlock(cfg) for _ in range(n_blocks))})

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Normalised [B, 3, H, W] -> features of the last block kept, class token dropped: [B, n_patches, hidden]."""
        x = self.embeddings(pixel_values)
        if self.cfg.is_clip:
            x = self.pre_layrnorm(x)
        for block in self.encoder["layers"]:
            x = block(x)
        return x[:, 1:] if self.cfg.is_clip else x


class Projector(nn.Module):
    """LLaVA's projector from vision features to LLM embeddings: `mlp2x_gelu` (linear, erf GELU, linear) or `linear`."""

    def __init__(self, n_in: int, n_out: int, kind: str = "mlp2x_gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"unknown projector {kind!r} (mlp2x_gelu or linear)")
        self.linear_1 = nn.Linear(n_in, n_out, bias=bias)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(n_out, n_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """[..., n_in] -> [..., n_out]."""
        x = self.linear_1(x)
        if hasattr(self, "linear_2"):
            x = self.linear_2(F.gelu(x))
        return x
