"""Write an mllama checkpoint as a model GGUF (architecture `mllama`) and an mmproj GGUF (projector `mllama`).

Model: the Llama-3 decoder under llama.cpp's names, Q/K of the self-attention layers permuted as for
`llama`, and each cross-attention layer under the names Ollama's libllama patch used (raw gate
values; the graph takes their tanh). The token embedding keeps HF's vocab + 8 rows; the output
head has vocab_size rows. Vision: clip.cpp's names for what it has (v.patch_embd, v.class_embd,
v.blk.N...), Ollama's for the mllama parts (tile tables, v.global.blk.N, gates); every vision gate is
stored as the factor the graph multiplies by (tanh, or 1 - tanh for the position embedding).
docs/formats.md lists every key and tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from llama3v import gguf_schema as S
from llama3v import mllama_format as M
from llama3v.converters import tensor_map
from llama3v.converters.llm import add_decoder_hparams, llama3_rope_factors, permute_rotary
from llama3v.converters.tokenizer import Vocab, load_vocab
from llama3v.errors import Llama3vError
from llama3v.gguf_writer import TensorPlan, write_gguf
from llama3v.hf.config import VISION_ACTIVATIONS
from llama3v.hf.mllama_key_formats import MllamaCheckpoint
from llama3v.quant.storage import encode, file_type, kept_precision, storage_type

# Cross-attention decoder layer: HF module -> GGUF part (matrices and norms get `.weight`).
CROSS_BLOCK = {
    "input_layernorm": "attn_norm",
    "cross_attn.q_proj": "cross_attn_q_proj",
    "cross_attn.k_proj": "cross_attn_k_proj",
    "cross_attn.v_proj": "cross_attn_v_proj",
    "cross_attn.o_proj": "cross_attn_o_proj",
    "cross_attn.q_norm": "cross_attn_q_norm",
    "cross_attn.k_norm": "cross_attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CROSS_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")
# Vision encoder layer: HF module -> clip.cpp part (q/k/v/o have no bias in mllama).
VISION_LAYER = {
    "self_attn.q_proj": (S.ATTN_Q, ("weight",)),
    "self_attn.k_proj": (S.ATTN_K, ("weight",)),
    "self_attn.v_proj": (S.ATTN_V, ("weight",)),
    "self_attn.o_proj": (S.ATTN_OUT, ("weight",)),
    "input_layernorm": (S.LN1, ("weight", "bias")),
    "post_attention_layernorm": (S.LN2, ("weight", "bias")),
    "mlp.fc1": (S.FFN_UP, ("weight", "bias")),
    "mlp.fc2": (S.FFN_DOWN, ("weight", "bias")),
}
VISION_PLAIN = {
    "vision.patch_embedding.weight": S.PATCH_EMBD,
    "vision.class_embedding": S.CLASS_EMBD,
    "vision.gated_positional_embedding.embedding": S.POSITION_EMBD,
    "vision.gated_positional_embedding.tile_embedding.weight": S.MLLAMA_TILE_POSITION_EMBD,
    "vision.pre_tile_positional_embedding.embedding.weight": S.MLLAMA_PRE_TILE_EMBD,
    "vision.post_tile_positional_embedding.embedding.weight": S.MLLAMA_POST_TILE_EMBD,
    "vision.layernorm_pre.weight": S.PRE_LN.format("weight"),
    "vision.layernorm_pre.bias": S.PRE_LN.format("bias"),
    "vision.layernorm_post.weight": S.MLLAMA_POST_LN.format("weight"),
    "vision.layernorm_post.bias": S.MLLAMA_POST_LN.format("bias"),
    "projector.weight": S.MLLAMA_PROJECTOR.format("weight"),
    "projector.bias": S.MLLAMA_PROJECTOR.format("bias"),
}
# Vision gates: GGUF name -> (HF gate, stored factor as a function of the raw gate).
_TANH, _ONE_MINUS_TANH = np.tanh, (lambda g: 1.0 - np.tanh(g))
VISION_GATES = {
    S.MLLAMA_POSITION_GATE: ("vision.gated_positional_embedding.gate", _ONE_MINUS_TANH),
    S.MLLAMA_TILE_POSITION_GATE: ("vision.gated_positional_embedding.gate", _TANH),
    S.MLLAMA_PRE_TILE_GATE: ("vision.pre_tile_positional_embedding.gate", _TANH),
    S.MLLAMA_POST_TILE_GATE: ("vision.post_tile_positional_embedding.gate", _TANH),
}
LAYERNORM_EPS_OUTER = 1e-5  # HF builds layernorm_pre / layernorm_post with LayerNorm's default eps


def _plan(ckpt: MllamaCheckpoint, src: str, dst: str, outtype: GGMLQuantizationType,
          transform: Callable[[np.ndarray], np.ndarray] | None = None) -> TensorPlan:
    shape = ckpt.shape(src)  # raises, naming the tensor, when the checkpoint lacks it

    def produce() -> np.ndarray:
        data = ckpt.get(src)
        return data if transform is None else transform(data).astype(np.float32)

    return TensorPlan(dst, shape, storage_type(dst, shape, outtype), produce)


def llm_plan(ckpt: MllamaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """The decoder's tensors: self-attention layers as `llama`, cross-attention layers under Ollama's names."""
    cfg = ckpt.config
    t = cfg.text
    emb_shape = ckpt.shape("text.embed_tokens.weight")
    if emb_shape != (cfg.n_embedding_rows, t.hidden_size):
        raise Llama3vError(f"text.embed_tokens.weight has shape {emb_shape}, expected "
                           f"({cfg.n_embedding_rows}, {t.hidden_size}): vocab_size + 8 rows")
    plans = [_plan(ckpt, "text.embed_tokens.weight", S.TOKEN_EMBD, outtype),
             _plan(ckpt, "text.norm.weight", S.OUTPUT_NORM, outtype),
             _plan(ckpt, "lm_head.weight", S.OUTPUT, outtype)]
    for bid in range(t.num_hidden_layers):
        pre = f"text.layers.{bid}."
        if bid in cfg.cross_attention_layers:
            for hf, part in CROSS_BLOCK.items():
                plans.append(_plan(ckpt, f"{pre}{hf}.weight", S.LLM_BLOCK.format(bid=bid, part=part), outtype))
            for gate in CROSS_GATES:
                plans.append(_plan(ckpt, pre + gate, S.MLLAMA_CROSS_GATE.format(bid=bid, part=gate), outtype))
            continue
        for hf, part in tensor_map.LLM_BLOCK.items():
            src, dst = f"{pre}{hf}.weight", S.LLM_BLOCK.format(bid=bid, part=part)
            n_head = {"attn_q": t.num_attention_heads, "attn_k": t.num_key_value_heads}.get(part)
            plans.append(_plan(ckpt, src, dst, outtype, None if n_head is None else
                               (lambda w, n=n_head: permute_rotary(w, n))))
    if t.rope_scaling is not None:
        factors = llama3_rope_factors(t)
        plans.append(TensorPlan(S.ROPE_FREQS, factors.shape, storage_type(S.ROPE_FREQS, factors.shape, outtype),
                                lambda: factors))
    return plans


def mmproj_plan(ckpt: MllamaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """The vision encoder's and projector's tensors, gates stored as the factors the graph multiplies by."""
    v = ckpt.config.vision
    plans = [_plan(ckpt, src, dst, outtype) for src, dst in VISION_PLAIN.items()]
    plans += [_plan(ckpt, src, dst, outtype, fn) for dst, (src, fn) in VISION_GATES.items()]
    for group, n, block in (("transformer", v.num_hidden_layers, S.VISION_BLOCK),
                            ("global_transformer", v.num_global_layers, S.MLLAMA_GLOBAL_BLOCK)):
        for bid in range(n):
            pre = f"vision.{group}.layers.{bid}."
            for hf, (part, kinds) in VISION_LAYER.items():
                plans += [_plan(ckpt, f"{pre}{hf}.{kind}", block.format(bid=bid, part=part, kind=kind), outtype)
                          for kind in kinds]
            if group == "global_transformer":
                plans += [_plan(ckpt, pre + hf, S.MLLAMA_GLOBAL_GATE.format(bid=bid, part=part), outtype, _TANH)
                          for hf, part in (("gate_attn", "attn_gate"), ("gate_ffn", "ffn_gate"))]
    proj = ckpt.shape("projector.weight")
    if proj != (ckpt.config.text.hidden_size, v.vision_output_dim):
        raise Llama3vError(f"projector weight has shape {proj}, expected "
                           f"({ckpt.config.text.hidden_size}, {v.vision_output_dim})")
    return plans


def write_llm(ckpt: MllamaCheckpoint, path: Path, outtype: GGMLQuantizationType, plans: list[TensorPlan],
              vocab: Vocab, progress: Callable[[str], None] | None = None) -> None:
    """Write the decoder (`llm_plan`'s tensors) and tokenizer as an `mllama` GGUF at `path` (atomically)."""
    cfg = ckpt.config

    def metadata(w: GGUFWriter) -> None:
        w.add_name(ckpt.root.name)
        w.add_file_type(file_type(outtype))
        add_decoder_hparams(w, cfg.text)
        w.add_array(S.MLLAMA_CROSS_ATTENTION_LAYERS, list(cfg.cross_attention_layers))
        w.add_uint32(S.MLLAMA_IMAGE_TOKEN_ID, cfg.image_token_index)
        vocab.add_to(w)

    write_gguf(path, S.MLLAMA_LLM_ARCH, metadata, plans, encode, progress)


def load_mllama_vocab(ckpt: MllamaCheckpoint) -> Vocab:
    """The tokenizer with <|image|> at the config's image_token_index (usually vocab_size); refuse one without it."""
    cfg = ckpt.config
    vocab = load_vocab(ckpt.main, max(cfg.text.vocab_size, cfg.image_token_index + 1))
    got = vocab.tokens[cfg.image_token_index]
    if got != M.IMAGE_TOKEN:
        raise Llama3vError(f"{ckpt.root}: token {cfg.image_token_index} (image_token_index) is {got!r}, "
                           f"not {M.IMAGE_TOKEN!r}: the tokenizer lacks the image token")
    return vocab


def write_mmproj(ckpt: MllamaCheckpoint, path: Path, outtype: GGMLQuantizationType, plans: list[TensorPlan],
                 progress: Callable[[str], None] | None = None) -> None:
    """Write the vision encoder and projector (`mmproj_plan`'s tensors) as an mmproj GGUF at `path` (atomically)."""
    cfg = ckpt.config
    v = cfg.vision
    use_gelu, use_silu = VISION_ACTIVATIONS[v.hidden_act]

    def metadata(w: GGUFWriter) -> None:
        w.add_name(f"{ckpt.root.name} vision")
        w.add_file_type(file_type(outtype))
        w.add_bool(S.HAS_VISION_ENCODER, True)
        w.add_string(S.PROJECTOR_TYPE, S.MLLAMA_PROJECTOR_TYPE)
        w.add_bool(S.USE_GELU, use_gelu)
        w.add_bool(S.USE_SILU, use_silu)
        w.add_uint32(S.IMAGE_SIZE, v.image_size)
        w.add_uint32(S.PATCH_SIZE, v.patch_size)
        w.add_uint32(S.EMBEDDING_LENGTH, v.hidden_size)
        w.add_uint32(S.FEED_FORWARD_LENGTH, v.intermediate_size)
        w.add_uint32(S.BLOCK_COUNT, v.num_hidden_layers)
        w.add_uint32(S.PROJECTION_DIM, cfg.text.hidden_size)
        w.add_uint32(S.HEAD_COUNT, v.attention_heads)
        w.add_float32(S.LAYER_NORM_EPS, v.norm_eps)
        w.add_array(S.IMAGE_MEAN, list(cfg.image_mean))
        w.add_array(S.IMAGE_STD, list(cfg.image_std))
        w.add_string(S.PREPROCESS_MODE, S.MLLAMA_PREPROCESS_MODE)
        w.add_uint32(S.MLLAMA_MAX_NUM_TILES, v.max_num_tiles)
        w.add_array(S.MLLAMA_ASPECT_RATIOS, [n for grid in v.supported_aspect_ratios for n in grid])
        w.add_uint32(S.MLLAMA_GLOBAL_BLOCK_COUNT, v.num_global_layers)
        w.add_array(S.MLLAMA_INTERMEDIATE_LAYERS, list(v.intermediate_layers_indices))
        w.add_bool(S.MLLAMA_GATES_PRECOMPUTED, True)
        w.add_float32(S.MLLAMA_OUTER_LN_EPS, LAYERNORM_EPS_OUTER)
        w.add_string(S.PROJECTOR_KIND, "linear")
        w.add_array(S.KEPT_PRECISION, kept_precision(plans, outtype))

    write_gguf(path, S.CLIP_ARCH, metadata, plans, encode, progress)
