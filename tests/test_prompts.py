"""Each family's prompt, as llama3v builds it from the converted GGUF, equals the original code's.

The oracles are the original projects' documented prompt construction, rebuilt here from their
format (not their code): Bunny's and LLaVA's `Conversation.get_prompt` with `SeparatorStyle.TWO`
and their `tokenizer_image_token` (split the prompt at `<image>`, tokenize each chunk with the
checkpoint's tokenizer, which prepends BOS as Llama-3's does, and keep one BOS), xtuner's
`llama3_chat` template with its chat tool's tokenization, and, for llava-hf, transformers' own
`LlavaProcessor.apply_chat_template`. llama3v's side reads only the GGUF the converter wrote.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

from llama3v.chat_formats import FORMATS
from llama3v.converters.convert import convert
from llama3v.errors import Llama3vError, Llama3vWarning
from llama3v.llama3_format import BEGIN_OF_TEXT, LLAMA3_TEMPLATE
from llama3v.runtime.context import TextModel
from llama3v.runtime.prompt import Message, render
from llama3v.testing.factory import IMAGE_TOKEN, TinySpec, make_checkpoint

CURIOUS_USER = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# The template llava-hf ships in chat_template.json for llava-1.5-7b-hf (a data file of the checkpoint).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPEC = TinySpec(vision="siglip", vision_act="gelu_pytorch_tanh")
# A LLaVA-1.5 training run's config.json carries these (llava/train/train.py); xtuner's converter writes
# `use_mm_proj` and `unfreeze_mm_vision_tower` instead.
LLAVA_TRAIN_KEYS = {"model_type": "llava", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
                    "mm_projector_lr": None, "tokenizer_model_max_length": 2048, "use_mm_proj": True}
XTUNER_KEYS = {"model_type": "llava", "use_mm_proj": True, "unfreeze_mm_vision_tower": True}


@dataclass
class Family:
    name: str
    ckpt: Path
    model: TextModel
    mmproj: Path
    hf: object  # the checkpoint's tokenizer, as transformers loads it (prepends BOS, as Llama-3's does)

    def ours(self, messages: list[Message]) -> list[int | None]:
        """llama3v's prompt ids from the GGUF's template, None where each media item goes."""
        pieces, _ = render(self.model.chat_template, messages, self.model.bos_text, self.model.eos_text)
        return [t for p in pieces for t in ([None] if isinstance(p, int) else self.model.tokenize_prompt(p))]

    def image_token_ids(self, prompt: str) -> list[int | None]:
        """LLaVA's / Bunny's tokenizer_image_token: chunks between `<image>` tokenized alone, one BOS kept."""
        chunks = [self.hf(c).input_ids for c in prompt.split(IMAGE_TOKEN)]
        bos = self.hf.bos_token_id
        offset = 1 if chunks[0] and chunks[0][0] == bos else 0
        ids: list[int | None] = chunks[0][:offset]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(None)
            ids += chunk[offset:]
        return ids


def _bos_adding_tokenizer(ckpt: Path) -> None:
    """Give the tokenizer Llama-3's post-processor (BOS before every encoded text), as the real checkpoints have."""
    path = ckpt / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    bos_id = next(t["id"] for t in doc["added_tokens"] if t["content"] == BEGIN_OF_TEXT)
    doc["post_processor"] = {"type": "Sequence", "processors": [
        doc["post_processor"],
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {BEGIN_OF_TEXT: {"id": BEGIN_OF_TEXT, "ids": [bos_id], "tokens": [BEGIN_OF_TEXT]}}}]}
    path.write_text(json.dumps(doc), encoding="utf-8")


def _drop_template(ckpt: Path) -> None:
    path = ckpt / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("chat_template")
    path.write_text(json.dumps(config), encoding="utf-8")


