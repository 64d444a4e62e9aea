"""Facts of Llama-3.2-Vision (mllama) shared by the converter, the reference and the runtime (no torch, no numpy).

The tile grids and their aspect-ratio ids, HF's cross-attention spans (which image each text token
sees), and the GGUF names of the mllama files (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<|image|>"

# --- model GGUF (architecture "mllama"; Ollama's libllama patch used these names) -----------------
LLM_ARCH = "mllama"
CROSS_ATTENTION_LAYERS = "mllama.attention.cross_attention_layers"  # i32 array
IMAGE_TOKEN_ID = "llama3v.mllama.image_token_id"  # u32: <|image|>'s id (= vocab_size in Meta's models)
CROSS_BLOCK = "blk.{bid}.{part}.weight"  # part: cross_attn_{q,k,v,o}_proj, cross_attn_{q,k}_norm
CROSS_GATE = "blk.{bid}.{part}"  # part: cross_attn_attn_gate, cross_attn_mlp_gate; raw gate values, shape [1]

# --- mmproj GGUF (architecture "clip", projector type "mllama") -----------------------------------
PROJECTOR_TYPE = "mllama"
PREPROCESS_MODE = "mllama"  # llama3v.preprocess.mode: canvas, bilinear resize, pad, tile split
MAX_NUM_TILES = "llama3v.mllama.max_num_tiles"  # u32
ASPECT_RATIOS = "llama3v.mllama.aspect_ratios"  # i32 array: rows, cols of each grid in id order (id = index + 1)
GLOBAL_BLOCK_COUNT = "llama3v.mllama.global_block_count"  # u32
INTERMEDIATE_LAYERS = "llama3v.mllama.intermediate_layers"  # i32 array: local layers whose outputs are appended
OUTER_LN_EPS = "llama3v.mllama.outer_layer_norm_epsilon"  # f32: eps of v.pre_ln and v.post_ln (block norms: clip's)
GATES_PRECOMPUTED = "llama3v.mllama.gates_tanh"  # bool: every v.* gate holds tanh(gate) (position: 1 - tanh)

TILE_POSITION_EMBD = "v.tile_position_embd.weight"  # [n_ids + 1, max_tiles * n_positions * n_embd]
TILE_POSITION_GATE = "v.tile_position_embd.gate"  # tanh(gate)
POSITION_GATE = "v.position_embd.gate"  # 1 - tanh(gate)
PRE_TILE_EMBD = "v.pre_tile_position_embd.weight"  # [n_ids + 1, max_tiles * n_embd]
PRE_TILE_GATE = "v.pre_tile_position_embd.gate"
POST_TILE_EMBD = "v.post_tile_position_embd.weight"
POST_TILE_GATE = "v.post_tile_position_embd.gate"
POST_LN = "v.post_ln.{}"
GLOBAL_BLOCK = "v.global.blk.{bid}.{part}.{kind}"  # as v.blk.N plus the gates below
GLOBAL_GATE = "v.global.blk.{bid}.{part}"  # part: attn_gate, ffn_gate; tanh(gate)
PROJECTOR = "mm.0.{}"  # the linear projector: weight [n_embd_text, vision_output_dim], bias


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, columns) of at most `max_tiles` tiles, in MllamaImageProcessor's id order (id = index + 1)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """For each <|image|> in `ids`, the half-open range of positions that attend to that image (MllamaProcessor).

    Image k is seen from its own token up to the next image token; the last image until the end.
    A run of adjacent image tokens is one group: each of them is seen until the group's end span.
    Positions before the first image token see no image.
    """
    starts = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(starts, [*starts[1:], len(ids)], strict=False)]  # no image: no span
    end = len(ids)
    for span in reversed(spans):
        if span[1] == span[0] + 1:  # directly followed by another image token
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]
