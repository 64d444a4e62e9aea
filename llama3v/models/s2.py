"""Bunny v1.1's multi-scale (S2) vision features, as its SiglipVisionTowerS2 computes them with s2wrapper.

For each scale s (sorted, the smallest being the tower's input size): the normalised image is resized
bicubically to s x s (PyTorch's interpolate, align_corners=False, no antialias), cut into n x n crops
of the tower's size (n = s / smallest, row by row: the "chessboard" split), each crop's features
(hidden_states[-2], no post-layernorm) laid back as a feature map and the crops merged in the same
order; every scale's map is area-pooled to the smallest scale's grid and the scales concatenated on
channels, smallest first, before the projector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def split_chessboard(x: Tensor, n: int) -> Tensor:
    """[B, C, H, W] -> [n*n*B, C, H/n, W/n]: crop (i, j) (row i, column j) is batch block i*n + j."""
    _, _, h, w = x.shape
    ch, cw = h // n, w // n
    return torch.cat([x[:, :, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw] for i in range(n) for j in range(n)])


def merge_chessboard(x: Tensor, n: int) -> Tensor:
    """The inverse of split_chessboard: [n*n*B, C, h, w] -> [B, C, n*h, n*w]."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


def bicubic(pixels: Tensor, size: int) -> Tensor:
    """s2wrapper's resize of the normalised image: PyTorch bicubic, align_corners=False, in float32."""
    return F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False)


def s2_features(tower: Callable[[Tensor], Tensor], pixels: Tensor, scales: Sequence[int],
                resize: Callable[[Tensor, int], Tensor] = bicubic) -> Tensor:
    """Normalised [B, 3, S, S] pixels -> [B, g*g, C * len(scales)] (g: the smallest scale's patch grid).

    `tower` maps [N, 3, s0, s0] crops to [N, g*g, C] features, row-major patches; `resize` (pixels, size)
    is Bunny's bicubic unless a caller measures another.
    """
    maps = []
    for size in scales:
        n = size // scales[0]
        feats = tower(split_chessboard(resize(pixels, size), n))
        g = int(round(feats.shape[1] ** 0.5))
        feats = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], g, g)  # 'b (h w) c -> b c h w'
        maps.append(merge_chessboard(feats, n))
    grid = maps[0].shape[-1]
    out = torch.cat([F.interpolate(m, size=(grid, grid), mode="area") for m in maps], dim=1)
    return out.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
