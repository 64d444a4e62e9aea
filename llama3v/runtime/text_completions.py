"""The legacy /v1/completions format (text in, text out; no chat template, no media)."""

from __future__ import annotations

import time

from llama3v.runtime import openai_api as oa
from llama3v.runtime.logprobs import TokenLogprob
from llama3v.runtime.session import Result


def prompt_text(body: dict) -> str:
    """The prompt of a completions request: a string (or a list holding one); refuse what is not served."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise oa.RequestError("prompt must be a string (token-id prompts and batches of prompts are not supported)")
    if body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1:
        raise oa.RequestError("echo, suffix and best_of are not supported")
    return prompt


def logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The completions `logprobs` object: tokens, their log-probabilities, top alternatives, text offsets."""
    if entries is None:
        return None
    texts = [e.chosen.piece.decode("utf-8", "replace") for e in entries]
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": [e.chosen.logprob for e in entries],
            "top_logprobs": [_by_text(e) for e in entries],
            "text_offset": offsets}


def _by_text(entry: TokenLogprob) -> dict[str, float]:
    """The alternatives keyed by text; where two tokens read the same (partial UTF-8), the likelier stays."""
    out: dict[str, float] = {}
    for a in entry.top:
        out.setdefault(a.piece.decode("utf-8", "replace"), a.logprob)
    return out


def _choice(text: str, entries: list[TokenLogprob] | None, finish: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": logprobs(entries), "finish_reason": finish}


def _response(request_id: str, model: str, choice: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


class TextFormat:
    """/v1/completions responses and stream events (the interface of openai_api.ChatFormat)."""

    id_prefix = "cmpl"

    @staticmethod
    def whole(result: Result, model: str, request_id: str) -> dict:
        """The non-streamed response."""
        return {**_response(request_id, model, _choice(result.text, result.logprobs, result.finish_reason)),
                "usage": oa.usage(result), "llama3v": oa.extension(result)}

    @staticmethod
    def opening(request_id: str, model: str) -> dict | None:
        """Completions streams start with text right away."""
        return None

    @staticmethod
    def piece(request_id: str, model: str, text: str, entries: list[TokenLogprob]) -> dict:
        """A streamed piece of text."""
        return _response(request_id, model, _choice(text, entries or None, None))

    @staticmethod
    def closing(request_id: str, model: str, result: Result, with_usage: bool) -> dict:
        """The last event: the finish reason, llama3v's measurements, the usage when asked for."""
        out = {**_response(request_id, model, _choice("", None, result.finish_reason)), "llama3v": oa.extension(result)}
        if with_usage:
            out["usage"] = oa.usage(result)
        return out
