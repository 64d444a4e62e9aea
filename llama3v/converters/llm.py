"""Write the Llama-3 decoder of a LLaVA checkpoint as a llama.cpp `llama` GGUF."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from llama3v import gguf_schema as S
from llama3v.converters import tensor_map
from llama3v.converters.tokenizer import Vocab
from llama3v.gguf_writer import TensorPlan, write_gguf
from llama3v.hf.config import TextConfig
from llama3v.hf.key_formats import LlavaCheckpoint
from llama3v.progress import Progress
from llama3v.quant.storage import encode, file_type, storage_type


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: TextConfig) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, as llama.cpp reads them from rope_freqs."""
    s = cfg.rope_scaling
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    dim = cfg.n_head_dim
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llm_plan(ckpt: LlavaCheckpoint, outtype: GGMLQuantizationType) -> list[TensorPlan]:
    """The decoder's tensors in GGUF order, Q/K permuted, rope factors added when scaled."""
    cfg = ckpt.config.text
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    plans = []
    for src, dst in tensor_map.llm_tensors(cfg.num_hidden_layers, tied).items():
        shape = ckpt.shape(src)
        if src.endswith("q_proj.weight"):
            produce = _permuted(ckpt, src, cfg.num_attention_heads)
        elif src.endswith("k_proj.weight"):
            produce = _permuted(ckpt, src, cfg.num_key_value_heads)
        else:
            produce = _reader(ckpt, src)
        plans.append(TensorPlan(dst, shape, storage_type(dst, shape, outtype), produce))
    if cfg.rope_scaling is not None:
        factors = llama3_rope_factors(cfg)
        plans.append(TensorPlan(S.ROPE_FREQS, factors.shape, storage_type(S.ROPE_FREQS, factors.shape, outtype),
                                lambda: factors))
    return plans


def _reader(ckpt: LlavaCheckpoint, src: str) -> Callable[[], np.ndarray]:
    return lambda: ckpt.get(src)


def _permuted(ckpt: LlavaCheckpoint, src: str, n_head: int) -> Callable[[], np.ndarray]:
    return lambda: permute_rotary(ckpt.get(src), n_head)


def write_llm(ckpt: LlavaCheckpoint, path: Path, outtype: GGMLQuantizationType, plans: list[TensorPlan],
              vocab: Vocab, progress: Progress | None = None) -> None:
    """Write the checkpoint's decoder (`llm_plan`'s tensors) and tokenizer as a llama GGUF at `path` (atomically)."""
    cfg = ckpt.config.text

    def metadata(w: GGUFWriter) -> None:
        w.add_name(ckpt.name)
        w.add_file_type(file_type(outtype))
        add_decoder_hparams(w, cfg)
        vocab.add_to(w)

    write_gguf(path, S.LLM_ARCH, metadata, plans, encode, progress)


def add_decoder_hparams(w: GGUFWriter, cfg: TextConfig) -> None:
    """Write a Llama decoder's `<arch>.*` hyperparameters (shared by the llama and mllama files)."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.n_head_dim)
    w.add_key_length(cfg.n_head_dim)
    w.add_value_length(cfg.n_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
