"""llama.cpp's tokenizer (our converted GGUF) against Hugging Face's, and the chat prompt against HF's template.

Both vocabularies: the tiny trained BPE the parity tests use and the real 128k Llama-3 vocabulary
(from llama.cpp's vocab GGUF). The oracle is `tokenizers` / transformers reading the checkpoint's
own tokenizer.json and tokenizer_config.json; llama.cpp reads only the GGUF the converter wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llama3v.llama3_format import BEGIN_OF_TEXT, END_OF_TURN, LLAMA3_TEMPLATE
from llama3v.runtime.context import TextModel
from llama3v.runtime.prompt import Message, render
from llama3v.testing.bpe import train_tiny
from llama3v.testing.factory import IMAGE_TOKEN, TinySpec

LONG = (
    "Large language models read text as tokens. A tokenizer first splits the text with a regular expression "
    "(letters, up to 3 digits at a time, punctuation runs, whitespace), then merges bytes by rank.\n\n"
    "In 2024, Meta released Llama 3 (8B and 70B); its vocabulary has 128,256 entries - 128,000 merges plus "
    "256 reserved special tokens. Numbers such as 3.14159, 1,000,000 and 2^32 = 4294967296 are split into "
    "groups of three digits!\n\tIndented lines, trailing spaces   \n   and leading ones; quotes \"like this\" "
    "and 'that', URLs like https://example.com/a?b=c&d=e#f, e-mail me@example.org, code `x += 1; y--`.\n"
    "Mixed scripts: naïve café, Straße, 東京 and 北京, Ελλάδα, Москва, 서울, القاهرة, मुंबई. 🦙🐪🐫\n"
) * 3

STRINGS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "leading spaces": "   three leading spaces",
    "trailing spaces": "two trailing spaces  ",
    "multiple spaces": "a  b   c    d",
    "only spaces": "     ",
    "newline": "one\ntwo",
    "blank line": "para one\n\npara two",
    "newlines and spaces": "  \n  x \n\n\n y\n",
    "crlf": "line\r\nnext\r\n",
    "digits": "1 12 123 1234 1234567 3.14159 $1,000,000",
    "contractions": "don't I'll WE'RE she's they've I'd you'RE",
    "punctuation": "...!!!??? --==>> <<(([[{{}}]]))'' \"quoted\"",
    "accents": "é ñ café niño façade e\u0301",
    "cjk": "日本語のテキスト 第3章",
    "greek": "Ελληνικά κείμενα",
    "other scripts": "한국어 مرحبا नमस्ते Привет",
    "emoji": "🦙 llama 👨\u200d👩\u200d👧 😀😀!",
    "unicode digits and spaces": "１２３ Ⅻ x\u00a0y\u3000z a\u200bb",
    "tabs": "\tone\t\ttwo\t",
    # Whole words that are vocabulary entries but that rank-ordered merging would split: HF and llama.cpp
    # both take the entry as is (`ignore_merges`); see test_ignore_merges_string_discriminates.
    "vietnamese": "Tiếng Việt: nhiều việc hợp",
    "long paragraph": LONG,
    "empty": "",
    "special tokens": "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "special tokens glued to text": "x<|eot_id|>y <|begin_of_text|> <image>z",
    "special look-alikes": "<|eot_id|  <|start_header_id >",
}
SPECIAL_FREE = [k for k, s in STRINGS.items() if "<|" not in s and "<image>" not in s]


@dataclass
class Pair:
    vocab: str
    ckpt: Path
    model: TextModel
    fast: PreTrainedTokenizerFast  # tokenizer.json alone
    auto: object  # the checkpoint directory as transformers loads it (tokenizer_config.json, chat template)


@pytest.fixture(scope="module", params=["tiny", "llama3"])
def pair(request, tiny):
    """A converted checkpoint per vocabulary, loaded by llama.cpp and by transformers (built once per session)."""
    built = tiny(TinySpec(vocab=request.param))
    model = TextModel(built.model)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(built.ckpt / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(built.ckpt)
    yield Pair(request.param, built.ckpt, model, fast, auto)
    model.close()


def test_vocabularies_agree(pair):
    # The BPE's entries and specials, + llava-hf's <image> token after them.
    expected = train_tiny().vocab_size + 1 if pair.vocab == "tiny" else 128_256 + 1
    assert pair.model.n_vocab == len(pair.fast) == len(pair.auto) == expected
    assert pair.model.bos_text == pair.auto.bos_token == BEGIN_OF_TEXT
    for text in (BEGIN_OF_TEXT, END_OF_TURN, IMAGE_TOKEN):
        (tid,) = pair.fast.encode(text, add_special_tokens=False)
        assert pair.model.token_text(tid) == text


@pytest.mark.parametrize("name", list(STRINGS))
def test_llama_cpp_tokenizes_as_hf(pair, name):
    text = STRINGS[name]
    want = pair.fast.encode(text, add_special_tokens=False)
    assert pair.fast.encode(text) == want  # our tokenizer.json adds no BOS of its own (the template writes it)
    assert pair.auto.encode(text, add_special_tokens=False) == want
    got = pair.model.tokenize(text)
    assert got == want, f"{name}: llama.cpp {got[:40]} vs HF {want[:40]}"
    if text:
        assert len(got) < len(text.encode()) or pair.vocab == "tiny"  # the real vocabulary does merge


def test_long_text_tokenizes_as_hf(pair):
    text = LONG * 20  # ~60k characters
    want = pair.fast.encode(text, add_special_tokens=False)
    assert pair.model.tokenize(text) == want


def test_ignore_merges_string_discriminates(pair):
    """Without ignore_merges the 'vietnamese' string tokenizes differently in the real vocabulary, so the equality
    above means something there; the tiny vocabulary, trained by merging, has no such entries."""
    doc = json.loads((pair.ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["model"]["ignore_merges"] is True
    doc["model"]["ignore_merges"] = False
    by_merges = HFTokenizer.from_str(json.dumps(doc)).encode(STRINGS["vietnamese"], add_special_tokens=False).ids
    ours = pair.model.tokenize(STRINGS["vietnamese"])
    if pair.vocab == "llama3":
        assert len(ours) < len(by_merges)
    else:
        assert ours == by_merges


@pytest.mark.parametrize("name", SPECIAL_FREE)
def test_pieces_round_trip(pair, name):
    text = STRINGS[name]
    ids = pair.model.tokenize(text)
    assert b"".join(pair.model.piece(i) for i in ids).decode("utf-8") == text


def test_special_tokens_have_empty_pieces(pair):
    ids = pair.model.tokenize(STRINGS["special tokens"])
    assert [pair.model.piece(i) for i in ids][0] == b""
    text = b"".join(pair.model.piece(i) for i in ids).decode("utf-8")
    assert text == "user\n\nhi"  # header ids and <|eot_id|> render as nothing, the rest as itself


# ---- the chat prompt ----

def _hf_messages(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.text} for m in messages]


def _ours(pair: Pair, messages: list[Message]) -> tuple[list, list]:
    template = pair.model.chat_template
    assert template == LLAMA3_TEMPLATE == pair.auto.chat_template  # the GGUF carries the checkpoint's template
    return render(template, messages, pair.model.bos_text, pair.auto.eos_token)


def _hf(pair: Pair, hf_messages: list[dict]) -> tuple[str, list[int]]:
    text = pair.auto.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    ids = pair.auto.apply_chat_template(hf_messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return text, list(ids)


TEXT_CHATS = {
    "one turn": [Message("user", "Hi there")],
    "padded content": [Message("user", "  \n What is in the photo?\n\n ")],
    "multi-turn with system": [Message("system", "Be brief."), Message("user", "What is this?"),
                               Message("assistant", " A cat. "), Message("user", "And its colour?\n")],
}


@pytest.mark.parametrize("name", list(TEXT_CHATS))
def test_text_prompt_equals_hf_template(pair, name):
    messages = TEXT_CHATS[name]
    pieces, media = _ours(pair, messages)
    want_text, want_ids = _hf(pair, _hf_messages(messages))
    assert media == [] and pieces == [want_text]
    assert want_text.startswith(BEGIN_OF_TEXT)
    assert want_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = pair.model.tokenize(pieces[0])
    assert ids == want_ids
    bos = want_ids[0]
    assert pair.model.token_text(bos) == BEGIN_OF_TEXT and ids.count(bos) == 1


MEDIA_CHATS = {
    # (message text, number of images, the text HF's template is given for it)
    "marker mid-text": ("Hi <image> there", 1, "Hi <image> there"),
    "marker alone": ("<image>", 1, "<image>"),
    "marker after spaces": ("  <image>\nDescribe it.  ", 1, "  <image>\nDescribe it.  "),
    "two markers": ("Compare <image> and <image>.", 2, "Compare <image> and <image>."),
    "no marker": ("What is this?", 1, "<image>\nWhat is this?"),  # media without markers go first
}


@pytest.mark.parametrize("name", list(MEDIA_CHATS))
def test_media_prompt_equals_hf_template_with_the_marker(pair, name):
    text, n_images, hf_text = MEDIA_CHATS[name]
    messages = [Message("user", text, [("image", f"img{i}") for i in range(n_images)])]
    pieces, media = _ours(pair, messages)
    assert media == [("image", f"img{i}") for i in range(n_images)]
    assert [p for p in pieces if isinstance(p, int)] == list(range(n_images))
    want_text, want_ids = _hf(pair, [{"role": "user", "content": hf_text}])
    # Each media piece stands exactly where HF's template leaves the marker.
    assert "".join(IMAGE_TOKEN if isinstance(p, int) else p for p in pieces) == want_text
    # Tokenized piece by piece (as a session does), the image token in each media slot: HF's ids exactly.
    image_id = pair.fast.encode(IMAGE_TOKEN, add_special_tokens=False)[0]
    ids = [t for p in pieces for t in ([image_id] if isinstance(p, int) else pair.model.tokenize(p))]
    assert ids == want_ids
    bos = want_ids[0]
    assert ids.count(bos) == 1 and ids[0] == bos


def test_media_sentinel_sits_between_the_words(pair):
    pieces, _ = _ours(pair, [Message("user", "Hi <image> there", [("image", None)])])
    assert len(pieces) == 3 and pieces[1] == 0
    assert pieces[0] == f"{BEGIN_OF_TEXT}<|start_header_id|>user<|end_header_id|>\n\nHi "
    assert pieces[2] == " there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
