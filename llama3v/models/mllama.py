"""The Llama-3.2-Vision (mllama) reference: tiled vision encoder, projector, Llama-3 decoder with gated cross-attention.

Matches transformers' MllamaForConditionalGeneration in float32 (full-sequence forward, no cache).
Module names mirror HF's (MllamaVisionModel: patch_embedding, gated_positional_embedding,
pre/post_tile_positional_embedding, layernorm_pre/post, transformer, global_transformer;
MllamaTextModel: embed_tokens, layers.N, norm), so a checkpoint's canonical tensors load by name.
HF behaviours kept on purpose (docs/mllama.md):
- the encoder runs every image as `max_num_tiles` tiles; padding tiles are zeros after
  normalisation, and the encoder's mask only stops padding queries from seeing padding keys, so
  real tiles do attend to padding tiles and patches;
- the cross-attention mask comes from the token ids (llama3v.mllama_format.cross_attention_spans);
  a text row that sees no image gets an all-zero additive mask, i.e. attends uniformly to every
  image position (padding tiles included), and only its MLP output is zeroed
  (`full_text_row_masked_out_mask`); the gated attention output still reaches the residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama3v.hf.config import TextConfig
from llama3v.hf.mllama_config import MllamaConfig, MllamaVisionConfig
from llama3v.hf.mllama_key_formats import MllamaCheckpoint, load_mllama
from llama3v.mllama_format import cross_attention_spans
from llama3v.models.llama import MLP, Attention, Block, RMSNorm, rope_inv_freq
from llama3v.models.llava import _load
from llama3v.models.vision import VisionMLP

NEG = torch.finfo(torch.float32).min  # HF's additive mask value


# --- vision encoder -------------------------------------------------------------------------------
class TileEmbedding(nn.Module):
    """A gated per-tile vector chosen by aspect-ratio id (HF MllamaPrecomputedAspectRatioEmbedding)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        """x [M, tiles, N, D] + tanh(gate) * embedding[ids] (one vector per tile; fewer tiles than the
        maximum take the first ones)."""
        e = self.embedding(ids).reshape(-1, self.max_tiles, 1, self.dim)[:, :x.shape[1]]
        return x + e * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """Position embedding blended with a tile-position table per aspect ratio (HF's PrecomputedPositionEmbedding)."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_tiles, self.n_pos, self.dim = cfg.max_num_tiles, cfg.n_positions, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.n_pos, self.dim))
        self.tile_embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, self.max_tiles * self.n_pos * self.dim)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        """x [M, tiles, n_pos, D] -> x + (1 - tanh g) * pos + tanh g * tile_pos[ids]."""
        x = x + ((1 - self.gate.tanh()) * self.embedding).view(1, 1, self.n_pos, self.dim)
        tile = self.tile_embedding(ids).reshape(x.shape[0], self.max_tiles, self.n_pos, self.dim)[:, :x.shape[1]]
        return x + self.gate.tanh() * tile


class VisionAttention(nn.Module):
    """Multi-head self-attention without biases, with an additive mask."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """[M, N, D] with mask [M, 1, N, N] -> [M, N, D]."""
        M, N, D = x.shape
        q, k, v = (p(x).view(M, N, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(M, N, D))


class VisionLayer(nn.Module):
    """Pre-norm encoder layer; the global layers scale both branches by tanh of a learned gate."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """[M, N, D] -> [M, N, D]."""
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if hasattr(self, "gate_attn") else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if hasattr(self, "gate_ffn") else h)


def _layers(cfg: MllamaVisionConfig, n: int, gated: bool) -> nn.ModuleDict:
    """A ModuleDict gives HF's `transformer.layers.N.*` parameter names."""
    return nn.ModuleDict({"layers": nn.ModuleList(VisionLayer(cfg, gated) for _ in range(n))})