def build_family(root: Path, name: str, chat_template: str | None = None) -> tuple[Path, Path, Path]:
    """A tiny checkpoint of the family (its config as the family writes it) and its converted GGUFs."""
    layout, extra, keep_template = {
        "bunny-llama": ("original", {"model_type": "bunny-llama"}, False),
        "vicuna_v1": ("original", LLAVA_TRAIN_KEYS, False),
        "xtuner": ("original", XTUNER_KEYS, True),  # ships Meta's template in tokenizer_config.json
        "xtuner-no-template": ("original", XTUNER_KEYS, False),
        "llava-hf": ("hf-5", {}, False),
        "unknown": ("hf-5", {}, False),
    }[name]
    ckpt = make_checkpoint(root / name, TinySpec(**{**SPEC.__dict__, "extra": extra}), layout)
    _bos_adding_tokenizer(ckpt)
    if not keep_template:
        _drop_template(ckpt)
    if name == "llava-hf":
        (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}), encoding="utf-8")
    model, mmproj = convert(ckpt, root / name / "gguf", "f32", "f32", chat_template=chat_template, force=True)
    return ckpt, model, mmproj


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("bunny-llama", "vicuna_v1", "xtuner", "llava-hf"):
        ckpt, model, mmproj = build_family(root, name)
        out[name] = Family(name, ckpt, TextModel(model), mmproj, AutoTokenizer.from_pretrained(ckpt))
    yield out
    for f in out.values():
        f.model.close()


def gguf_string(path: Path, key: str) -> str:
    field = GGUFReader(path).fields[key]
    return bytes(field.parts[field.data[0]]).decode()


# ---- the converter chooses the family's format ----

@pytest.mark.parametrize("name,expect", [("bunny-llama", "bunny-llama"), ("vicuna_v1", "vicuna_v1"),
                                         ("xtuner", "checkpoint:tokenizer_config.json"),
                                         ("llava-hf", "checkpoint:chat_template.json")])
def test_the_gguf_carries_the_family_format(families, name, expect):
    f = families[name]
    model_path = next((f.ckpt / "gguf").glob("model-*.gguf"))
    assert gguf_string(model_path, "llama3v.chat.format") == expect == f.model.chat_format
    if expect in FORMATS:
        assert f.model.chat_template == FORMATS[expect].template
    elif name == "xtuner":
        assert f.model.chat_template == LLAMA3_TEMPLATE  # Meta's, as the checkpoint ships it
    else:
        assert f.model.chat_template == LLAVA_HF_TEMPLATE


def test_xtuner_config_without_template_gets_llama3(tmp_path):
    _, model, _ = build_family(tmp_path, "xtuner-no-template")
    assert gguf_string(model, "llama3v.chat.format") == "llama3"


def test_unknown_family_warns_and_assumes_llama3(tmp_path):
    with pytest.warns(Llama3vWarning, match="assuming Llama-3's prompt format"):
        _, model, _ = build_family(tmp_path, "unknown")
    assert gguf_string(model, "llama3v.chat.format") == "llama3"
    assert gguf_string(model, "tokenizer.chat_template") == FORMATS["llama3"].template


def test_chat_template_override_by_name_and_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice assumes nothing
        _, model, _ = build_family(tmp_path / "a", "unknown", chat_template="vicuna_v1")
    assert gguf_string(model, "llama3v.chat.format") == "vicuna_v1"
    template = tmp_path / "mine.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    _, model, _ = build_family(tmp_path / "b", "bunny-llama", chat_template=str(template))
    assert gguf_string(model, "llama3v.chat.format") == "file:mine.jinja"
    assert gguf_string(model, "tokenizer.chat_template") == template.read_text()
    with pytest.raises(Llama3vError, match="neither a known format"):
        build_family(tmp_path / "c", "bunny-llama", chat_template="no-such-format")


# ---- Bunny and LLaVA-1.5: SeparatorStyle.TWO ----

def two_style_prompt(system: str, sep2: str, turns: list[tuple[str, str | None]], image: bool) -> str:
    """Conversation.get_prompt (SeparatorStyle.TWO, sep ' '): the image message becomes '<image>\\n' + its
    text without the marker, stripped; 'ROLE: msg' + seps[i % 2]; 'ROLE:' for the message to generate."""
    messages = [(role, msg) for role, msg in turns]
    if image:
        role, msg = messages[0]
        messages[0] = (role, "<image>\n" + msg.replace("<image>", "").strip())
    seps = [" ", sep2]
    ret = system + seps[0]
    for i, (role, msg) in enumerate(messages):
        ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return ret


