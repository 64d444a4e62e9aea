"""Bunny v1.1's multi-scale (S2) encode around libmtmd: scales and crops in, one image's rows out.

libmtmd runs the tower on each crop (its mmproj passes the features through unchanged); this module
does the rest in numpy, in Bunny's order (docs/s2.md): the image at the largest scale is resized
bicubically to each scale exactly as PyTorch's interpolate does, cut into crops row by row, the
crops' feature maps merged back, area-pooled to the smallest scale's grid, concatenated on
channels (smallest scale first) and projected by the checkpoint's mlp2x_gelu (erf GELU).

libmtmd takes uint8 pixels, so a crop of a scale that is not a whole divisor of the largest (768 of
1152) is rounded to uint8 after the resize; docs/s2.md gives the error that costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llama3v import gguf_schema as S
from llama3v.gguf_header import GGUFInfo, read_tensor

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (align_corners=False, border indices clamped)."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        real = scale * (i + 0.5) - 0.5  # not clamped at 0 for bicubic, as PyTorch
        base = math.floor(real)
        t = real - base
        weights = (_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t))
        for k, w in enumerate(weights):
            m[i, min(max(base - 1 + k, 0), n_in - 1)] += w
    return m


def _cubic1(x: float) -> float:
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic2(x: float) -> float:
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def scale_crops(image: np.ndarray, scales: tuple[int, ...]) -> list[list[np.ndarray]]:
    """uint8 [S, S, 3] at the largest scale -> per scale, its crops of the smallest scale's size, row by row.

    Resizing is linear and the normalisation affine per channel, so resizing uint8 values equals
    resizing the normalised image; the result is rounded to uint8 for libmtmd.
    """
    size, crop = image.shape[0], scales[0]
    out = []
    for s in scales:
        if s == size:
            resized = image
        else:
            m = bicubic_matrix(size, s)
            x = m @ image.astype(np.float64).transpose(2, 0, 1) @ m.T  # per channel, rows then columns
            resized = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        n = s // crop
        out.append([np.ascontiguousarray(resized[i * crop:(i + 1) * crop, j * crop:(j + 1) * crop])
                    for i in range(n) for j in range(n)])
    return out


@dataclass
class S2Head:
    """The scales and the projector an S2 mmproj carries (llama3v.s2.scales, s2.mm.*)."""

    scales: tuple[int, ...]
    w0: np.ndarray
    b0: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def from_gguf(cls, info: GGUFInfo) -> S2Head:
        """Read the scales and the projector of a checked mmproj."""
        w0, b0, w2, b2 = (read_tensor(info, S.S2_PROJ_LAYER.format(idx=i, kind=k))
                          for i, k in ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias")))
        return cls(tuple(int(s) for s in info.get(S.S2_SCALES)), w0, b0, w2, b2)

    @property
    def n_embd(self) -> int:
        """Width of the rows fed to the LLM."""
        return self.w2.shape[0]

    def encode(self, image: np.ndarray, encode_crop: Callable[[np.ndarray], np.ndarray], grid: int) -> np.ndarray:
        """uint8 [S, S, 3] at the largest scale -> [grid*grid, n_embd] rows; `encode_crop` runs the tower."""
        maps = []
        for crops in scale_crops(image, self.scales):
            n = math.isqrt(len(crops))
            feats = np.stack([encode_crop(c) for c in crops])  # [n*n, g*g, C]
            c = feats.shape[-1]
            merged = feats.reshape(n, n, grid, grid, c).transpose(0, 2, 1, 3, 4).reshape(n * grid, n * grid, c)
            maps.append(merged.reshape(grid, n, grid, n, c).mean(axis=(1, 3), dtype=np.float64))  # area pooling
        x = np.concatenate(maps, axis=-1).reshape(grid * grid, -1).astype(np.float32)
        h = x @ self.w0.T + self.b0  # float32 products, as the reference's
        h = (0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))).astype(np.float32)
        return h @ self.w2.T + self.b2


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to double precision (numpy has none): math.erf, vectorised over the array."""
    return np.frompyfunc(math.erf, 1, 1)(x).astype(np.float64)
