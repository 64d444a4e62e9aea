"""Build a prompt from chat messages: the GGUF's chat template around text and media.

Users place media with the markers `<image>` and `<video>` in their text; the k-th marker of a
kind takes the k-th item of that kind. A message with media but no markers leaves the place to
the prompt format: a template that takes Hugging Face's content parts (every format llama3v
names, and llava-hf processors' templates) gets the media as parts and puts them where the model
was trained to see them; any other template gets each item before the text, followed by a newline.

Markers and the user's text become private sentinels while the template renders; the rendered
text is then split at the media and the text put back, marked as the user's. Templates that trim
or restyle content therefore still place every item exactly once, and the tokenizer can tell the
template's control tokens (parsed) from the user's text (always plain: a user who types
`<|eot_id|>` gets those characters, not the end of their turn).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama3v.errors import Llama3vError
from llama3v.runtime.image_processing import ImageInput

MARKERS = {"image": "<image>", "video": "<video>"}
MEDIA_SEP = "\n"  # what follows media placed before a message's text (LLaVA's `<image>\n` convention)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS.values()))
_MEDIA = "<|llama3v-media-{}|>"
_TEXT = "<|llama3v-text-{}|>"
# What the rendered text is split at: our sentinels, and the markers a template writes for media parts.
_SPLIT_RE = re.compile(r"<\|llama3v-(media|text)-(\d+)\|>|" + _MARKER_RE.pattern)
_PROBE = "llama3v-probe"


@dataclass
class Message:
    """One chat message: role, text with markers, and its media as (kind, source) in marker order."""

    role: str
    text: str
    media: list[tuple[str, ImageInput]] = field(default_factory=list)


class Text(str):
    """Rendered prompt text; `plain` lists the [start, end) character ranges that are the user's text."""

    plain: tuple[tuple[int, int], ...] = ()

    @classmethod
    def build(cls, parts: list[tuple[str, bool]]) -> Text:
        """Join (text, is_user_text) parts."""
        out = cls("".join(p for p, _ in parts))
        spans, pos = [], 0
        for p, user in parts:
            if user and p:
                spans.append((pos, pos + len(p)))
            pos += len(p)
        out.plain = tuple(spans)
        return out


def place_media(text: str, media: list[tuple[str, ImageInput]], sep: str = MEDIA_SEP) -> str:
    """Check markers against the media given; prepend markers, each followed by `sep`, when the text has none."""
    found = _MARKER_RE.findall(text)
    if not found:
        return "".join(MARKERS[kind] + sep for kind, _ in media) + text
    for kind, marker in MARKERS.items():
        n_markers, n_items = found.count(marker), sum(1 for k, _ in media if k == kind)
        if n_markers != n_items:
            raise Llama3vError(
                f"the prompt has {n_markers} {marker} marker(s) but {n_items} {kind}(s) were given")
    return text


def message_from_openai(msg: dict) -> Message:
    """Accept {'role', 'content': str} or content as a list of text/image/video parts.

    Media parts that all come before the text leave their place to the prompt format, as media given
    without markers do; media between text parts stand where they were given (as markers).
    """
    role, content = msg.get("role"), msg.get("content")
    if role not in ("system", "user", "assistant"):
        raise Llama3vError(f"unknown message role {role!r}")
    if isinstance(content, str) or content is None:
        media = [("image", s) for s in msg.get("images", [])] + [("video", s) for s in msg.get("videos", [])]
        return Message(role, content or "", media)
    kinds = [part.get("type") for part in content]
    for kind in kinds:
        if kind != "text" and kind not in MARKERS:
            raise Llama3vError(f"unsupported message part type {kind!r}")
    leading = next((i for i, k in enumerate(kinds) if k == "text"), len(kinds))
    interleaved = any(k != "text" for k in kinds[leading:])
    text, media = "", []
    for part, kind in zip(content, kinds, strict=True):
        if kind == "text":
            text += part.get("text", "")
        else:
            text += MARKERS[kind] + "\n" if interleaved else ""
            media.append((kind, part.get(kind)))
    return Message(role, text, media)


def render(template: str, messages: list[Message], bos: str, eos: str,
           media_sep: str = MEDIA_SEP) -> tuple[list[Text | int], list]:
    """Render the chat template with the assistant header appended, starting with one BOS.

    Media given without markers go first in their message, each followed by `media_sep`.
    Returns the prompt as a list of Text pieces and media indices (into the returned media list, in
    prompt order) and that media list.
    """
    takes_strings, takes_parts = _capabilities(template)
    media: list = []  # media given at markers, by sentinel index
    by_parts: dict[str, list] = {k: [] for k in MARKERS}  # media given as parts, by kind, in order
    texts: list[str] = []
    rendered_msgs = []
    for m in messages:
        has_markers = bool(_MARKER_RE.search(m.text))
        as_parts = not takes_strings or (takes_parts and m.media and not has_markers)
        if as_parts:
            content: str | list = _parts(m, texts, media, by_parts)
        else:
            content = _sentinels(place_media(m.text, m.media, media_sep), m.media, texts, media)
        rendered_msgs.append({"role": m.role, "content": content})
    text = _render(template, rendered_msgs, bos, eos)
    return _split(text, texts, media, by_parts, bos)


