"""The LLaVA reference: vision tower + projector + Llama-3 decoder, loaded from any layout `load_llava` reads.

Everything runs in float32 under no_grad; inputs and outputs are numpy so the runtime side (which has no
torch) can be compared against it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llama3v.errors import Llama3vError
from llama3v.hf.config import LlavaConfig
from llama3v.hf.key_formats import LlavaCheckpoint, load_llava
from llama3v.models.llama import Llama
from llama3v.models.s2 import bicubic, s2_features
from llama3v.models.vision import Projector, VisionTower


def _load(module: nn.Module, ckpt: LlavaCheckpoint, canonical: Callable[[str], str]) -> None:
    """Fill every parameter of a meta-device module from the checkpoint, checking shapes."""
    state = {}
    for name, param in module.state_dict(keep_vars=True).items():
        src = canonical(name)
        arr = ckpt.get(src)
        if tuple(arr.shape) != tuple(param.shape):
            raise Llama3vError(
                f"{ckpt.root}: tensor {src!r} has shape {tuple(arr.shape)}, expected {tuple(param.shape)}")
        state[name] = torch.tensor(arr, dtype=torch.float32)  # a copy: the checkpoint may hand out a read-only map
    module.load_state_dict(state, strict=True, assign=True)


class LlavaReference:
    """Float32 PyTorch reference for a LLaVA checkpoint: tile embeddings, prompt logits, greedy decoding."""

    def __init__(self, config: LlavaConfig, vision: VisionTower, projector: Projector, llm: Llama,
                 image_newline: torch.Tensor | None = None) -> None:
        self.config = config
        self.vision = vision.eval()
        self.projector = projector.eval()
        self.llm = llm.eval()
        self.image_newline = image_newline

    @classmethod
    def from_checkpoint(cls, src: str | Path | LlavaCheckpoint) -> LlavaReference:
        """Load from a checkpoint directory (any layout `load_llava` recognises) or an opened LlavaCheckpoint."""
        ckpt = src if isinstance(src, LlavaCheckpoint) else load_llava(src)
        cfg = ckpt.config
        # Build on the meta device so no memory is spent on an initialisation that loading overwrites.
        with torch.device("meta"):
            vision = VisionTower(cfg.vision, cfg.n_feature_blocks)
            projector = Projector(cfg.projector_in, cfg.text.hidden_size, cfg.projector,
                                  bias="projector.linear_1.bias" in ckpt)
            # A missing lm_head means tied weights even when the config says otherwise: transformers 5.x
            # keeps the flag on the LLaVA config, not always on text_config.
            llm = Llama(cfg.text, tied=cfg.text.tie_word_embeddings or "lm_head.weight" not in ckpt)
        _load(vision, ckpt, lambda n: "vision." + n)
        _load(projector, ckpt, lambda n: "projector." + n)
        _load(llm, ckpt, lambda n: n if n.startswith("lm_head.") else "text." + n)
        newline = torch.tensor(ckpt.get("image_newline")) if "image_newline" in ckpt else None
        return cls(cfg, vision, projector, llm, newline)

    @property
    def n_embd(self) -> int:
        """Width of the LLM's embeddings (and of every media row)."""
        return self.config.text.hidden_size

    @property
    def input_size(self) -> int:
        """The side of the images `encode_tiles` takes: the tower's, or the largest S2 scale."""
        return self.config.s2_scales[-1] if self.config.s2_scales else self.config.vision.image_size

    @torch.no_grad()
    def encode_tiles(self, tiles: np.ndarray, resize: Callable[[torch.Tensor, int], torch.Tensor] = bicubic
                     ) -> np.ndarray:
        """RGB uint8 tiles [N, S, S, 3] (S = input_size) -> projected embeddings float32 [N * n_patches, n_embd].

        An S2 checkpoint's tiles are its largest scale, encoded as Bunny's S2 tower does (models/s2.py; `resize`
        replaces its bicubic resize of the normalised image, to measure another).
        """
        size = self.input_size
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (size, size, 3):
            raise ValueError(f"tiles must be uint8 [N, {size}, {size}, 3], got {tiles.dtype} {list(tiles.shape)}")
        x = torch.from_numpy(np.array(tiles)).permute(0, 3, 1, 2).float()  # a writable copy
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = (x / 255.0 - mean) / std
        scales = self.config.s2_scales
        feats = s2_features(self.vision, pixels, scales, resize) if scales else self.vision(pixels)
        return self.projector(feats).reshape(-1, self.n_embd).float().numpy()

    @torch.no_grad()
    def encode_anyres(self, tiles: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
        """LLaVA-NeXT's image rows from the base view (tiles[0]) and a rows x cols grid of tiles, as HF packs
        them: base rows, then the grid's feature map unpadded to the image's (width, height) with the newline
        vector after each row."""
        if self.image_newline is None:
            raise ValueError("this checkpoint has no image_newline: it is not a LLaVA-NeXT model")
        feats = torch.from_numpy(self.encode_tiles(tiles)).view(len(tiles), -1, self.n_embd)
        base, rest = feats[0], feats[1:]
        if grid == (0, 0):
            return torch.cat([base, self.image_newline[None]]).numpy()
        rows, cols = grid
        g = self.config.vision.grid
        # [tiles, g*g, D] -> channels-first feature map [D, rows*g, cols*g]
        fmap = rest.view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)
        fmap = _unpad(fmap, image_size)
        newline = self.image_newline[:, None, None].expand(-1, fmap.shape[1], 1)
        fmap = torch.cat([fmap, newline], dim=2)
        return torch.cat([base, fmap.flatten(1, 2).T]).numpy()

    def _inputs_embeds(self, prompt: Sequence[int | None], media_rows: np.ndarray | None) -> torch.Tensor:
        """[T, n_embd]: token embeddings, with each None taking the next media row in order."""
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        is_media = torch.tensor([t is None for t in prompt])
        n_media = int(is_media.sum())
        rows = np.zeros((0, self.n_embd), np.float32) if media_rows is None else np.asarray(media_rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise ValueError(f"media rows must be [n, {self.n_embd}], got {list(rows.shape)}")
        if rows.shape[0] != n_media:
            raise ValueError(f"the prompt has {n_media} media positions but {rows.shape[0]} media rows were given")
        ids = [t for t in prompt if t is not None]
        vocab = self.config.text.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        x = torch.empty(len(prompt), self.n_embd)
        x[is_media] = torch.from_numpy(rows)
        x[~is_media] = self.llm.embed(torch.tensor(ids, dtype=torch.long))
        return x

    @torch.no_grad()
    def logits(self, prompt: Sequence[int | None], media_rows: np.ndarray | None = None) -> np.ndarray:
        """Logits float32 [T, V] for a prompt whose None positions are filled by `media_rows` in order."""
        return self.llm(self._inputs_embeds(prompt, media_rows)[None])[0].numpy()

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int | None], media_rows: np.ndarray | None,
               n_steps: int) -> tuple[list[int], list[float]]:
        """Greedy continuation: the next `n_steps` tokens and the top-1 minus top-2 logit margin at each step."""
        x = self._inputs_embeds(prompt, media_rows)
        tokens: list[int] = []
        margins: list[float] = []
        for _ in range(n_steps):
            top = torch.topk(self.llm(x[None])[0, -1], 2)
            token = int(top.indices[0])
            tokens.append(token)
            margins.append(float(top.values[0] - top.values[1]))
            x = torch.cat([x, self.llm.embed(torch.tensor([token]))])
        return tokens, margins


def _unpad(fmap: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Crop the padding LLaVA-NeXT's preprocessing added around the image from a [D, H, W] feature map."""
    width, height = image_size
    cur_h, cur_w = fmap.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return fmap[:, pad:cur_h - pad, :]
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return fmap[:, :, pad:cur_w - pad]
