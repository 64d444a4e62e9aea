"""The OpenAI chat-completions format: requests to session messages, results to responses and chunks.

Shared by the HTTP server and the llama-cpp-python chat handler. Media arrive as `image_url` /
`video_url` parts (the spelling vLLM and others use for video) whose URL is a data URI, a local
path (file:// or plain) or, only where allowed, an http(s) address; `MediaPolicy` decides.
"""

from __future__ import annotations

import base64
import binascii
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
    timeout_s: float = 20.0
    tmpdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    remote_switch: str = "start the server with --allow-remote"  # how this policy's owner turns remote URLs on


def fetch(url: str, kind: str, policy: MediaPolicy, temp_files: list[Path]) -> bytes | Path:
    """Resolve a media URL under the policy: image bytes, or a file path for videos (OpenCV reads files).

    Videos that arrive as bytes are written to a temporary file, appended to `temp_files` for the
    caller to delete when the request ends."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{kind}_url needs a url")
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
    with tempfile.NamedTemporaryFile(dir=policy.tmpdir, prefix="llama3v-video-", suffix=".bin", delete=False) as f:
        temp_files.append(Path(f.name))
        f.write(data)
    return Path(f.name)


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
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # noqa: S310 - http(s) only
            data = response.read(policy.max_bytes + 1)
    except OSError as e:
        raise RequestError(f"could not fetch {url}: {e}", 502) from e
    if len(data) > policy.max_bytes:
        raise RequestError(f"media larger than the {policy.max_bytes >> 20} MiB limit", 413)
    return data


def _local(path: str, kind: str, policy: MediaPolicy) -> bytes | Path:
    resolved = Path(path).expanduser().resolve()
    if not policy.any_path and not any(resolved.is_relative_to(r.resolve()) for r in policy.roots):
        raise RequestError(f"local path {path!r} is outside the allowed media roots", 403)
    if not resolved.is_file():
        raise RequestError(f"no such file: {path}", 404)
    if resolved.stat().st_size > policy.max_bytes:
        raise RequestError(f"media larger than the {policy.max_bytes >> 20} MiB limit", 413)
    return resolved if kind == "video" else resolved.read_bytes()


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
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "video_url"):
                media = kind.removesuffix("_url")
                ref = part.get(kind)
                source = fetch(ref.get("url") if isinstance(ref, dict) else ref, media, policy, temp_files)
                parts.append({"type": media, media: source})
            else:
                raise RequestError(f"unsupported content part type {kind!r}")
        out.append({"role": role, "content": parts})
    return out


# OpenAI's roles as the chat template knows them: "developer" is the newer name of the system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def sampling(body: dict, default_max_tokens: int = SAMPLING.max_tokens) -> dict:
    """Session options from an OpenAI request body: sampling, logprobs, the JSON grammar, the room check.

    An explicit max_tokens must fit in the context with the prompt (else a 400, as OpenAI answers); without
    one, the answer stops at default_max_tokens or where the context ends (finish_reason "length").
    """
    if body.get("tools") or body.get("functions"):
        raise RequestError("tools (function calling) are not supported by this server")
    try:
        explicit = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop") or []
        out = {
            "max_tokens": int(explicit if explicit is not None else default_max_tokens),
            "require_room": explicit is not None,
            "logprobs": _logprobs(body),
            "grammar": _grammar(body.get("response_format")),
            "temperature": float(body.get("temperature", 1.0)),
            "top_p": float(body.get("top_p", 1.0)),
            "top_k": int(body.get("top_k", 0)),  # OpenAI has no top_k: off unless asked
            "seed": None if body.get("seed") is None else int(body["seed"]),
            "stop": [stop] if isinstance(stop, str) else [str(s) for s in stop],
            "logit_bias": {int(t): float(b) for t, b in (body.get("logit_bias") or {}).items()} or None,
            "frequency_penalty": float(body.get("frequency_penalty") or 0.0),
            "presence_penalty": float(body.get("presence_penalty") or 0.0),
        }
    except (TypeError, ValueError) as e:
        raise RequestError(f"invalid sampling parameter: {e}") from e
    if out["max_tokens"] < 1 or not 0 <= out["temperature"] <= 100 or not 0 < out["top_p"] <= 1:
        raise RequestError("max_tokens must be >= 1, temperature in [0, 100], top_p in (0, 1]")
    if not (-2 <= out["frequency_penalty"] <= 2 and -2 <= out["presence_penalty"] <= 2):
        raise RequestError("frequency_penalty and presence_penalty must be in [-2, 2]")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported")
    return out


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
