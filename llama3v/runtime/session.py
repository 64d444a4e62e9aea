"""A chat session: an LLM context plus a vision encoder, with KV-prefix reuse and an encode cache.

Each call builds the prompt as a sequence of token runs and embedding-row blocks, each position
with an identity (a token id, or a media key and row). The longest prefix that matches what the
KV cache already holds is kept; only the rest is encoded and decoded. A follow-up question about
the same photo therefore decodes only its new tokens and encodes nothing.

A session of `parallel` slots holds that many conversations at once, each in its own sequence of
one context with its own KV prefix. A generation is a series of steps: text pieces, and token ids
that must be decoded into its slot before it can go on. Iterating a `Generation` decodes each one
at once; a scheduler (the server's) instead gathers one token from every slot's generation and
decodes them in a single batch (`Session.decode_step`).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from llama3v import gguf_schema as S
from llama3v.chat_formats import FORMATS, resolve
from llama3v.errors import Llama3vError
from llama3v.mllama_format import IMAGE_SEPARATOR
from llama3v.progress import Progress
from llama3v.runtime import engine
from llama3v.runtime.context import Context, Sampler, TextModel
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.gguf_check import check_pair, is_mllama, read_gguf, read_model
from llama3v.runtime.logprobs import TokenLogprob, token_logprob
from llama3v.runtime.media import (
    EncodeCache,
    MediaInfo,
    Part,
    Rows,
    describe,
    image_parts,
    sample_video,
    video_parts,
)
from llama3v.runtime.mllama import CrossImages, MllamaEncoder, MllamaImage
from llama3v.runtime.options import SAMPLING, SessionOptions
from llama3v.runtime.prompt import MEDIA_SEP, Message, message_from_openai, render
from llama3v.runtime.video_budget import default_budget


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
    media: list[MediaInfo] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    chat_template: str = ""  # which prompt format built the prompt (Session.template_name)

    @property
    def n_prompt_tokens(self) -> int:
        """Prompt positions, media rows included."""
        return len(self.prompt_tokens)

    def to_json(self) -> dict:
        """The `llama3v run --json` object."""
        return {"text": self.text, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "n_prompt_tokens": self.n_prompt_tokens, "finish_reason": self.finish_reason,
                "n_reused_tokens": self.n_reused, "n_encodes": self.n_encodes,
                "media": [m.to_json() for m in self.media], "chat_template": self.chat_template,
                "timings": self.timings,
                "decode_tokens_per_s": self.timings.get("decode_tokens_per_s", 0.0)}


class Generation:
    """Iterate for text pieces as they are generated; `result` is set once iteration ends."""

    def __init__(self, run: Callable[[Generation], Iterator[str | int]], slot: int, decode: Callable[[int], None]):
        self.result: Result | None = None
        self.logprobs: list[TokenLogprob] = []  # grows token by token while streaming, when asked for
        self.slot = slot  # the session's sequence this conversation is decoded into
        self._steps = run(self)
        self._decode = decode

    def __iter__(self) -> Iterator[str]:
        for step in self._steps:
            if isinstance(step, int):
                self._decode(step)
            else:
                yield step

    def steps(self) -> Iterator[str | int]:
        """The raw steps, for a scheduler that batches decodes: text pieces, and token ids that must be decoded
        into `slot` (and nothing else decoded into the context) before the next step is asked for."""
        return self._steps

    def wait(self) -> Result:
        """Run to the end and return the result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop generating now (`result` stays None); the session keeps what was decoded so far."""
        self._steps.close()


@dataclass
class _Prompt:
    runs: list[list[int] | Rows]
    images: list[MllamaImage] = field(default_factory=list)  # mllama: the images of its <|image|> tokens, in order
    image_token: int | None = None

    def identities(self) -> list:
        out: list = []
        for run in self.runs:
            out.extend(run if isinstance(run, list) else ((run.key, i) for i in range(run.n)))
        if self.images:  # an <|image|> token is that image, not just its id
            keys = iter(img.key for img in self.images)
            out = [("image", next(keys)) if t == self.image_token else t for t in out]
        return out

    def token_view(self) -> list[int | None]:
        out: list[int | None] = []
        for run in self.runs:
            out.extend(run if isinstance(run, list) else [None] * run.n)
        return out


class Session:
    """A loaded model and mmproj; `generate` and `chat` stream text and keep the KV cache between calls."""

    def __init__(self, model_path: str | Path, mmproj_path: str | Path | None = None,
                 options: SessionOptions | None = None, progress: Progress | None = None, **overrides: object):
        """Load the model (and mmproj) with `options`, or SessionOptions' defaults changed by keyword (n_ctx=2048).

        `progress` is called as (what, done, total) while decoding and encoding."""
        self.options = replace(options or SessionOptions(), **overrides)
        o = self.options
        model_info = read_model(model_path)
        if mmproj_path is not None:
            check_pair(model_info, read_gguf(mmproj_path))
        if is_mllama(model_info):
            engine.mllama_lib()  # a clear error, before libllama meets an architecture it does not know
            if o.parallel != 1:  # the engine attaches images to the context, shared by every sequence
                raise Llama3vError("a Llama-3.2-Vision (mllama) model serves one conversation at a time: "
                                   "use parallel 1 (docs/mllama.md)")
        self.model = TextModel(model_path, n_gpu_layers=o.n_gpu_layers, info=model_info)
        self.ctx = Context(self.model, n_ctx=o.n_ctx, n_batch=o.n_batch, n_threads=o.n_threads, kv_type=o.kv_type,
                           flash_attn=o.flash_attn, n_seq=o.parallel)
        self._setup(mmproj_path, o.n_threads, o.n_gpu_layers != 0, progress)

    @classmethod
    def from_llama(cls, llama: object, mmproj_path: str | Path | None = None, options: SessionOptions | None = None,
                   use_gpu: bool = True, **overrides: object) -> Session:
        """A session over a `llama_cpp.Llama`'s own model and context, without loading the model again.

        The context, batch and thread count are the Llama's unless `options` sets n_threads."""
        self = cls.__new__(cls)
        model_info = read_model(llama.model_path)
        if mmproj_path is not None:
            check_pair(model_info, read_gguf(mmproj_path))
        self.model = TextModel(llama.model_path, info=model_info, borrow=llama._model.model)
        self.ctx = Context(self.model, n_ctx=llama.n_ctx(), n_batch=llama.n_batch, borrow=llama._ctx.ctx)
        opts = replace(options or SessionOptions(), **overrides)
        self.options = replace(opts, n_ctx=self.ctx.n_ctx, n_batch=llama.n_batch,
                               n_threads=opts.n_threads or llama.n_threads, parallel=1)
        self._setup(mmproj_path, self.options.n_threads, use_gpu, None)
        return self

    def _setup(self, mmproj_path: str | Path | None, n_threads: int | None, use_gpu: bool,
               progress: Progress | None) -> None:
        self.encoder = None
        self.cross = None  # mllama: the images attached to the context (runtime/mllama.py)
        if is_mllama(self.model.info):
            self.cross = CrossImages(self.ctx.ptr)
            self.image_token = int(self.model.info.get(S.MLLAMA_IMAGE_TOKEN_ID))
            if mmproj_path is not None:
                self.encoder = MllamaEncoder(mmproj_path, n_threads)
        elif mmproj_path is not None:
            self.encoder = VisionEncoder(mmproj_path, text_model=self.model.ptr, n_threads=n_threads, use_gpu=use_gpu,
                                         flash_attn=self.options.flash_attn)
        self.cache = EncodeCache(self.options.encode_cache_bytes)
        self.progress = progress
        self.template_name, self.template = self._chat_template(self.options.chat_template)
        # Per slot: identities of the positions in its KV cache, in order.
        self._held: list[list] = [[] for _ in range(self.ctx.n_seq)]
        self._last_use, self._uses = [0] * self.ctx.n_seq, 0  # when each slot last began a generation

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

        Sampling (defaults: runtime/options.py, SAMPLING): max_tokens, temperature (0: greedy), top_k, top_p,
        seed=None, stop=None (strings that end the answer), logit_bias=None ({token id: bias}, -100 bans a token),
        all_logits=False (keep prompt logits, for tests), logprobs=None (k: record each token's
        log-probability and the k likeliest, see runtime/logprobs.py), grammar=None (a GBNF grammar, root
        rule `root`, that constrains the answer), frequency_penalty=0 and presence_penalty=0 (OpenAI's, over
        the generated tokens), require_room=False (refuse a prompt that leaves the context less than
        max_tokens, instead of stopping where the context ends), slot=0 (which of the session's `parallel`
        sequences holds the conversation; a list of slots picks the one whose KV cache holds the longest prefix
        of this prompt, or else the one used longest ago).
        """
        return self._run([message_from_openai(m) for m in messages], **sampling)

    def complete(self, text: str, **sampling: object) -> Generation:
        """Continue raw text: BOS then `text` tokenized as is (no chat template, no media); sampling as in `chat`."""
        prompt = _Prompt([self.model.tokenize(self.model.bos_text + text)])
        n = len(prompt.identities())
        if not self.ctx.fits(n + 1):  # the prompt and the answer's first token
            raise Llama3vError(f"the prompt needs {n} positions but the context holds {self.ctx.n_ctx}: raise --n-ctx "
                               "or shorten the prompt")
        return self._start(prompt, [], **sampling)

    def _run(self, messages: list[Message], max_tokens: int = SAMPLING.max_tokens, **sampling: object) -> Generation:
        prompt, media_info = self._prepare(messages, max_tokens)
        return self._start(prompt, media_info, max_tokens, **sampling)

    def _start(self, prompt: _Prompt, media_info: list[MediaInfo], max_tokens: int = SAMPLING.max_tokens,
               temperature: float = SAMPLING.temperature, top_k: int = SAMPLING.top_k, top_p: float = SAMPLING.top_p,
               seed: int | None = None, stop: list[str] | None = None, logit_bias: dict[int, float] | None = None,
               all_logits: bool = False, logprobs: int | None = None,
               grammar: str | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               require_room: bool = False, slot: int | list[int] = 0) -> Generation:
        ids = prompt.identities()
        n = len(ids)
        slots = [slot] if isinstance(slot, int) else list(slot)
        if not slots or any(not 0 <= s < self.ctx.n_seq for s in slots):
            raise Llama3vError(f"slot {slot} is not one of this session's {self.ctx.n_seq}")
        # The longest prefix wins; among equals the slot used longest ago, so recent conversations stay for follow-ups.
        slot = max(slots, key=lambda s: (_common_prefix(self._held[s], ids), -self._last_use[s]))
        self._uses += 1
        self._last_use[slot] = self._uses
        if require_room and not self.ctx.fits(n + max_tokens):
            raise Llama3vError(f"max_tokens {max_tokens} does not fit: the context holds {self.ctx.n_ctx} positions "
                               f"and the prompt takes {n}, so at most {self.ctx.n_ctx - n} can be generated "
                               "(lower max_tokens or raise --n-ctx)")
        sampler = Sampler(self.model, temperature, top_k, top_p, seed, logit_bias, grammar, frequency_penalty,
                          presence_penalty, self.ctx.n_ctx)
        return Generation(lambda gen: self._stream(gen, prompt, media_info, max_tokens, sampler, stop or [],
                                                   all_logits, logprobs),
                          slot, lambda tok: self.ctx.decode_tokens([tok], seq=slot))

    def _prepare(self, messages: list[Message], answer_tokens: int = 0) -> tuple[_Prompt, list[MediaInfo]]:
        sep = IMAGE_SEPARATOR if self.cross is not None else MEDIA_SEP
        pieces, media = render(self.template, messages, self.model.bos_text, self.model.eos_text, sep)
        if media and self.encoder is None:
            raise Llama3vError("this session has no mmproj, so it cannot take images or videos")
        if self.cross is not None:
            return self._prepare_mllama(pieces, media)
        o = self.options
        images = {i: image_parts(src, i, self.encoder, self.cache, o.max_tiles, o.image_layout, self.progress)
                  for i, (kind, src) in enumerate(media) if kind == "image"}
        videos = {i: sample_video(src, i, self.encoder, o.video_sampling, self.progress)
                  for i, (kind, src) in enumerate(media) if kind == "video"}
        budget = o.max_video_tokens
        if videos and budget is None:
            # The context left after everything that is not a video row, the answer's room included.
            fixed = sum(len(self.model.tokenize_prompt(p)) for p in pieces if isinstance(p, str))
            fixed += sum(p.n if isinstance(p, Rows) else len(self.model.tokenize(p, False))
                         for parts in images.values() for p in parts)
            fixed += sum(len(self.model.tokenize(t, False)) for v in videos.values() for t in v.timestamp_texts)
            budget = default_budget(self.ctx.n_ctx, fixed, answer_tokens, len(videos))
        expanded = [images[i] if i in images else
                    video_parts(videos[i], self.encoder, self.cache, budget, o.video_measure, self.progress)
                    for i in range(len(media))]
        runs: list[list[int] | Rows] = []
        for piece in pieces:
            parts: list[Part] = expanded[piece] if isinstance(piece, int) else [piece]
            for part in parts:
                if isinstance(part, Rows):
                    runs.append(part)
                    continue
                # The template's control tokens only (prompt.Text); a media item's text (separators, times) is plain.
                ids = self.model.tokenize(part, False) if isinstance(piece, int) else self.model.tokenize_prompt(part)
                if runs and isinstance(runs[-1], list):
                    runs[-1].extend(ids)
                else:
                    runs.append(ids)
        prompt = _Prompt(runs)
        n = len(prompt.identities())
        n_media = sum(r.n for r in runs if isinstance(r, Rows))
        if not self.ctx.fits(n + 1):  # the prompt and the answer's first token
            tiled = any((p.info.n_tiles or 1) > 1 for p in runs if isinstance(p, Rows))
            knobs = ["raise --n-ctx"] + (["lower --max-tiles"] if tiled else []) + \
                (["lower --max-video-tokens"] if videos else []) + ["give fewer or smaller media"]
            raise Llama3vError(f"the prompt needs {n} positions ({n_media} for media) but the context holds "
                               f"{self.ctx.n_ctx}: {', '.join(knobs)}")
        return prompt, [describe(parts) for parts in expanded]

    def _prepare_mllama(self, pieces: list[str | int], media: list) -> tuple[_Prompt, list[MediaInfo]]:
        """The prompt of an mllama model: plain tokens, each image one <|image|> token (its states are attached)."""
        if any(kind != "image" for kind, _ in media):
            raise Llama3vError("Llama-3.2-Vision (mllama) models take images, not videos")
        images = []
        for i, (_, source) in enumerate(media):
            tiles = self.encoder.tiles(source)
            info = MediaInfo(i, "image", [0.0], layout="mllama", grid=list(tiles.grid), n_tiles=tiles.n_tiles)
            slots = self.options.mllama_tile_slots
            images.append(MllamaImage(self.encoder.key(tiles, slots), tiles, info, slots))
        tokens: list[int] = []
        for piece in pieces:
            tokens.extend([self.image_token] if isinstance(piece, int) else self.model.tokenize_prompt(piece))
        if not self.ctx.fits(len(tokens) + 1):  # the prompt and the answer's first token
            raise Llama3vError(f"the prompt needs {len(tokens)} positions but the context holds {self.ctx.n_ctx}: "
                               "raise --n-ctx or shorten the prompt")
        return _Prompt([tokens], images, self.image_token), [img.info for img in images]

    def _stream(self, gen: Generation, prompt: _Prompt, media_info: list[MediaInfo], max_tokens: int, sampler: Sampler,
                stop: list[str], all_logits: bool, logprobs: int | None) -> Iterator[str | int]:
        slot = gen.slot
        try:
            encodes_before = self.encoder.n_encodes if self.encoder else 0
            t0 = time.perf_counter()
            keep, t1, _ = self._load(prompt, all_logits, slot)
            t2 = time.perf_counter()

            tokens: list[int] = []
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text, emitted, finish = "", 0, "length"
            holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may be forming
            while len(tokens) < max_tokens and self.ctx.fits(self.ctx.n_past[slot] + 1):
                tok = sampler.sample(self.ctx, slot)
                if self.model.is_end_of_generation(tok):
                    finish = "stop"
                    break
                tokens.append(tok)
                if logprobs is not None:
                    gen.logprobs.append(token_logprob(self.ctx.logits(slot), tok, logprobs, self.model.piece))
                text += decoder.decode(self.model.piece(tok))
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                if len(tokens) < max_tokens:
                    yield tok  # decoded into the slot before this generator is resumed
                    self._held[slot].append(tok)
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
            if self.cross is not None:  # mllama: computing the images' cross-attention K/V, within encode_ms
                timings["cross_states_ms"] = self._cross_ms
            gen.result = Result(text=text, tokens=tokens, prompt_tokens=prompt.token_view(), finish_reason=finish,
                                timings=timings, n_reused=keep, media=media_info,
                                logprobs=list(gen.logprobs) if logprobs is not None else None,
                                chat_template=self.template_name,
                                n_encodes=(self.encoder.n_encodes if self.encoder else 0) - encodes_before)
        finally:
            sampler.close()

    def _load(self, prompt: _Prompt, all_logits: bool, slot: int = 0) -> tuple[int, float, np.ndarray]:
        """Encode what the prompt needs and decode it past the reusable KV prefix.

        Returns the reused length, the time encoding ended and the last position's logits; sets
        `prompt_logits` (every decoded position) with all_logits.
        """
        ids = prompt.identities()
        if self.cross is not None:
            plan = self.cross.plan(prompt.runs[0] if prompt.runs else [], self.image_token, prompt.images)
            if plan != self.cross.attached:
                self._held[slot] = []  # text before the first image depends on every image: nothing is reusable
                self.ctx.truncate(0, slot)
            self._cross_ms = self.cross.sync(plan, prompt.images, self.encoder, self.cache)
        # Keep what the KV cache already holds, but decode at least the last position for its logits.
        keep = min(_common_prefix(self._held[slot], ids), len(ids) - 1)
        todo = self._runs_after(prompt, keep)
        for run, _ in todo:
            if isinstance(run, Rows):
                run.data()
        encoded = time.perf_counter()
        self._held[slot] = []
        self.ctx.truncate(keep, slot)
        outputs = [self._decode_run(run, skip, all_logits, slot) for run, skip in todo]
        self.prompt_logits = np.concatenate(outputs) if all_logits else None
        self._held[slot] = list(ids)
        return keep, encoded, outputs[-1][-1] if all_logits else outputs[-1]

    def score(self, prompt: str, continuation: list[int], images: list | tuple = (), videos: list | tuple = (),
              system: str | None = None) -> np.ndarray:
        """Logits after the prompt and after each token of `continuation`: [len(continuation) + 1, n_vocab].

        Row i is the distribution that predicts continuation[i] (teacher forcing), as for KL measurements.
        """
        media = [("image", s) for s in images] + [("video", s) for s in videos]
        messages = ([Message("system", system)] if system else []) + [Message("user", prompt, media)]
        prepared, _ = self._prepare(messages, len(continuation))
        if not self.ctx.fits(len(prepared.identities()) + len(continuation)):
            raise Llama3vError(f"prompt and continuation do not fit the context of {self.ctx.n_ctx}")
        _, _, last = self._load(prepared, all_logits=False)
        if not continuation:
            return last[None]
        rest = self.ctx.decode_tokens(list(continuation), all_logits=True)
        self._held[0].extend(continuation)
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

    def _decode_run(self, run: list[int] | Rows, skip: int, all_logits: bool, slot: int) -> np.ndarray | None:
        if isinstance(run, list):
            return self.ctx.decode_tokens(run[skip:], all_logits, slot)
        return self.ctx.decode_embeddings(run.data()[skip:], all_logits, slot)

    def decode_step(self, tokens: dict[int, int]) -> None:
        """Decode the token each generation asked for ({slot: token}) in one batch (continuous batching)."""
        self.ctx.decode_step(tokens)

    def reset(self) -> None:
        """Forget the conversations held in the KV cache (encoded images stay cached)."""
        for slot in range(self.ctx.n_seq):
            self._held[slot] = []
            self.ctx.truncate(0, slot)
        if self.cross is not None:
            self.cross.clear()

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
