"""A chat handler for llama-cpp-python: existing `Llama(..., chat_handler=...)` code gets llama3v's image
preprocessing, tiling, video and caches by changing one line.

    from llama_cpp import Llama
    from llama3v.runtime.chat_handler import Llama3vChatHandler
    llm = Llama(model_path="model.gguf", n_ctx=4096, chat_handler=Llama3vChatHandler("mmproj.gguf"))
    llm.create_chat_completion(messages=[...image_url / video_url parts...])

The handler runs on the Llama's own model and context (nothing is loaded twice) and, unlike
llama-cpp-python's handlers, keeps the KV cache between calls: a follow-up only decodes its new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from llama3v.runtime import openai_api as oa
from llama3v.runtime.options import SAMPLING, SessionOptions
from llama3v.runtime.session import Session

REMOTE_SWITCH = "pass media=MediaPolicy(any_path=True, allow_remote=True) to Llama3vChatHandler"


class Llama3vChatHandler:
    """llama-cpp-python chat handler backed by a llama3v Session."""

    def __init__(self, mmproj_path: str | Path | None = None, options: SessionOptions | None = None,
                 media: oa.MediaPolicy | None = None, **overrides: object):
        """`options` (or SessionOptions fields by keyword, e.g. max_tiles=4) as for a Session; the context, batch
        and threads are the Llama's."""
        self.mmproj_path = mmproj_path
        self.options = replace(options or SessionOptions(), **overrides)
        # A library caller's own files are theirs to read; remote URLs stay opt-in, and the refusal names
        # this class's switch, not the server's command-line flag.
        self.media = replace(media or oa.MediaPolicy(any_path=True), remote_switch=REMOTE_SWITCH)
        self._session: Session | None = None
        self._llama = None

    def session(self, llama: object) -> Session:
        """The session over `llama` (made on first use)."""
        if self._session is None or self._llama is not llama:
            self._session = Session.from_llama(llama, self.mmproj_path, self.options)
            self._llama = llama
        return self._session

    def __call__(self, *, llama: object, messages: list[dict], temperature: float = 0.2, top_p: float = 0.95,
                 top_k: int = 40, stream: bool = False, stop: str | list[str] | None = None, seed: int | None = None,
                 max_tokens: int | None = None, model: str | None = None, **openai: object) -> dict | Iterator[dict]:
        """Answer `messages` the way llama-cpp-python's own handlers do (a completion dict or chunks).

        The OpenAI options llama-cpp-python passes on (logprobs, top_logprobs, response_format, logit_bias,
        frequency_penalty, presence_penalty, tools) act as on `llama3v serve`; the rest are llama.cpp sampler
        options this handler does not use."""
        temp_files: list[Path] = []
        try:
            converted = oa.session_messages(messages, self.media, temp_files)
            body = {k: openai.get(k) for k in _OPENAI_OPTIONS} | {
                "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": stop,
                "max_tokens": max_tokens or None}
            # llama-cpp-python's rule for max_tokens: cut where the context ends (no 400 in a library call).
            options = oa.sampling(body, SAMPLING.max_tokens) | {"require_room": False}
            gen = self.session(llama).chat(converted, **options)
        except BaseException:
            oa.remove_temp(temp_files)
            raise
        name = model or Path(getattr(llama, "model_path", "llama3v")).stem
        request_id = oa.new_id()
        if stream:
            return self._chunks(gen, request_id, name, temp_files)
        try:
            return oa.completion(gen.wait(), name, request_id)
        finally:
            oa.remove_temp(temp_files)

    @staticmethod
    def _chunks(gen: object, request_id: str, model: str, temp_files: list[Path]) -> Iterator[dict]:
        try:
            yield oa.chunk(request_id, model, {"role": "assistant", "content": ""})
            sent = 0
            for piece in gen:
                yield oa.chunk(request_id, model, {"content": piece}, logprobs=gen.logprobs[sent:])
                sent = len(gen.logprobs)
            yield oa.chunk(request_id, model, {}, gen.result.finish_reason)
        finally:
            gen.close()
            oa.remove_temp(temp_files)


# What llama-cpp-python hands a chat handler that the OpenAI layer (openai_api.sampling) reads.
_OPENAI_OPTIONS = ("logprobs", "top_logprobs", "response_format", "logit_bias", "frequency_penalty", "presence_penalty",
                   "tools", "functions")
