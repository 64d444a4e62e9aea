"""Read a Llama-3 style byte-level BPE tokenizer (tokenizer.json) and its chat template for GGUF."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGUFWriter, TokenType

from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import Checkpoint
from llama3v.llama3_format import LLAMA3_TEMPLATE, LLAMA_CPP_PRE, PRETOKENIZE_REGEX


@dataclass
class Vocab:
    """Everything llama.cpp's tokenizer needs, in token-id order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat_template: str

    def add_to(self, w: GGUFWriter) -> None:
        """Write the tokenizer.ggml.* keys and the chat template."""
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(LLAMA_CPP_PRE)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        w.add_bos_token_id(self.bos_id)
        w.add_eos_token_id(self.eos_id)
        w.add_add_bos_token(True)
        w.add_chat_template(self.chat_template)


def load_vocab(ckpt: Checkpoint, vocab_size: int) -> Vocab:
    """Read tokenizer.json, tokenizer_config.json and the chat template beside a checkpoint."""
    tok = ckpt.read_json("tokenizer.json")
    if tok is None:
        raise Llama3vError(f"{ckpt.root}: no tokenizer.json (llama3v needs the checkpoint's own tokenizer)")
    model = tok.get("model", {})
    if model.get("type") != "BPE" or not _is_llama3_pretokenizer(tok.get("pre_tokenizer")):
        raise Llama3vError(
            f"{ckpt.root}: tokenizer is not a Llama-3 byte-level BPE (llama3v converts Llama-3 decoders)")

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise Llama3vError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # checkpoints pad their embedding past the tokenizer
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config = ckpt.read_json("tokenizer_config.json") or {}
    index = {t: i for i, t in enumerate(tokens)}
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        bos_id=_token_id(config.get("bos_token"), index, "<|begin_of_text|>"),
        eos_id=_token_id(config.get("eos_token"), index, "<|end_of_text|>"),
        chat_template=_chat_template(ckpt, config),
    )


def _is_llama3_pretokenizer(pre: dict | None) -> bool:
    if not pre:
        return False
    steps = pre.get("pretokenizers", [pre])
    return any(s.get("type") == "Split" and s.get("pattern", {}).get("Regex") == PRETOKENIZE_REGEX for s in steps)


def _token_id(value: object, index: dict[str, int], default: str) -> int:
    text = value.get("content") if isinstance(value, dict) else value
    text = text or default
    if text not in index:
        raise Llama3vError(f"special token {text!r} is not in the vocabulary")
    return index[text]


def _chat_template(ckpt: Checkpoint, config: dict) -> str:
    """The checkpoint's template: tokenizer_config.json, chat_template.jinja or .json; else Llama-3's."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    template = template or ckpt.read_text("chat_template.jinja")
    if not template:
        template = (ckpt.read_json("chat_template.json") or {}).get("chat_template")
    return template or LLAMA3_TEMPLATE
