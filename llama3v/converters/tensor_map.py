"""Declarative maps from canonical checkpoint names (see llama3v/hf/key_formats.py) to GGUF tensor names.

`{bid}` stands for a block index. One table per file kind; the writers walk these tables, so a
tensor the model needs and the checkpoint lacks is reported by name.
"""

from __future__ import annotations

from llama3v import gguf_schema as S

# Vision tower, per block: HF module -> libmtmd part. fc1 is the up projection, fc2 the down.
VISION_BLOCK = {
    "self_attn.q_proj": S.ATTN_Q,
    "self_attn.k_proj": S.ATTN_K,
    "self_attn.v_proj": S.ATTN_V,
    "self_attn.out_proj": S.ATTN_OUT,
    "layer_norm1": S.LN1,
    "layer_norm2": S.LN2,
    "mlp.fc1": S.FFN_UP,
    "mlp.fc2": S.FFN_DOWN,
}

VISION_EMBEDDINGS = {
    "vision.embeddings.patch_embedding.weight": S.PATCH_EMBD,
    "vision.embeddings.position_embedding.weight": S.POSITION_EMBD,
}
CLIP_ONLY = {
    "vision.embeddings.class_embedding": S.CLASS_EMBD,
    "vision.pre_layrnorm.weight": S.PRE_LN.format("weight"),
    "vision.pre_layrnorm.bias": S.PRE_LN.format("bias"),
}
SIGLIP_ONLY = {
    "vision.embeddings.patch_embedding.bias": S.PATCH_BIAS,
}
NEXT_ONLY = {
    "image_newline": S.IMAGE_NEWLINE,
}
PROJECTOR = {
    "projector.linear_1.weight": S.PROJ_LAYER.format(idx=0, kind="weight"),
    "projector.linear_1.bias": S.PROJ_LAYER.format(idx=0, kind="bias"),
    "projector.linear_2.weight": S.PROJ_LAYER.format(idx=2, kind="weight"),
    "projector.linear_2.bias": S.PROJ_LAYER.format(idx=2, kind="bias"),
}

LLM_GLOBAL = {
    "text.embed_tokens.weight": S.TOKEN_EMBD,
    "text.norm.weight": S.OUTPUT_NORM,
    "lm_head.weight": S.OUTPUT,
}
LLM_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def vision_tensors(is_clip: bool, n_blocks: int) -> dict[str, str]:
    """Canonical -> GGUF names for a vision tower truncated to `n_blocks` blocks (projector excluded)."""
    out = dict(VISION_EMBEDDINGS)
    out.update(CLIP_ONLY if is_clip else SIGLIP_ONLY)
    for bid in range(n_blocks):
        for hf, part in VISION_BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"vision.encoder.layers.{bid}.{hf}.{kind}"] = S.VISION_BLOCK.format(bid=bid, part=part, kind=kind)
    return out


def llm_tensors(n_blocks: int, tied: bool) -> dict[str, str]:
    """Canonical -> GGUF names for a Llama decoder."""
    out = {k: v for k, v in LLM_GLOBAL.items() if not (tied and v == S.OUTPUT)}
    for bid in range(n_blocks):
        for hf, part in LLM_BLOCK.items():
            out[f"text.layers.{bid}.{hf}.weight"] = S.LLM_BLOCK.format(bid=bid, part=part)
    return out
