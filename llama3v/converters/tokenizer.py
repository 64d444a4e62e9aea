"""Read a byte-level BPE tokenizer (tokenizer.json) and its chat template for GGUF.

Two families are accepted, each recognised by its exact pre-tokenizer: Llama-3's (llama.cpp's
"llama-bpe") and SmolLM2's (single digits, then GPT-2's split; llama.cpp's "smollm"), which the
embedded tiny model uses. SmolLM2 is not Llama-3: it keeps its own vocabulary, BOS setting and
ChatML template, and it must bring that template (there is no fallback for it).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGUFWriter, TokenType

from llama3v.converters.checkpoint import Checkpoint
from llama3v.errors import Llama3vError
from llama3v.llama3_format import LLAMA3_TEMPLATE, LLAMA_CPP_PRE, PRETOKENIZE_REGEX

SMOLLM_PRE = "smollm"  # llama.cpp's pre-tokenizer type for SmolLM/SmolLM2 (not a Llama-3 tokenizer)


@dataclass
class Vocab:
    """Everything llama.cpp's tokenizer needs, in token-id order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat_template: str
    pre: str = LLAMA_CPP_PRE  # llama.cpp's pre-tokenizer name
    add_bos: bool = True

    def add_to(self, w: GGUFWriter) -> None:
        """Write the tokenizer.ggml.* keys and the chat template."""
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        w.add_bos_token_id(self.bos_id)
        w.add_eos_token_id(self.eos_id)
        w.add_add_bos_token(self.add_bos)
        w.add_chat_template(self.chat_template)


def load_vocab(ckpt: Checkpoint, vocab_size: int) -> Vocab:
    """Read tokenizer.json, tokenizer_config.json and the chat template beside a checkpoint."""
    tok = ckpt.read_json("tokenizer.json")
    if tok is None:
        raise Llama3vError(f"{ckpt.root}: no tokenizer.json (llama3v needs the checkpoint's own tokenizer)")
    model = tok.get("model", {})
    pre = _pretokenizer_name(tok.get("pre_tokenizer")) if model.get("type") == "BPE" else None
    if pre is None:
        raise Llama3vError(f"{ckpt.root}: tokenizer is neither a Llama-3 byte-level BPE nor SmolLM2's "
                           "(llama3v converts Llama-3 decoders and the SmolLM2 decoder of its tiny model)")

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
    llama3 = pre == LLAMA_CPP_PRE
    template = _chat_template(ckpt, config)
    if template is None and not llama3:
        raise Llama3vError(f"{ckpt.root}: a SmolLM2 tokenizer without its chat template")
    if llama3:
        bos_id = _token_id(config.get("bos_token"), index, "<|begin_of_text|>")
        eos_id = _token_id(config.get("eos_token"), index, "<|end_of_text|>")
    else:
        bos_id = _token_id(config.get("bos_token"), index, None)
        eos_id = _token_id(config.get("eos_token"), index, None)
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        bos_id=bos_id,
        eos_id=eos_id,
        chat_template=template or LLAMA3_TEMPLATE,
        pre=pre,
        # Llama-3 always starts with <|begin_of_text|>; SmolLM2's ChatML adds no BOS unless it says so.
        add_bos=llama3 or bool(config.get("add_bos_token", False)),
    )


def _pretokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: "llama-bpe", "smollm", or None if neither."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre])
    if any(s.get("type") == "Split" and s.get("pattern", {}).get("Regex") == PRETOKENIZE_REGEX for s in steps):
        return LLAMA_CPP_PRE
    # HF's SmolLM2: Digits(individual) then ByteLevel with GPT-2's regex, and nothing else.
    if [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") is True \
            and steps[1].get("use_regex", True) is True:
        return SMOLLM_PRE
    return None


def _token_id(value: object, index: dict[str, int], default: str | None) -> int:
    text = value.get("content") if isinstance(value, dict) else value
    text = text or default
    if text is None:
        raise Llama3vError("tokenizer_config.json names no BOS/EOS token")
    if text not in index:
        raise Llama3vError(f"special token {text!r} is not in the vocabulary")
    return index[text]


def _chat_template(ckpt: Checkpoint, config: dict) -> str | None:
    """The checkpoint's template: tokenizer_config.json, chat_template.jinja or .json; None if it has none."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    template = template or ckpt.read_text("chat_template.jinja")
    if not template:
        template = (ckpt.read_json("chat_template.json") or {}).get("chat_template")
    return template or None
