"""The OpenAI chat-completions format: requests to session messages, results to responses and chunks.

Shared by the HTTP server and the llama-cpp-python chat handler. Media arrive as `image_url` /
`video_url` parts (the spelling vLLM and others use for video) whose URL is a data URI, a local
path (file:// or plain) or, only where allowed, an http(s) address; `MediaPolicy` decides.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from llama3v.errors import Llama3vError
from llama3v.runtime.grammar import ANY_OBJECT, json_grammar
from llama3v.runtime.logprobs import MAX_TOP, Alternative, TokenLogprob
from llama3v.runtime.options import SAMPLING
from llama3v.runtime.session import Result
from llama3v.runtime.video import container_kind


class RequestError(Llama3vError):
    """A refused request; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from: data URIs always; local files under `roots`; remote URLs if allowed."""

    roots: tuple[Path, ...] = ()
    any_path: bool = False  # a local library user's own files (the chat handler); never for the server
    allow_remote: bool = False
    max_bytes: int = 64 << 20
    timeout_s: float = 20.0  # total time for one remote fetch: connecting, headers and every read together
    tmpdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    remote_switch: str = "start the server with --allow-remote"  # how this policy's owner turns remote URLs on


def fetch(url: str, kind: str, policy: MediaPolicy, temp_files: list[Path]) -> bytes | Path:
    """Resolve a media URL under the policy: image bytes, or a file path for videos (OpenCV reads files).

    Videos that arrive as bytes must be a real container format (runtime/video.py: never a playlist or
    another text format that makes FFmpeg open further files) and are written into a private temporary
    folder of their own (mode 0700), appended to `temp_files` for the caller to remove (`remove_temp`)
    when the request ends."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind}_url needs a url")
    if "\0" in url:
        raise RequestError(f"{kind}_url contains a NUL character")
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        data = _data_uri(url, policy)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise RequestError(f"remote media URLs are disabled ({policy.remote_switch})", 403)
        data = _download(url, policy)
    elif scheme in ("", "file"):
        return _local(unquote(urlparse(url).path) if scheme == "file" else url, kind, policy)
    else:
        raise RequestError(f"unsupported media URL scheme {scheme!r}")
    if kind == "image":
        return data
    container = container_kind(data[:512])
    if container is None:
        raise RequestError("the video is not in a container format llama3v reads (MP4/MOV, Matroska/WebM, AVI, "
                           "FLV, Ogg, ASF, MPEG-PS/TS); playlists and other text formats are refused", 415)
    folder = Path(tempfile.mkdtemp(prefix="llama3v-", dir=policy.tmpdir))  # mode 0700: this request's alone
    temp_files.append(folder)
    path = folder / f"video-{len(temp_files)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def public_message(message: str, temp_files: list[Path]) -> str:
    """An error message fit for a client: its first line, with no temporary path of the server (an upload is
    "upload") and no object address."""
    for path in temp_files:
        message = message.replace(str(path) + "/", "uploaded ").replace(str(path), "upload")
    return _ADDRESS.sub("", message.splitlines()[0] if message else message)


