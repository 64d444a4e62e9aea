"""Log-probabilities of generated tokens: log-softmax of the model's raw logits (before sampling)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_TOP = 20  # OpenAI's upper bound for top_logprobs


@dataclass(frozen=True)
class Alternative:
    """A token, its text as bytes, and its log-probability."""

    token: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (with its log-probability) and the most likely tokens at its position, best first."""

    chosen: Alternative
    top: tuple[Alternative, ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) in float64 along the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The entry for `token` sampled from `logits`, with the `top` most likely tokens; `piece` gives token text."""
    lp = log_softmax(logits)
    best = np.argsort(-lp, kind="stable")[:top] if top > 0 else []
    return TokenLogprob(Alternative(int(token), piece(int(token)), float(lp[token])),
                        tuple(Alternative(int(t), piece(int(t)), float(lp[t])) for t in best))
