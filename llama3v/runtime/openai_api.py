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
from urllib.parse import unquote, urlparse

from llama3v.errors import Llama3vError
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
            raise RequestError("remote media URLs are disabled on this server (start it with --allow-remote)", 403)
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
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "video_url"):
                media = kind.removesuffix("_url")
                ref = part.get(kind)
                source = fetch(ref.get("url") if isinstance(ref, dict) else ref, media, policy, temp_files)
                parts.append({"type": media, media: source})
            else:
                raise RequestError(f"unsupported content part type {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out


def sampling(body: dict, default_max_tokens: int = SAMPLING.max_tokens) -> dict:
    """Session sampling options from an OpenAI request body."""
    try:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_max_tokens
        stop = body.get("stop") or []
        out = {
            "max_tokens": int(max_tokens),
            "temperature": float(body.get("temperature", 1.0)),
            "top_p": float(body.get("top_p", 1.0)),
            "top_k": int(body.get("top_k", 0)),  # OpenAI has no top_k: off unless asked
            "seed": None if body.get("seed") is None else int(body["seed"]),
            "stop": [stop] if isinstance(stop, str) else [str(s) for s in stop],
            "logit_bias": {int(t): float(b) for t, b in (body.get("logit_bias") or {}).items()} or None,
        }
    except (TypeError, ValueError) as e:
        raise RequestError(f"invalid sampling parameter: {e}") from e
    if out["max_tokens"] < 1 or not 0 <= out["temperature"] <= 100 or not 0 < out["top_p"] <= 1:
        raise RequestError("max_tokens must be >= 1, temperature in [0, 100], top_p in (0, 1]")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported")
    return out


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