TWO_STYLE_CHATS = {
    # name: (our messages, the conversation's (role, message) list, image in the first message)
    "image, no marker": ([Message("user", "What is in the photo?", [("image", "a")])],
                         [("USER", "What is in the photo?"), ("ASSISTANT", None)], True),
    "image, padded text": ([Message("user", "  Describe it. \n", [("image", "a")])],
                           [("USER", "  Describe it. \n"), ("ASSISTANT", None)], True),
    "text only": ([Message("user", "Hi there")], [("USER", "Hi there"), ("ASSISTANT", None)], False),
    "multi-turn": ([Message("user", "What is this?", [("image", "a")]), Message("assistant", "A cat."),
                    Message("user", "And its colour?")],
                   [("USER", "What is this?"), ("ASSISTANT", "A cat."), ("USER", "And its colour?"),
                    ("ASSISTANT", None)], True),
    "three turns": ([Message("user", "Count the shapes.", [("image", "a")]), Message("assistant", "Three."),
                     Message("user", "Which is red?"), Message("assistant", "The square."),
                     Message("user", "Where is it?")],
                    [("USER", "Count the shapes."), ("ASSISTANT", "Three."), ("USER", "Which is red?"),
                     ("ASSISTANT", "The square."), ("USER", "Where is it?"), ("ASSISTANT", None)], True),
}


@pytest.mark.parametrize("family,sep2", [("bunny-llama", "<|end_of_text|>"), ("vicuna_v1", "</s>")])
@pytest.mark.parametrize("chat", list(TWO_STYLE_CHATS))
def test_two_style_prompt_ids_equal_the_original(families, family, sep2, chat):
    f = families[family]
    messages, turns, image = TWO_STYLE_CHATS[chat]
    want = f.image_token_ids(two_style_prompt(CURIOUS_USER, sep2, turns, image))
    got = f.ours(messages)
    assert got == want
    assert got.count(None) == int(image) and got[0] == f.hf.bos_token_id and got.count(got[0]) == 1
    if family == "bunny-llama" and chat == "multi-turn":  # the answer ends in the control token, as Bunny's sep2
        assert got.count(f.hf.convert_tokens_to_ids("<|end_of_text|>")) == 1


def test_a_system_message_replaces_the_default_system_text(families):
    f = families["bunny-llama"]
    messages = [Message("system", "Answer briefly."), Message("user", "What is it?", [("image", "a")])]
    want = f.image_token_ids(two_style_prompt("Answer briefly.", "<|end_of_text|>",
                                              [("USER", "What is it?"), ("ASSISTANT", None)], True))
    assert f.ours(messages) == want


# ---- xtuner llava-llama-3: Llama-3's template, the image first ----

def test_xtuner_prompt_ids_equal_the_original(families):
    f = families["xtuner"]
    text = "What is in the photo?"
    # xtuner/tools/chat.py: '<image>\n' + text into llama3_chat's INSTRUCTION; the chunk before the image
    # encoded with BOS, the one after without.
    prompt = ("<|start_header_id|>user<|end_header_id|>\n\n" + IMAGE_TOKEN + "\n" + text + "<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    before, after = prompt.split(IMAGE_TOKEN)
    want = f.hf.encode(before) + [None] + f.hf.encode(after, add_special_tokens=False)
    assert f.ours([Message("user", text, [("image", "a")])]) == want


# ---- llava-hf: the processor's apply_chat_template ----

LLAVA_HF_CHATS = {
    "image first": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "two images": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                {"type": "text", "text": "Compare them."}]}],
    "multi-turn": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                   {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}],
}


