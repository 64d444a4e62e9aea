"""How a session runs: the options and defaults that the CLI, `Session`, the server and the chat handler share.

Importing this module loads no llama.cpp: the CLI builds its parser from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama3v.runtime.video import Sampling
from llama3v.runtime.video_budget import DEFAULT_MEASURE


@dataclass(frozen=True)
class SamplingDefaults:
    """What `Session.generate`/`chat` and `llama3v run` use when not told; OpenAI requests keep OpenAI's defaults
    (runtime/openai_api.py) and the chat handler llama-cpp-python's."""

    max_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95


SAMPLING = SamplingDefaults()
# A conversation's answers (`llama3v chat`, the server when a request sets no max_tokens) may run longer.
CONVERSATION_MAX_TOKENS = 512
# Llama-3.2-Vision: which tile slots the encoder computes (docs/mllama.md, rule 1): every one, as transformers
# does, or the image's real tiles only.
TILE_SLOTS = ("all", "real")


@dataclass
class SessionOptions:
    """A session's settings: the first group is fixed when the model loads; the media group may change between
    calls (`session.options.max_tiles = 4`)."""

    n_ctx: int = 4096  # positions in the context; past the model's trained length llama3v warns
    n_threads: int | None = None  # None: every available core
    n_gpu_layers: int = 0  # on Metal/CUDA builds
    n_batch: int = 512
    kv_type: str = "f16"  # f16 or f32 (parity tests)
    flash_attn: bool | None = None  # None: llama.cpp decides
    encode_cache_bytes: int = 256 << 20  # encoded tiles and frames kept for reuse
    parallel: int = 1  # conversations decoded together (slots), each with n_ctx positions of its own KV cache
    chat_template: str | None = None  # a format name or template file instead of the GGUF's (docs/prompts.md)

    # Media (docs/high-resolution.md, docs/video.md).
    max_tiles: int | None = None  # None: the model's own behaviour, no slices
    image_layout: str | None = None  # LLaVA-NeXT rows: "hf" or "llama.cpp"; None: hf where the mmproj has a newline
    max_video_tokens: int | None = None  # None: what the context leaves after the rest of the prompt and the answer
    video_sampling: Sampling = field(default_factory=Sampling)
    video_measure: str = DEFAULT_MEASURE
    mllama_tile_slots: str = "all"  # one of TILE_SLOTS
