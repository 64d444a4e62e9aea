"""Build a prompt from chat messages: the GGUF's chat template around text and media markers.

Users place media with the markers `<image>` and `<video>` in their text; the k-th marker of a
kind takes the k-th item of that kind. A message with media but no markers gets them before its
text, each followed by a newline. Markers become private sentinels while the template renders,
then the rendered text is split there, so templates that trim or restyle content still place
every item exactly once.

Only the template inserts control tokens. Text in a message that spells one (`<|eot_id|>`) would
otherwise become that token and let a user forge turns; such text is set aside as a sentinel too
and comes back as `Plain` text, which is tokenized without parsing special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama3v.errors import Llama3vError
from llama3v.runtime.image_processing import ImageInput

MARKERS = {"image": "<image>", "video": "<video>"}
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS.values()))
_SENTINEL = "<|llama3v-media-{}|>"
_LITERAL = "<|llama3v-text-{}|>"
_SENTINEL_RE = re.compile(r"<\|llama3v-(media|text)-(\d+)\|>")


class Plain(str):
    """Text a user or a media item supplied: tokenized as plain text, never as control tokens."""


@dataclass
class Message:
    """One chat message: role, text with markers, and its media as (kind, source) in marker order."""

    role: str
    text: str
    media: list[tuple[str, ImageInput]] = field(default_factory=list)


def place_media(text: str, media: list[tuple[str, ImageInput]]) -> str:
    """Check markers against the media given; prepend markers when the text has none."""
    found = _MARKER_RE.findall(text)
    if not found:
        return "".join(MARKERS[kind] + "\n" for kind, _ in media) + text
    for kind, marker in MARKERS.items():
        n_markers, n_items = found.count(marker), sum(1 for k, _ in media if k == kind)
        if n_markers != n_items:
            raise Llama3vError(
                f"the prompt has {n_markers} {marker} marker(s) but {n_items} {kind}(s) were given")
    return text


def message_from_openai(msg: dict) -> Message:
    """Accept {'role', 'content': str} or content as a list of text/image/video parts."""
    role, content = msg.get("role"), msg.get("content")
    if role not in ("system", "user", "assistant"):
        raise Llama3vError(f"unknown message role {role!r}")
    if isinstance(content, str) or content is None:
        media = [("image", s) for s in msg.get("images", [])] + [("video", s) for s in msg.get("videos", [])]
        return Message(role, content or "", media)
    text, media = "", []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text += part.get("text", "")
        elif kind in MARKERS:
            text += MARKERS[kind] + "\n"  # as media without markers get: `run --image X -p T` is "<image>\nT"
            media.append((kind, part.get(kind)))
        else:
            raise Llama3vError(f"unsupported message part type {kind!r}")
    return Message(role, text, media)


def render(template: str, messages: list[Message], bos: str, eos: str,
           control_texts: list[str] = ()) -> tuple[list[str | int], list]:
    """Render the chat template with the assistant header appended.

    Returns the prompt as a list of text pieces (`Plain` where the text came from a message and spells
    one of `control_texts`) and media indices (into the returned media list, in prompt order) and that
    media list.
    """
    media: list = []
    literals: list[str] = []
    # Our own sentinels typed by a user are set aside as well; the media markers stay (a vocabulary may list them).
    guarded = [t for t in control_texts if t not in MARKERS.values()]
    literal_re = re.compile("|".join([_SENTINEL_RE.pattern, *map(re.escape, guarded)]))

    def set_aside(match: re.Match) -> str:
        literals.append(match.group(0))
        return _LITERAL.format(len(literals) - 1)

    rendered_msgs = []
    for m in messages:
        text = literal_re.sub(set_aside, place_media(m.text, m.media))
        by_kind: dict[str, list] = {k: [s for kk, s in m.media if kk == k] for k in MARKERS}

        def swap(match: re.Match, by_kind: dict = by_kind) -> str:
            kind = next(k for k, v in MARKERS.items() if v == match.group(0))
            media.append((kind, by_kind[kind].pop(0)))
            return _SENTINEL.format(len(media) - 1)

        rendered_msgs.append({"role": m.role, "content": _MARKER_RE.sub(swap, text)})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        text = env.from_string(template).render(
            messages=rendered_msgs, bos_token=bos, eos_token=eos, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise Llama3vError(f"the model's chat template failed: {e}") from e
    pieces: list[str | int] = []
    pos = 0
    for match in _SENTINEL_RE.finditer(text):
        if match.start() > pos:
            pieces.append(text[pos:match.start()])
        k = int(match.group(2))
        if match.group(1) == "media":
            pieces.append(k)
        elif k < len(literals):
            pieces.append(Plain(literals[k]))
        pos = match.end()
    if pos < len(text):
        pieces.append(text[pos:])
    placed = sorted(p for p in pieces if isinstance(p, int))
    if placed != list(range(len(media))):
        raise Llama3vError("the model's chat template dropped or repeated media markers")
    return pieces, media


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
