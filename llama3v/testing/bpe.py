"""Tokenizers for built checkpoints, as Hugging Face tokenizer.json files in the Llama-3 format.

Two sources: a tiny byte-level BPE trained here on a fixed text (a small vocabulary keeps random
models' logits away from near-ties, which parity tests need), and the real Llama-3 vocabulary
taken from the vocab GGUF that llama.cpp ships in the llama-cpp-python sdist.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llama3v.errors import Llama3vError
from llama3v.gguf_header import read_gguf
from llama3v.llama3_format import BEGIN_OF_TEXT, END_OF_TEXT, LLAMA3_TEMPLATE, PRETOKENIZE_REGEX, SPECIAL_TOKENS
from llama3v.paths import LLAMA_CPP_PYTHON_VERSION, cache_dir, engine_sdist

CORPUS = """\
A photo shows a red square beside a blue circle on a white table. The picture is bright and clear.
What is in the image? There is a small green triangle, a yellow line and two black dots near the
corner. The sky above the hills is blue, the grass is green and the sun is low in the west.
Describe the scene: a cat sits on a chair by the window, looking at the birds outside. Colors,
shapes and positions matter: left, right, top, bottom, center. Count the objects one by one.
The answer is short. The video shows a ball moving from the left to the right, then it stops.
"""
_VOCAB_MEMBER = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf"


@dataclass
class Tokenizer:
    """A byte-level BPE: normal tokens by id (GPT-2 byte-to-unicode strings), merges, special tokens."""

    tokens: list[str]
    merges: list[str]
    special: dict[str, int]

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included."""
        return len(self.tokens) + len(self.special)

    def write(self, out: Path, extra_special: dict[str, int] | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the Llama-3 chat template) to `out`."""
        special = {**self.special, **(extra_special or {})}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for t, i in sorted(special.items(), key=lambda x: x[1])]
        doc = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                               "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {t: i for i, t in enumerate(self.tokens)}, "merges": self.merges},
        }
        config = {"bos_token": BEGIN_OF_TEXT, "eos_token": END_OF_TEXT, "clean_up_tokenization_spaces": False,
                  "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
                  "chat_template": LLAMA3_TEMPLATE}
        _write_json(out / "tokenizer.json", doc)
        _write_json(out / "tokenizer_config.json", config)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def train_tiny(n_merges: int = 200, corpus: str = CORPUS) -> Tokenizer:
    """Train a byte-level BPE with `n_merges` merges on `corpus`; Llama-3 special tokens follow."""
    enc = byte_to_unicode()
    # Training only needs some word split; encoding later uses the Llama-3 regex on both sides.
    words = Counter(tuple(enc[b] for b in w.encode()) for w in re.findall(r" ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+", corpus))
    tokens = [enc[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken deterministically
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        words = Counter({_merge(w, best): c for w, c in words.items()})
    special = {t: len(tokens) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return Tokenizer(tokens, merges, special)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def llama3_tokenizer(sdist: Path | None = None) -> Tokenizer:
    """The real Llama-3 vocabulary (128k BPE + 256 special tokens) from llama.cpp's vocab GGUF."""
    sdist = sdist or engine_sdist()
    vocab_file = cache_dir() / "ggml-vocab-llama-bpe.gguf"
    if not vocab_file.is_file():
        if not sdist.is_file():
            raise Llama3vError(f"{sdist}: llama-cpp-python sdist not found (`make setup` fetches it)")
        with tarfile.open(sdist) as tar:
            try:
                data = tar.extractfile(_VOCAB_MEMBER).read()
            except KeyError:
                raise Llama3vError(f"{sdist}: has no {_VOCAB_MEMBER}") from None
        tmp = vocab_file.with_suffix(".partial")
        tmp.write_bytes(data)
        tmp.replace(vocab_file)
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    info = read_gguf(vocab_file, arrays=keys)
    texts, kinds, merges = (info.get(k) for k in keys)
    n_normal = next(i for i, k in enumerate(kinds) if k != 1)
    special = {t: i for i, t in enumerate(texts) if i >= n_normal}
    return Tokenizer(texts[:n_normal], merges, special)


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