@pytest.mark.parametrize("chat", list(LLAVA_HF_CHATS))
def test_llava_hf_prompt_ids_equal_the_processor(families, chat):
    f = families["llava-hf"]
    image_processor = AutoImageProcessor.from_pretrained(f.ckpt)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=f.hf, chat_template=LLAVA_HF_TEMPLATE,
                               patch_size=SPEC.patch_size, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0)
    conversation = LLAVA_HF_CHATS[chat]
    picture = Image.fromarray(np.full((SPEC.image_size, SPEC.image_size, 3), 90, np.uint8))
    hf_conversation = [{**m, "content": [{**p, "image": picture} if p["type"] == "image" else p
                                         for p in m["content"]]} for m in conversation]
    out = processor.apply_chat_template(hf_conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(np.asarray(out["input_ids"]).reshape(-1))
    image_id = f.hf.convert_tokens_to_ids(IMAGE_TOKEN)
    want: list[int | None] = []
    for t in ids:  # the processor repeats the image token once per image row: one None per image
        if t != image_id:
            want.append(int(t))
        elif want[-1:] != [None]:
            want.append(None)
    n_images = sum(p["type"] == "image" for m in conversation for p in m["content"])
    assert ids.count(image_id) == n_images * (SPEC.image_size // SPEC.patch_size) ** 2
    messages = [Message(m["role"], "".join(p.get("text", "") for p in m["content"]),
                        [("image", "x") for p in m["content"] if p["type"] == "image"]) for m in conversation]
    assert f.ours(messages) == want and want.count(None) == n_images
    assert want[0] == f.hf.bos_token_id  # the template writes none: BOS as llava-hf's tokenizer adds it


# ---- the prompt format's own rules ----

def test_llama3_format_renders_as_metas_template():
    """The named llama3 format takes content parts too, and renders everything as Meta's template does."""
    chats = [[Message("user", "  Hi there \n")], [Message("user", " Describe it. ", [("image", "a"), ("image", "b")])],
             [Message("system", "Be brief."), Message("user", "What <image> is it?", [("image", "a")]),
              Message("assistant", " A cat. "), Message("user", "Colour?")]]
    for messages in chats:
        assert render(FORMATS["llama3"].template, messages, BEGIN_OF_TEXT, "<|end_of_text|>") == \
            render(LLAMA3_TEMPLATE, messages, BEGIN_OF_TEXT, "<|end_of_text|>")


def test_markers_keep_their_place(families):
    f = families["bunny-llama"]
    pieces, media = render(f.model.chat_template, [Message("user", "Compare <image> with <image>.",
                                                           [("image", "a"), ("image", "b")])],
                           BEGIN_OF_TEXT, "<|end_of_text|>")
    assert media == [("image", "a"), ("image", "b")]
    assert [p if isinstance(p, int) else str(p) for p in pieces] == [
        BEGIN_OF_TEXT + CURIOUS_USER + " USER: Compare ", 0, " with ", 1, ". ASSISTANT:"]


TYPED = "say <|eot_id|> and <|end_of_text|> now"


@pytest.mark.parametrize("family", ["bunny-llama", "xtuner", "llava-hf"])
def test_user_text_is_plain_and_template_tokens_are_control(families, family):
    """A user who types a control token's text gets those characters; the template's control tokens stay."""
    f = families[family]

    def hf(text: str, split: bool) -> list[int]:
        return f.hf(text, add_special_tokens=False, split_special_tokens=split).input_ids

    assert hf(TYPED, True) != hf(TYPED, False), "the typed text holds control tokens' text"
    bos = [f.hf.bos_token_id]
    if family == "bunny-llama":  # no control token in the template around the user's text
        want = bos + hf(f"{CURIOUS_USER} USER: {TYPED} ASSISTANT:", True)
    elif family == "llava-hf":
        want = bos + hf(f"USER: {TYPED} ASSISTANT:", True)
    else:  # Llama-3's headers are control tokens; the user's text between them is plain
        want = (hf(f"{BEGIN_OF_TEXT}<|start_header_id|>user<|end_header_id|>", False) + hf("\n\n" + TYPED, True)
                + hf("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False))
    got = f.ours([Message("user", TYPED)])
    assert got == want
    assert TYPED in b"".join(f.model.piece(t) for t in got).decode()


def test_run_json_reports_the_template(families, capsys, picture):
    from llama3v.cli import main

    f = families["bunny-llama"]
    model = next((f.ckpt / "gguf").glob("model-*.gguf"))
    args = ["run", "--model", str(model), "--mmproj", str(f.mmproj), "--image", str(picture), "-p", "What is it?",
            "-n", "2", "--temp", "0", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chat_template"] == "bunny-llama"
    n_rows = (SPEC.image_size // SPEC.patch_size) ** 2
    prompt = result["prompt_tokens"]
    assert prompt.count(None) == n_rows
    collapsed = [t for i, t in enumerate(prompt) if t is not None or (i and prompt[i - 1] is not None)]
    want = f.image_token_ids(two_style_prompt(CURIOUS_USER, "<|end_of_text|>",
                                              [("USER", "What is it?"), ("ASSISTANT", None)], True))
    assert collapsed == want
    assert main([*args, "--chat-template", "vicuna_v1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chat_template"] == "vicuna_v1"