def remove_temp(paths: list[Path]) -> None:
    """Delete the temporary folders `fetch` made for a request."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    paths.clear()


def has_remote(messages: object) -> bool:
    """Whether any media part of OpenAI messages names an http(s) URL (the server fetches those in a pool of
    their own, so slow remote servers cannot hold up other requests)."""
    for m in messages if isinstance(messages, list) else []:
        for part in m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            ref = part.get(kind) if kind in ("image_url", "video_url") else None
            url = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(url, str) and urlparse(url).scheme.lower() in ("http", "https"):
                return True
    return False


def _data_uri(url: str, policy: MediaPolicy) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError("malformed data URI: expected data:<mime>;base64,<data>")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise RequestError(f"media larger than the {policy.max_bytes >> 20} MiB limit", 413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"malformed data URI: {e}") from e


def _download(url: str, policy: MediaPolicy) -> bytes:
    """The body at `url`, within the size cap and the total deadline (a server that trickles its answer a
    byte at a time is cut off at the deadline, not after one timeout per read)."""
    deadline = time.monotonic() + policy.timeout_s
    too_big = RequestError(f"media larger than the {policy.max_bytes >> 20} MiB limit", 413)
    late = RequestError(f"could not fetch {url} within {policy.timeout_s:g} s", 504)
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # noqa: S310 - http(s) only
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > policy.max_bytes:
                raise too_big
            while chunk := response.read1(1 << 16):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise too_big
                if time.monotonic() > deadline:
                    raise late
                chunks.append(chunk)
    except TimeoutError:
        raise late from None
    except OSError as e:
        raise RequestError(f"could not fetch {url}: {getattr(e, 'reason', None) or e.strerror or e}", 502) from None
    if time.monotonic() > deadline:
        raise late
    return b"".join(chunks)


def _local(path: str, kind: str, policy: MediaPolicy) -> bytes | Path:
    if "\0" in path:
        raise RequestError(f"{kind}_url contains a NUL character")
    resolved = Path(path).expanduser().resolve()
    if not policy.any_path and not any(resolved.is_relative_to(r.resolve()) for r in policy.roots):
        raise RequestError(f"local path {path!r} is outside the allowed media roots", 403)
    if not resolved.is_file():
        raise RequestError(f"no such file: {path}", 404)
    try:
        if resolved.stat().st_size > policy.max_bytes:
            raise RequestError(f"media larger than the {policy.max_bytes >> 20} MiB limit", 413)
        return resolved if kind == "video" else resolved.read_bytes()
    except OSError as e:
        raise RequestError(f"cannot read {path}: {e.strerror}", 403) from None


def session_messages(messages: object, policy: MediaPolicy, temp_files: list[Path]) -> list[dict]:
    """OpenAI messages -> llama3v messages (text, image and video parts); fetched videos go to temp_files."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    out = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role == "tool" or (role == "assistant" and m.get("tool_calls")):
            raise RequestError("tool calls are not supported by this server")
        role = ROLES.get(role)
        if role is None:
            raise RequestError("each message needs a role of system, developer, user or assistant")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise RequestError("message content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text", ""), str):
                    raise RequestError("a text part's text must be a string")
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in ("image_url", "video_url"):
                media = kind.removesuffix("_url")
                ref = part.get(kind)
                if not isinstance(ref, (dict, str)):
                    raise RequestError(f"{kind} must be an object with a url, or a url")
                source = fetch(ref.get("url") if isinstance(ref, dict) else ref, media, policy, temp_files)
                parts.append({"type": media, media: source})
            else:
                raise RequestError(f"unsupported content part type {kind!r}")
        out.append({"role": role, "content": parts})
    return out


# OpenAI's roles as the chat template knows them: "developer" is the newer name of the system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def sampling(body: dict, default_max_tokens: int = SAMPLING.max_tokens) -> dict:
    """Session options from an OpenAI request body: sampling, logprobs, the JSON grammar, the room check; each
    value checked for its JSON type.

    An explicit max_tokens (or max_completion_tokens) must be at least 1 (0 is refused, as OpenAI does) and
    fit in the context with the prompt (else a 400, as OpenAI answers); without one, the answer stops at
    default_max_tokens or where the context ends (finish_reason "length").
    """
    if body.get("tools") or body.get("functions"):
        raise RequestError("tools (function calling) are not supported by this server")
    explicit = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    logit_bias = body.get("logit_bias")
    try:
        out = {
            "max_tokens": default_max_tokens if explicit is None else _number(explicit, "max_tokens", int),
            "require_room": explicit is not None,
            "logprobs": _logprobs(body),
            "grammar": _grammar(body.get("response_format")),
            "temperature": _number(body.get("temperature", 1.0), "temperature", float),
            "top_p": _number(body.get("top_p", 1.0), "top_p", float),
            "top_k": _number(body.get("top_k", 0), "top_k", int),  # OpenAI has no top_k: off unless asked
            "seed": None if body.get("seed") is None else _number(body["seed"], "seed", int),
            "stop": [stop] if isinstance(stop, str) else stop or [],
            "logit_bias": None,
            "frequency_penalty": _number(body.get("frequency_penalty") or 0.0, "frequency_penalty", float),
            "presence_penalty": _number(body.get("presence_penalty") or 0.0, "presence_penalty", float),
        }
    except (TypeError, ValueError) as e:
        raise RequestError(f"invalid sampling parameter: {e}") from None
    if not (isinstance(out["stop"], list) and all(isinstance(s, str) for s in out["stop"])):
        raise RequestError("stop must be a string or a list of strings")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise RequestError("logit_bias must be an object of token id -> bias")
        try:
            out["logit_bias"] = {int(t): _number(b, "a logit bias", float) for t, b in logit_bias.items()} or None
        except ValueError:
            raise RequestError("logit_bias keys must be token ids") from None
    if out["max_tokens"] < 1 or not 0 <= out["temperature"] <= 100 or not 0 < out["top_p"] <= 1 or out["top_k"] < 0:
        raise RequestError("max_tokens must be >= 1, temperature in [0, 100], top_p in (0, 1], top_k >= 0")
    if not (-2 <= out["frequency_penalty"] <= 2 and -2 <= out["presence_penalty"] <= 2):
        raise RequestError("frequency_penalty and presence_penalty must be in [-2, 2]")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported")
    if not isinstance(body.get("stream_options", {}) if body.get("stream_options") is not None else {}, dict):
        raise RequestError("stream_options must be an object")
    return out


