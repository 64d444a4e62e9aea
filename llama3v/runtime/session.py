"""A chat session: an LLM context plus a vision encoder, with KV-prefix reuse and an encode cache.

Each call builds the prompt as a sequence of token runs and embedding-row blocks, each position
with an identity (a token id, or a media key and row). The longest prefix that matches what the
KV cache already holds is kept; only the rest is encoded and decoded. A follow-up question about
the same photo therefore decodes only its new tokens and encodes nothing.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama3v.chat_formats import FORMATS, resolve
from llama3v.errors import Llama3vError
from llama3v.runtime.context import Context, Sampler, TextModel
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.gguf_check import check_pair, read_gguf, read_model
from llama3v.runtime.media import (
    EncodeCache,
    Part,
    Progress,
    Rows,
    describe,
    image_parts,
    sample_video,
    video_parts,
)
from llama3v.runtime.prompt import Message, message_from_openai, render
from llama3v.runtime.video import Sampling
from llama3v.runtime.video_budget import DEFAULT_MEASURE, default_budget


@dataclass
class Result:
    """What a finished generation produced, with its prompt and timings (milliseconds)."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int | None]
    finish_reason: str
    timings: dict[str, float]
    n_reused: int = 0
    n_encodes: int = 0
    media: list[dict] = field(default_factory=list)
    chat_template: str = ""

    @property
    def n_prompt_tokens(self) -> int:
        """Prompt positions, media rows included."""
        return len(self.prompt_tokens)

    def to_json(self) -> dict:
        """The `llama3v run --json` object."""
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "n_prompt_tokens": self.n_prompt_tokens, "finish_reason": self.finish_reason,
                "n_reused_tokens": self.n_reused, "n_encodes": self.n_encodes, "media": self.media,
                "chat_template": self.chat_template, "timings": self.timings,
                "decode_tokens_per_s": self.timings.get("decode_tokens_per_s", 0.0)}


class Generation:
    """Iterate for text pieces as they are generated; `result` is set once iteration ends."""

    def __init__(self, run: Callable[[Generation], Iterator[str]]):
        self.result: Result | None = None
        self._pieces = run(self)

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces

    def wait(self) -> Result:
        """Run to the end and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop generating now (`result` stays None); the session keeps what was decoded so far."""
        self._pieces.close()


@dataclass
class _Prompt:
    runs: list[list[int] | Rows]

    def identities(self) -> list:
        out: list = []
        for run in self.runs:
            out.extend(run if isinstance(run, list) else ((run.key, i) for i in range(run.n)))
        return out

    def token_view(self) -> list[int | None]:
        out: list[int | None] = []
        for run in self.runs:
            out.extend(run if isinstance(run, list) else [None] * run.n)
        return out