def _sentinels(text: str, items: list, texts: list[str], media: list) -> str:
    """Text with markers -> sentinels: one per media item (in marker order) and one per run of user text."""
    by_kind = {k: [s for kk, s in items if kk == k] for k in MARKERS}
    out, pos = [], 0
    for match in _MARKER_RE.finditer(text):
        out.append(_text_sentinel(text[pos:match.start()], texts))
        kind = next(k for k, v in MARKERS.items() if v == match.group(0))
        media.append((kind, by_kind[kind].pop(0)))
        out.append(_MEDIA.format(len(media) - 1))
        pos = match.end()
    out.append(_text_sentinel(text[pos:], texts))
    return "".join(out)


def _parts(m: Message, texts: list[str], media: list, by_parts: dict[str, list]) -> list[dict]:
    """A message as Hugging Face content parts: media (at their markers, or first), then text."""
    if not _MARKER_RE.search(m.text):
        for kind, src in m.media:
            by_parts[kind].append(src)
        parts = [{"type": kind} for kind, _ in m.media]
        return parts + ([{"type": "text", "text": _text_sentinel(m.text, texts)}] if m.text else [])
    place_media(m.text, m.media)  # counts markers against media
    by_kind = {k: [s for kk, s in m.media if kk == k] for k in MARKERS}
    parts, pos = [], 0
    for match in _MARKER_RE.finditer(m.text):
        if match.start() > pos:
            parts.append({"type": "text", "text": _text_sentinel(m.text[pos:match.start()], texts)})
        kind = next(k for k, v in MARKERS.items() if v == match.group(0))
        by_parts[kind].append(by_kind[kind].pop(0))
        parts.append({"type": kind})
        pos = match.end()
    if pos < len(m.text):
        parts.append({"type": "text", "text": _text_sentinel(m.text[pos:], texts)})
    return parts


def _text_sentinel(text: str, texts: list[str]) -> str:
    """User text -> its leading whitespace, a sentinel, its trailing whitespace (so a template's trim acts alike)."""
    core = text.strip()
    if not core:
        return text
    texts.append(core)
    start = text.index(core)
    return text[:start] + _TEXT.format(len(texts) - 1) + text[start + len(core):]


def _split(text: str, texts: list[str], media: list, by_parts: dict[str, list], bos: str) -> tuple[list, list]:
    """Rendered text -> Text pieces and media indices; media in prompt order."""
    pieces: list[Text | int] = []
    current: list[tuple[str, bool]] = []
    ordered: list = []
    seen_media, seen_text = set(), set()
    pos = 0
    if not text.startswith(bos):  # one BOS, whether or not the template writes it (the GGUF says add_bos)
        current.append((bos, False))
    for match in _SPLIT_RE.finditer(text):
        current.append((text[pos:match.start()], False))
        pos = match.end()
        kind, index = match.group(1), match.group(2)
        if kind == "text":
            i = int(index)
            if i in seen_text:
                raise Llama3vError("the model's chat template repeated a message's text")
            seen_text.add(i)
            current.append((texts[i], True))
            continue
        if kind == "media":
            i = int(index)
            if i in seen_media:
                raise Llama3vError("the model's chat template dropped or repeated media markers")
            seen_media.add(i)
            item = media[i]
        else:
            marker_kind = next(k for k, v in MARKERS.items() if v == match.group(0))
            if not by_parts[marker_kind]:
                raise Llama3vError(f"the model's chat template wrote more {match.group(0)} markers than were given")
            item = (marker_kind, by_parts[marker_kind].pop(0))
        pieces.append(Text.build(current))
        current = []
        ordered.append(item)
        pieces.append(len(ordered) - 1)
    current.append((text[pos:], False))
    pieces.append(Text.build(current))
    if len(seen_media) != len(media) or any(by_parts.values()):
        raise Llama3vError("the model's chat template dropped or repeated media markers")
    return [p for p in pieces if not isinstance(p, str) or p], ordered


class _Generation(Extension):
    """Hugging Face's `{% generation %}` block (it marks the assistant's text for training): its body, as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        """Parse up to `{% endgeneration %}` and keep the body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise Llama3vError(f"the model's chat template failed: {e}") from e


def _render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    try:
        return _compile(template).render(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise Llama3vError(f"the model's chat template failed: {e}") from e


@functools.lru_cache(maxsize=8)
def _capabilities(template: str) -> tuple[bool, bool]:
    """Whether the template renders string content, and Hugging Face content parts (a media marker and the text)."""
    def shows(content: str | list, *needles: str) -> bool:
        try:
            out = _compile(template).render(messages=[{"role": "user", "content": content}], bos_token="",
                                            eos_token="", add_generation_prompt=True)
        except (jinja2.TemplateError, Llama3vError, TypeError, ValueError, AttributeError):
            return False
        return all(n in out for n in needles) and "'type'" not in out

    parts = [{"type": "image"}, {"type": "text", "text": _PROBE}]
    return shows(_PROBE, _PROBE), shows(parts, _PROBE, MARKERS["image"])


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