def _number(value: object, name: str, kind: type) -> int | float:
    """A JSON number of the right kind (an integer where one is needed), finite and below 2^53 in size."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < 2 ** 53 or \
            (kind is int and isinstance(value, float) and not value.is_integer()):
        what = "an integer" if kind is int else "a finite number"
        raise RequestError(f"{name} must be {what}, got {repr(value)[:40]}")
    return kind(value)


def _logprobs(body: dict) -> int | None:
    """How many top tokens to report per position: chat's `logprobs: true` + `top_logprobs`, or the legacy
    completions' `logprobs: k`; None when not asked for."""
    flag = body.get("logprobs")
    if flag is None or flag is False:
        return None
    top = int(body.get("top_logprobs") or 0) if flag is True else int(flag)
    if not 0 <= top <= MAX_TOP:
        raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP}")
    return top


def _grammar(response_format: object) -> str | None:
    """The GBNF grammar a response_format asks for: none for text, any object, or the given JSON schema."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind in (None, "text"):
        return None
    try:
        if kind == "json_object":
            return json_grammar(ANY_OBJECT)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise RequestError("response_format json_schema needs json_schema.schema, a JSON schema object")
            return json_grammar(spec["schema"])
    except RequestError:
        raise
    except Llama3vError as e:
        raise RequestError(str(e)) from None
    raise RequestError(f"unsupported response_format type {kind!r}; use text, json_object or json_schema")


def new_id(prefix: str = "chatcmpl") -> str:
    """A completion id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: Result) -> dict:
    """The usage object of a finished result."""
    return {"prompt_tokens": result.n_prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.n_prompt_tokens + len(result.tokens)}


def extension(result: Result) -> dict:
    """llama3v's own measurements of an answer, sent beside OpenAI's fields (docs/serving.md)."""
    return {"timings": result.timings, "n_reused_tokens": result.n_reused, "n_encodes": result.n_encodes,
            "media": [m.to_json() for m in result.media], "tokens": result.tokens}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """The chat `logprobs` object: one content entry per token, each with its top alternatives."""
    if entries is None:
        return None

    def one(a: Alternative) -> dict:
        return {"token": a.piece.decode("utf-8", "replace"), "logprob": a.logprob, "bytes": list(a.piece)}

    return {"content": [{**one(e.chosen), "top_logprobs": [one(a) for a in e.top]} for e in entries],
            "refusal": None}


def completion(result: Result, model: str, request_id: str) -> dict:
    """A non-streamed chat.completion response."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": chat_logprobs(result.logprobs), "finish_reason": result.finish_reason}],
            "usage": usage(result), "llama3v": extension(result)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
          result: Result | None = None, with_usage: bool = False,
          logprobs: list[TokenLogprob] | None = None) -> dict:
    """One chat.completion.chunk of a streamed response; the last (given `result`) carries llama3v's
    measurements, and the usage when asked for."""
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs) if logprobs else None,
                        "finish_reason": finish_reason}]}
    if result is not None:
        out["llama3v"] = extension(result)
        if with_usage:
            out["usage"] = usage(result)
    return out


class ResponseFormat(Protocol):
    """How an endpoint writes whole answers and stream events (ChatFormat; text_completions.TextFormat)."""

    id_prefix: str

    def whole(self, result: Result, model: str, request_id: str) -> dict: ...
    def opening(self, request_id: str, model: str) -> dict | None: ...
    def piece(self, request_id: str, model: str, text: str, logprobs: list[TokenLogprob]) -> dict: ...
    def closing(self, request_id: str, model: str, result: Result, with_usage: bool) -> dict: ...


class ChatFormat:
    """/v1/chat/completions: how results and streamed pieces are written (text_completions.py has the other)."""

    id_prefix = "chatcmpl"

    @staticmethod
    def whole(result: Result, model: str, request_id: str) -> dict:
        """The non-streamed response."""
        return completion(result, model, request_id)

    @staticmethod
    def opening(request_id: str, model: str) -> dict | None:
        """The first event of a stream, if the format has one."""
        return chunk(request_id, model, {"role": "assistant", "content": ""})

    @staticmethod
    def piece(request_id: str, model: str, text: str, logprobs: list[TokenLogprob]) -> dict:
        """A streamed piece of text with the logprobs of the tokens it completes."""
        return chunk(request_id, model, {"content": text}, logprobs=logprobs)

    @staticmethod
    def closing(request_id: str, model: str, result: Result, with_usage: bool) -> dict:
        """The last event before [DONE]."""
        return chunk(request_id, model, {}, result.finish_reason, result, with_usage)
