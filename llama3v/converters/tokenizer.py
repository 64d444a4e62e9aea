"""Read a byte-level BPE tokenizer (tokenizer.json) and choose its chat template for GGUF.

Two families are accepted, each recognised by its exact pre-tokenizer: Llama-3's (llama.cpp's
"llama-bpe") and SmolLM2's (single digits, then GPT-2's split; llama.cpp's "smollm"), which the
embedded tiny model uses. SmolLM2 is not Llama-3: it keeps its own vocabulary, BOS setting and
ChatML template, and it must bring that template (no Llama-3 fallback for it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType

from llama3v import gguf_schema as S
from llama3v.chat_formats import FORMATS, ChatFormat, resolve
from llama3v.errors import Llama3vError, Llama3vWarning
from llama3v.hf.checkpoint import Checkpoint
from llama3v.hf.key_formats import LlavaCheckpoint
from llama3v.llama3_format import LLAMA_CPP_PRE, PRETOKENIZE_REGEX

SMOLLM_PRE = "smollm"  # llama.cpp's pre-tokenizer type for SmolLM/SmolLM2 (not a Llama-3 tokenizer)


@dataclass
class Vocab:
    """Everything llama.cpp's tokenizer needs, in token-id order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    chat: ChatFormat
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
        w.add_chat_template(self.chat.template)
        w.add_string(S.CHAT_FORMAT, self.chat.name)


def load_vocab(ckpt: Checkpoint, vocab_size: int, chat: ChatFormat | None = None) -> Vocab:
    """Read tokenizer.json and tokenizer_config.json beside a checkpoint; the chat template is `chat`, else the
    checkpoint's own, else Llama-3's (a SmolLM2 tokenizer must bring its own)."""
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
    chat = chat or checkpoint_format(ckpt, config)
    if chat is None and not llama3:
        raise Llama3vError(f"{ckpt.root}: a SmolLM2 tokenizer without its chat template")
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        bos_id=_token_id(config.get("bos_token"), index, "<|begin_of_text|>" if llama3 else None),
        eos_id=_token_id(config.get("eos_token"), index, "<|end_of_text|>" if llama3 else None),
        chat=chat or FORMATS["llama3"],
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


def checkpoint_format(ckpt: Checkpoint, tokenizer_config: dict) -> ChatFormat | None:
    """The template a checkpoint ships: the processor's chat_template.jinja / chat_template.json, then
    tokenizer_config.json's."""
    template, source = ckpt.read_text("chat_template.jinja"), "chat_template.jinja"
    if not template:
        template, source = (ckpt.read_json("chat_template.json") or {}).get("chat_template"), "chat_template.json"
    if not template:
        template, source = tokenizer_config.get("chat_template"), "tokenizer_config.json"
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        return None
    if not isinstance(template, str):
        raise Llama3vError(f"{ckpt.root}: the chat template in {source} is not a string")
    return ChatFormat(f"checkpoint:{source}", template, str(ckpt.root / source))


def choose_chat_format(llava: LlavaCheckpoint, override: str | None = None) -> ChatFormat:
    """The format a LLaVA checkpoint was trained with: `override` (a --chat-template NAME or FILE), else its own
    template, else its family's, else Llama-3's with a warning."""
    if override:
        return resolve(override)
    ckpt = llava.main
    own = checkpoint_format(ckpt, ckpt.read_json("tokenizer_config.json") or {})
    if own is not None:
        return own
    family = family_format(llava)
    if family is None:
        warnings.warn(f"{ckpt.root}: no chat template and no known family in config.json; assuming Llama-3's "
                      "prompt format (choose another with --chat-template)", Llama3vWarning, stacklevel=2)
        return FORMATS["llama3"]
    return family


# Keys LLaVA's own training script (llava/train/train.py) writes into config.json: a checkpoint from the
# conv_mode era, trained on a `vicuna_v1`-style conversation. xtuner's converter writes none of them.
_LLAVA_TRAIN_KEYS = ("tune_mm_mlp_adapter", "tokenizer_model_max_length", "mm_projector_lr", "freeze_mm_mlp_adapter")


def family_format(llava: LlavaCheckpoint) -> ChatFormat | None:
    """The prompt format a template-less checkpoint's family was trained with, when its config names one."""
    config = llava.main.config
    if config.get("model_type") in ("bunny-llama", "bunny_llama"):
        return FORMATS["bunny-llama"]
    if llava.key_format == "llava-original" and any(k in config for k in _LLAVA_TRAIN_KEYS):
        return FORMATS["vicuna_v1"]
    if llava.key_format == "llava-original" and config.get("model_type") == "llava" and "use_mm_proj" in config:
        return FORMATS["llama3"]  # xtuner's llava-llama-3 (convert_xtuner_weights_to_llava.py): Llama-3's template
    return None