class Session:
    """A loaded model and mmproj; `generate` and `chat` stream text and keep the KV cache between calls."""

    def __init__(
        self,
        model_path: str | Path,
        mmproj_path: str | Path | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        encode_cache_bytes: int = 256 << 20,
        max_tiles: int | None = None,
        image_layout: str | None = None,
        max_video_tokens: int | None = None,
        video_sampling: Sampling | None = None,
        progress: Progress | None = None,
        chat_template: str | None = None,
    ):
        model_info = read_model(model_path)
        if mmproj_path is not None:
            check_pair(model_info, read_gguf(mmproj_path))
        self.model = TextModel(model_path, n_gpu_layers=n_gpu_layers, info=model_info)
        self.ctx = Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv_type=kv_type,
                           flash_attn=flash_attn)
        self._setup(mmproj_path, n_threads, n_gpu_layers != 0, flash_attn, encode_cache_bytes, max_tiles, image_layout,
                    chat_template)
        self.max_video_tokens, self.progress = max_video_tokens, progress
        self.video_sampling = video_sampling or Sampling()

    @classmethod
    def from_llama(cls, llama: object, mmproj_path: str | Path | None = None, n_threads: int | None = None,
                   use_gpu: bool = True, flash_attn: bool | None = None, encode_cache_bytes: int = 256 << 20,
                   max_tiles: int | None = None, image_layout: str | None = None,
                   chat_template: str | None = None) -> Session:
        """A session over a `llama_cpp.Llama`'s own model and context, without loading the model again."""
        self = cls.__new__(cls)
        model_info = read_model(llama.model_path)
        if mmproj_path is not None:
            check_pair(model_info, read_gguf(mmproj_path))
        self.model = TextModel(llama.model_path, info=model_info, borrow=llama._model.model)
        self.ctx = Context(self.model, n_batch=llama.n_batch, borrow=llama._ctx.ctx)
        self._setup(mmproj_path, n_threads or llama.n_threads, use_gpu, flash_attn, encode_cache_bytes, max_tiles,
                    image_layout, chat_template)
        return self

    def _setup(self, mmproj_path: str | Path | None, n_threads: int | None, use_gpu: bool, flash_attn: bool | None,
               encode_cache_bytes: int, max_tiles: int | None, image_layout: str | None,
               chat_template: str | None) -> None:
        self.encoder = None
        if mmproj_path is not None:
            self.encoder = VisionEncoder(mmproj_path, text_model=self.model.ptr, n_threads=n_threads, use_gpu=use_gpu,
                                         flash_attn=flash_attn)
        self.cache = EncodeCache(encode_cache_bytes)
        # Media options (docs/high-resolution.md, docs/video.md); each may be changed between calls.
        self.max_tiles = max_tiles
        self.image_layout = image_layout
        self.max_video_tokens: int | None = None  # None: what the context leaves after the rest and the answer
        self.video_sampling = Sampling()
        self.video_measure = DEFAULT_MEASURE
        self.progress: Progress | None = None  # called as (what, done, total) while decoding and encoding
        self.template_name, self.template = self._chat_template(chat_template)
        self._held: list = []  # identities of the positions in the KV cache, in order

    def _chat_template(self, override: str | None) -> tuple[str, str]:
        """(name, template): `override` (a format name or file), else the GGUF's, else Llama-3's."""
        if override:
            chosen = resolve(override)
            return chosen.name, chosen.template
        if self.model.chat_template:
            return self.model.chat_format or "gguf", self.model.chat_template
        return "llama3 (the GGUF has no chat template)", FORMATS["llama3"].template

    def generate(self, prompt: str, images: list | tuple = (), videos: list | tuple = (),
                 system: str | None = None, media: list[tuple[str, object]] | None = None,
                 **sampling: object) -> Generation:
        """One user turn with media at its markers; see `chat` for sampling.

        `media` lists ("image" | "video", source) pairs in one order, instead of images and videos:
        it decides which comes first when the prompt has no markers.
        """
        if media is None:
            media = [("image", s) for s in images] + [("video", s) for s in videos]
        messages = ([Message("system", system)] if system else []) + [Message("user", prompt, media)]
        return self._run(messages, **sampling)

    def chat(self, messages: list[dict], **sampling: object) -> Generation:
        """Continue a conversation given as OpenAI-style messages (text, image and video parts).

        Sampling: max_tokens=256, temperature=0.8 (0: greedy), top_k=40, top_p=0.95, seed=None,
        stop=None (strings that end the answer), logit_bias=None ({token id: bias}, -100 bans a token),
        all_logits=False (keep prompt logits, for tests).
        """
        return self._run([message_from_openai(m) for m in messages], **sampling)

    def _run(self, messages: list[Message], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None,
             logit_bias: dict[int, float] | None = None, all_logits: bool = False) -> Generation:
        prompt, media_info = self._prepare(messages, max_tokens)
        sampler = Sampler(self.model, temperature, top_k, top_p, seed, logit_bias)
        return Generation(lambda gen: self._stream(gen, prompt, media_info, max_tokens, sampler, stop or [],
                                                   all_logits))

    def _prepare(self, messages: list[Message], answer_tokens: int = 0) -> tuple[_Prompt, list[dict]]:
        pieces, media = render(self.template, messages, self.model.bos_text, self.model.eos_text)
        if media and self.encoder is None:
            raise Llama3vError("this session has no mmproj, so it cannot take images or videos")
        images = {i: image_parts(src, i, self.encoder, self.cache, self.max_tiles, self.image_layout, self.progress)
                  for i, (kind, src) in enumerate(media) if kind == "image"}
        videos = {i: sample_video(src, i, self.encoder, self.video_sampling, self.progress)
                  for i, (kind, src) in enumerate(media) if kind == "video"}
        budget = self.max_video_tokens
        if videos and budget is None:
            # The context left after everything that is not a video row, the answer's room included.
            fixed = sum(len(self.model.tokenize_prompt(p)) for p in pieces if isinstance(p, str))
            fixed += sum(p.n if isinstance(p, Rows) else len(self.model.tokenize(p))
                         for parts in images.values() for p in parts)
            fixed += sum(len(self.model.tokenize(t)) for v in videos.values() for t in v.timestamp_texts)
            budget = default_budget(self.ctx.n_ctx, fixed, answer_tokens, len(videos))
        expanded = [images[i] if i in images else
                    video_parts(videos[i], self.encoder, self.cache, budget, self.video_measure, self.progress)
                    for i in range(len(media))]
        runs: list[list[int] | Rows] = []
        for piece in pieces:
            parts: list[Part] = expanded[piece] if isinstance(piece, int) else [piece]
            for part in parts:
                if isinstance(part, Rows):
                    runs.append(part)
                elif runs and isinstance(runs[-1], list):
                    runs[-1].extend(self.model.tokenize_prompt(part))
                else:
                    runs.append(self.model.tokenize_prompt(part))
        prompt = _Prompt(runs)
        n = len(prompt.identities())
        n_media = sum(r.n for r in runs if isinstance(r, Rows))
        if n >= self.ctx.n_ctx:
            tiled = any(p.meta.get("n_tiles", 1) > 1 for p in runs if isinstance(p, Rows))
            knobs = ["raise --n-ctx"] + (["lower --max-tiles"] if tiled else []) + \
                (["lower --max-video-tokens"] if videos else []) + ["give fewer or smaller media"]
            raise Llama3vError(f"the prompt needs {n} positions ({n_media} for media) but the context holds "
                               f"{self.ctx.n_ctx}: {', '.join(knobs)}")
        return prompt, [describe(parts) for parts in expanded]

    def _stream(self, gen: Generation, prompt: _Prompt, media_info: list[dict], max_tokens: int, sampler: Sampler,
                stop: list[str], all_logits: bool) -> Iterator[str]:
        try:
            encodes_before = self.encoder.n_encodes if self.encoder else 0
            t0 = time.perf_counter()
            keep, t1, _ = self._load(prompt, all_logits)
            t2 = time.perf_counter()

            tokens: list[int] = []
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text, emitted, finish = "", 0, "length"
            holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may be forming
            while len(tokens) < max_tokens and self.ctx.n_past < self.ctx.n_ctx:
                tok = sampler.sample(self.ctx)
                if self.model.is_end_of_generation(tok):
                    finish = "stop"
                    break
                tokens.append(tok)
                text += decoder.decode(self.model.piece(tok))
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                if len(tokens) < max_tokens:
                    self.ctx.decode_tokens([tok])
                    self._held.append(tok)
                if len(text) - holdback > emitted:
                    yield text[emitted:len(text) - holdback]
                    emitted = len(text) - holdback
            if finish != "stop" or not stop:
                text += decoder.decode(b"", final=True)
            if len(text) > emitted:
                yield text[emitted:]
            decode_s = time.perf_counter() - t2
            timings = {"encode_ms": (t1 - t0) * 1e3, "prompt_ms": (t2 - t1) * 1e3, "decode_ms": decode_s * 1e3,
                       "decode_tokens_per_s": len(tokens) / decode_s if decode_s > 0 and tokens else 0.0}
            for info in media_info:
                info["encode_ms"] = sum(info.get("tile_encode_ms", []))
            gen.result = Result(text=text, tokens=tokens, prompt_tokens=prompt.token_view(), finish_reason=finish,
                                timings=timings, n_reused=keep, media=media_info, chat_template=self.template_name,
                                n_encodes=(self.encoder.n_encodes if self.encoder else 0) - encodes_before)
        finally:
            sampler.close()

    def _load(self, prompt: _Prompt, all_logits: bool) -> tuple[int, float, np.ndarray]:
        """Encode what the prompt needs and decode it past the reusable KV prefix.

        Returns the reused length, the time encoding ended and the last position's logits; sets
        `prompt_logits` (every decoded position) with all_logits.
        """
        ids = prompt.identities()
        # Keep what the KV cache already holds, but decode at least the last position for its logits.
        keep = min(_common_prefix(self._held, ids), len(ids) - 1)
        todo = self._runs_after(prompt, keep)
        for run, _ in todo:
            if isinstance(run, Rows):
                run.data()
        encoded = time.perf_counter()
        self._held = []
        self.ctx.truncate(keep)
        outputs = [self._decode_run(run, skip, all_logits) for run, skip in todo]
        self.prompt_logits = np.concatenate(outputs) if all_logits else None
        self._held = list(ids)
        return keep, encoded, outputs[-1][-1] if all_logits else outputs[-1]

    def score(self, prompt: str, continuation: list[int], images: list | tuple = (), videos: list | tuple = (),
              system: str | None = None) -> np.ndarray:
        """Logits after the prompt and after each token of `continuation`: [len(continuation) + 1, n_vocab].

        Row i is the distribution that predicts continuation[i] (teacher forcing), as for KL measurements.
        """
        media = [("image", s) for s in images] + [("video", s) for s in videos]
        messages = ([Message("system", system)] if system else []) + [Message("user", prompt, media)]
        prepared, _ = self._prepare(messages, len(continuation))
        if len(prepared.identities()) + len(continuation) >= self.ctx.n_ctx:
            raise Llama3vError(f"prompt and continuation do not fit the context of {self.ctx.n_ctx}")
        _, _, last = self._load(prepared, all_logits=False)
        if not continuation:
            return last[None]
        rest = self.ctx.decode_tokens(list(continuation), all_logits=True)
        self._held.extend(continuation)
        return np.concatenate([last[None], rest])

    @staticmethod
    def _runs_after(prompt: _Prompt, keep: int) -> list[tuple[list[int] | Rows, int]]:
        """The runs that reach past position `keep`, each with how many of its positions to skip."""
        out, pos = [], 0
        for run in prompt.runs:
            n = len(run) if isinstance(run, list) else run.n
            if pos + n > keep:
                out.append((run, max(0, keep - pos)))
            pos += n
        return out

    def _decode_run(self, run: list[int] | Rows, skip: int, all_logits: bool) -> np.ndarray | None:
        if isinstance(run, list):
            return self.ctx.decode_tokens(run[skip:], all_logits)
        return self.ctx.decode_embeddings(run.data()[skip:], all_logits)

    def reset(self) -> None:
        """Forget the conversation held in the KV cache (encoded images stay cached)."""
        self._held = []
        self.ctx.truncate(0)

    def close(self) -> None:
        """Free llama.cpp's resources."""
        for part in (getattr(self, "encoder", None), getattr(self, "ctx", None), getattr(self, "model", None)):
            if part is not None:
                part.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
