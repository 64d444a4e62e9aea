"""The prompt formats llama3v knows by name, as chat templates, and how `--chat-template` picks one.

Each family of checkpoints was trained on one prompt format; the converter writes it into the LLM
GGUF (`tokenizer.chat_template`, plus its name under `llama3v.chat.format`) and the runtime renders
it. The templates below reproduce the original code's prompt strings (docs/prompts.md):

  llama3       Meta-Llama-3-Instruct's template (xtuner's llava-llama-3 trained on it)
  bunny-llama  Bunny's `llama` conversation (BAAI-DCAI/Bunny, bunny/conversation.py, conv_llama)
  vicuna_v1    LLaVA-1.5's `vicuna_v1` conversation (haotian-liu/LLaVA, llava/conversation.py)
  chatml       ChatML (`<|im_start|>role ... <|im_end|>`)

Message content is either a string (the runtime's media sentinels stand where the user put
markers) or, as Hugging Face processors pass it, a list of parts {"type": "image" | "video" |
"text"}. For a list, every template here puts each media item first, as `<image>\\n` (the place
the original code gives it: LLaVA and Bunny move the image before the stripped text, xtuner puts
it before the text), then the text parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llama3v.errors import Llama3vError


def _content(strip_text: bool) -> str:
    """A `content_of` macro: a string as it is; parts as media markers first, then the text (stripped, as
    LLaVA's and Bunny's get_prompt strip the image message; kept whole where the template trims anyway)."""
    text = "ns.text | trim" if strip_text else "ns.text"
    return (
        "{% macro content_of(content) %}"
        "{% if content is string %}{{ content }}"
        "{% else %}{% set ns = namespace(media='', text='') %}"
        "{% for part in content %}"
        "{% if part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}"
        "{% else %}{% set ns.media = ns.media + '<' + part['type'] + '>\\n' %}{% endif %}"
        f"{{% endfor %}}{{{{ ns.media + {text} }}}}"
        "{% endif %}"
        "{% endmacro %}"
    )


# Meta-Llama-3-Instruct's: BOS once, each message as header + trimmed content + <|eot_id|>.
LLAMA3 = _content(strip_text=False) + (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + content_of(message['content']) | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_CURIOUS_USER = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def _two_style(system: str, end_of_answer: str) -> str:
    """LLaVA's and Bunny's `SeparatorStyle.TWO`: system + ' ', then 'USER: msg ' and 'ASSISTANT: msg' + sep2,
    then 'ASSISTANT:' for the answer. A system message replaces the default system text."""
    return _content(strip_text=True) + (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = content_of(messages[0]['content']) %}{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = {json.dumps(system)} %}}{{% set turns = messages %}}{{% endif %}}"
        "{{ bos_token + system + ' ' }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + content_of(message['content']) + ' ' }}"
        f"{{% else %}}{{{{ 'ASSISTANT: ' + content_of(message['content']) + {json.dumps(end_of_answer)} }}}}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


CHATML = _content(strip_text=False) + (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content_of(message['content']) + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A named prompt format: its chat template and where it comes from."""

    name: str
    template: str
    origin: str


FORMATS: dict[str, ChatFormat] = {f.name: f for f in (
    ChatFormat("llama3", LLAMA3, "Meta-Llama-3-Instruct; xtuner llava-llama-3"),
    ChatFormat("bunny-llama", _two_style(_CURIOUS_USER, "<|end_of_text|>"), "Bunny conv_llama (Bunny-Llama-3-8B-V)"),
    ChatFormat("vicuna_v1", _two_style(_CURIOUS_USER, "</s>"), "LLaVA-1.5 conv_vicuna_v1"),
    ChatFormat("chatml", CHATML, "ChatML"),
)}


def resolve(spec: str) -> ChatFormat:
    """A `--chat-template` value: a name from FORMATS, or a file (a Jinja template, or JSON with `chat_template`)."""
    if spec in FORMATS:
        return FORMATS[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise Llama3vError(f"--chat-template {spec!r} is neither a known format ({', '.join(FORMATS)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Llama3vError(f"{path}: cannot read the chat template ({e})") from e
    if path.suffix == ".json":
        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise Llama3vError(f"{path}: a JSON chat template file needs a string 'chat_template'")
    if not text.strip():
        raise Llama3vError(f"{path}: the chat template is empty")
    return ChatFormat(f"file:{path.name}", text, str(path))