def encoder_mask(tile_mask: Tensor, n_positions: int, n_padded: int) -> Tensor:
    """HF's additive encoder mask [M, 1, T*L, T*L]: only padding queries x padding keys are masked.

    Padding = the positions padded to a multiple of 8 and every position of a padding tile.
    """
    M, T = tile_mask.shape
    pad = (1 - tile_mask.float()).view(M, T, 1).repeat(1, 1, n_padded)
    pad[:, :, n_positions:] = 1
    pad = pad.reshape(M, T * n_padded, 1)
    return (pad @ pad.transpose(-1, -2) * NEG).unsqueeze(1)


class MllamaVisionEncoder(nn.Module):
    """The tiled vision encoder: [M, tiles, 3, S, S] -> [M, tiles, n_positions, vision_output_dim]."""

    def __init__(self, cfg: MllamaVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = TileEmbedding(cfg)
        self.post_tile_positional_embedding = TileEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(d)  # HF leaves these two at LayerNorm's default eps
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = _layers(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = _layers(cfg, cfg.num_global_layers, gated=True)

    def forward(self, pixels: Tensor, aspect_ratio_ids: Tensor, tile_mask: Tensor) -> Tensor:
        """Normalised pixels [M, T, 3, S, S], ids [M], tile mask [M, T] (1 = real tile) -> [M, T, n_pos, out_dim]."""
        cfg = self.cfg
        M, T = pixels.shape[:2]
        D, P, L = cfg.hidden_size, cfg.n_positions, cfg.n_padded
        x = self.patch_embedding(pixels.flatten(0, 1)).flatten(2).transpose(1, 2)  # [M*T, patches, D]
        x = self.pre_tile_positional_embedding(x.reshape(M, T, -1, D), aspect_ratio_ids)
        x = torch.cat([self.class_embedding.expand(M * T, 1, D), x.reshape(M * T, -1, D)], dim=1)
        x = self.gated_positional_embedding(x.reshape(M, T, P, D), aspect_ratio_ids)
        x = F.pad(self.layernorm_pre(x), (0, 0, 0, L - P))
        mask = encoder_mask(tile_mask, P, L)
        x = x.reshape(M, T * L, D)
        kept = []
        for i, layer in enumerate(self.transformer["layers"]):
            x = layer(x, mask)
            if i in cfg.intermediate_layers_indices:
                kept.append((cfg.intermediate_layers_indices.index(i), x))
        x = self.post_tile_positional_embedding(self.layernorm_post(x).reshape(M, T, L, D), aspect_ratio_ids)
        x = x.reshape(M, T * L, D)
        for layer in self.global_transformer["layers"]:
            x = layer(x, mask)
        # HF stacks the intermediate states on a last axis and flattens it: feature d * K + k.
        inter = torch.stack([h for _, h in sorted(kept, key=lambda p: p[0])], dim=-1).reshape(M, T, L, -1)
        return torch.cat([x.reshape(M, T, L, D)[:, :, :P], inter[:, :, :P]], dim=-1)


# --- decoder --------------------------------------------------------------------------------------
class CrossAttention(Attention):
    """Text queries attend to projected vision states; per-head RMS norms on queries and keys, no positions."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__(cfg)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Vision states [S, D] -> keys, values [n_head, S, head_dim] (computed once per image)."""
        S = states.shape[0]
        k = self.k_norm(self.k_proj(states).view(S, self.n_kv_head, self.head_dim).transpose(0, 1))
        v = self.v_proj(states).view(S, self.n_kv_head, self.head_dim).transpose(0, 1)
        groups = self.n_head // self.n_kv_head
        return k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """x [T, D], k/v [n_head, S, hd], additive mask [T, S] -> [T, D]."""
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(T, self.n_head, self.head_dim).transpose(0, 1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(0, 1).reshape(T, -1))


class CrossBlock(nn.Module):
    """A cross-attention decoder layer (HF MllamaCrossAttentionDecoderLayer): tanh-gated attention and MLP."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, row_mask: Tensor) -> Tensor:
        """x [T, D] -> [T, D]; row_mask [T, 1] zeroes the MLP of rows that see no image."""
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), k, v, mask)
        h = row_mask * self.mlp(self.post_attention_layernorm(x))
        return x + self.cross_attn_mlp_gate.tanh() * h


class MllamaDecoder(nn.Module):
    """Llama-3 decoder whose `cross_attention_layers` are CrossBlocks; embedding has vocab + 8 rows."""

    def __init__(self, cfg: MllamaConfig) -> None:
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.n_embedding_rows, t.hidden_size)
        self.layers = nn.ModuleList(
            CrossBlock(t) if i in cfg.cross_attention_layers else Block(t) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    def forward(self, ids: Tensor, states: Tensor | None, mask: Tensor | None, row_mask: Tensor | None) -> Tensor:
        """ids [T]; states [S, D] (None: text only, cross layers skipped as HF does) -> logits [T, V]."""
        T = ids.shape[0]
        inv_freq = rope_inv_freq(self.cfg.text)
        freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(ids)
        for layer in self.layers:
            if isinstance(layer, CrossBlock):
                if states is not None:
                    k, v = layer.cross_attn.kv(states)
                    x = layer(x, k, v, mask, row_mask)
            else:
                x = layer(x[None], cos, sin)[0]
        return self.lm_head(self.norm(x))


def cross_masks(ids: Sequence[int], image_token_id: int, n_tiles: Sequence[int], slots: Sequence[int],
                n_positions: int) -> tuple[Tensor, Tensor]:
    """HF's cross-attention mask [T, sum(slots) * n_positions] (additive) and row mask [T, 1].

    slots: the tile slots each image's states hold (max_num_tiles as HF; its real tiles in `real` mode).
    A row with no visible tile has its additive mask zeroed (uniform attention) and row mask 0.
    """
    spans = cross_attention_spans(ids, image_token_id)
    if len(spans) != len(n_tiles):
        raise ValueError(f"the prompt has {len(spans)} image tokens but {len(n_tiles)} images were given")
    cols = []
    for (start, end), n, s in zip(spans, n_tiles, slots, strict=True):
        sees = torch.zeros(len(ids), s)
        sees[start:end, :n] = 1
        cols.append(sees.repeat_interleave(n_positions, dim=1))
    sees = torch.cat(cols, dim=1)
    mask = (1.0 - sees).masked_fill((1.0 - sees).bool(), NEG)
    row_mask = (mask != NEG).any(dim=-1).float()[:, None]
    return mask * row_mask, row_mask


class MllamaReference:
    """Float32 PyTorch reference for an mllama checkpoint: vision states, logits, greedy decoding."""

    def __init__(self, config: MllamaConfig, vision: MllamaVisionEncoder, projector: nn.Linear,
                 decoder: MllamaDecoder) -> None:
        self.config = config
        self.vision = vision.eval()
        self.projector = projector.eval()
        self.decoder = decoder.eval()

    @classmethod
    def from_checkpoint(cls, src: str | Path | MllamaCheckpoint) -> MllamaReference:
        """Load from a checkpoint directory (either key format) or an opened MllamaCheckpoint."""
        ckpt = src if isinstance(src, MllamaCheckpoint) else load_mllama(src)
        cfg = ckpt.config
        with torch.device("meta"):
            vision = MllamaVisionEncoder(cfg.vision)
            projector = nn.Linear(cfg.vision.vision_output_dim, cfg.text.hidden_size)
            decoder = MllamaDecoder(cfg)
        _load(vision, ckpt, lambda n: "vision." + n)
        _load(projector, ckpt, lambda n: "projector." + n)
        _load(decoder, ckpt, lambda n: n if n.startswith("lm_head.") else "text." + n)
        return cls(cfg, vision, projector, decoder)

    @property
    def n_states(self) -> int:
        """Vision-state rows per image: every tile slot (padding tiles included) x positions."""
        return self.config.vision.max_num_tiles * self.config.vision.n_positions

    def _pixels(self, tiles: np.ndarray) -> Tensor:
        """uint8 tiles [n, S, S, 3] -> normalised [max_tiles, 3, S, S], padding tiles all zero (as HF)."""
        size, max_tiles = self.config.vision.image_size, self.config.vision.max_num_tiles
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (size, size, 3):
            raise ValueError(f"tiles must be uint8 [N, {size}, {size}, 3], got {tiles.dtype} {list(tiles.shape)}")
        if not 1 <= len(tiles) <= max_tiles:
            raise ValueError(f"an image has 1 to {max_tiles} tiles, got {len(tiles)}")
        x = torch.from_numpy(np.array(tiles)).permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        out = torch.zeros(max_tiles, 3, size, size)
        out[:len(tiles)] = (x / 255.0 - mean) / std
        return out

    @torch.no_grad()
    def vision_states(self, tiles: np.ndarray, aspect_ratio_id: int, tile_slots: str = "all") -> np.ndarray:
        """One image's projected vision states [slots * n_positions, n_embd] (the cross-attention keys' source):
        every tile slot as HF (`tile_slots="all"`), or only the real tiles (`"real"`, llama3v's cheaper mode)."""
        n_ids = self.config.vision.max_aspect_ratio_id
        if not 1 <= aspect_ratio_id <= n_ids:
            raise ValueError(f"aspect_ratio_id must be in [1, {n_ids}], got {aspect_ratio_id}")
        if tile_slots not in ("all", "real"):
            raise ValueError(f"tile_slots must be 'all' or 'real', got {tile_slots!r}")
        pixels = self._pixels(tiles)[None]
        if tile_slots == "real":
            pixels = pixels[:, :len(tiles)]
        tile_mask = torch.zeros(1, pixels.shape[1])
        tile_mask[0, :len(tiles)] = 1
        feats = self.vision(pixels, torch.tensor([aspect_ratio_id]), tile_mask)
        return self.projector(feats).reshape(-1, self.config.text.hidden_size).numpy()

    def _run(self, ids: Sequence[int], images: Sequence[tuple[np.ndarray, int]], tile_slots: str = "all") -> Tensor:
        vocab = self.config.n_embedding_rows
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be a non-empty list in [0, {vocab})")
        if not images:
            if self.config.image_token_index in ids:
                raise ValueError("the prompt holds an image token but no image was given")
            return self.decoder(torch.tensor(list(ids)), None, None, None)
        states = torch.from_numpy(np.concatenate([self.vision_states(t, ar, tile_slots) for t, ar in images]))
        n_tiles = [len(t) for t, _ in images]
        slots = [self.config.vision.max_num_tiles] * len(images) if tile_slots == "all" else n_tiles
        mask, row_mask = cross_masks(ids, self.config.image_token_index, n_tiles, slots, self.config.vision.n_positions)
        return self.decoder(torch.tensor(list(ids)), states, mask, row_mask)

    @torch.no_grad()
    def logits(self, ids: Sequence[int], images: Sequence[tuple[np.ndarray, int]] = ()) -> np.ndarray:
        """Logits [T, vocab] for token ids with one (uint8 tiles, aspect_ratio_id) per <|image|> token, in order."""
        return self._run(ids, images).numpy()

    @torch.no_grad()
    def greedy(self, ids: Sequence[int], images: Sequence[tuple[np.ndarray, int]],
               n_steps: int, tile_slots: str = "all") -> tuple[list[int], list[float]]:
        """Greedy continuation: the next `n_steps` tokens and the top-1 minus top-2 logit margin at each step."""
        seq, tokens, margins = list(ids), [], []
        for _ in range(n_steps):
            top = torch.topk(self._run(seq, images, tile_slots)[-1], 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(tokens[-1])
        return tokens, margins
