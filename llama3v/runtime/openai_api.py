"""The OpenAI chat-completions format: requests to session messages, results to responses and chunks.

Shared by the HTTP server and the llama-cpp-python chat handler. Media arrive as `image_url` /
`video_url` parts (the spelling vLLM and others use for video) whose URL is a data URI, a local
path (file:// or plain) or, only where allowed, an http(s) address; `MediaPolicy` decides.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from llama3v.errors import Llama3vError
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
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError("each message needs a role of system, user or assistant")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": m["role"], "content": content or ""})
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
        out.append({"role": m["role"], "content": parts})
    return out


def sampling(body: dict, default_max_tokens: int = SAMPLING.max_tokens) -> dict:
    """Session sampling options from an OpenAI request body, each checked for its JSON type.

    `max_tokens` (or `max_completion_tokens`) absent or null means `default_max_tokens`; any value below 1,
    0 included, is refused, as OpenAI does."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    logit_bias = body.get("logit_bias")
    out = {
        "max_tokens": default_max_tokens if max_tokens is None else _number(max_tokens, "max_tokens", int),
        "temperature": _number(body.get("temperature", 1.0), "temperature", float),
        "top_p": _number(body.get("top_p", 1.0), "top_p", float),
        "top_k": _number(body.get("top_k", 0), "top_k", int),  # OpenAI has no top_k: off unless asked
        "seed": None if body.get("seed") is None else _number(body["seed"], "seed", int),
        "stop": [stop] if isinstance(stop, str) else stop or [],
        "logit_bias": logit_bias or None,
    }
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


def new_id() -> str:
    """A completion id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: Result) -> dict:
    """The usage object of a finished result."""
    return {"prompt_tokens": result.n_prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.n_prompt_tokens + len(result.tokens)}


def completion(result: Result, model: str, request_id: str) -> dict:
    """A non-streamed chat.completion response."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
          result: Result | None = None) -> dict:
    """One chat.completion.chunk of a streamed response (with usage on the last when `result` is given)."""
    out = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if result is not None:
        out["usage"] = usage(result)
    return out
