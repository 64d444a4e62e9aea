"""How far a quantized model's next-token distributions are from the f32 model's, position by position.

KL(P_f32 || P_quant) = sum over the vocabulary of p_f32 * (log p_f32 - log p_quant), in nats, as
llama.cpp's `llama-perplexity --kl-divergence` reports it: the expected extra surprise of the
quantized model on text the f32 model would write. Computed in float64 from raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, float64, stable for large logits."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) at each position: [n_positions] nats, from [n_positions, n_vocab] each."""
    ref_logits, logits = np.atleast_2d(ref_logits), np.atleast_2d(logits)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
    log_p, log_q = log_softmax(ref_logits), log_softmax(logits)
    # Clipped at 0: a position with identical distributions can come out as -1e-17 by rounding.
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


@dataclass
class Divergence:
    """KL and top-1 agreement over a set of positions, with the worst one."""

    kl_mean: float
    kl_max: float
    worst: int  # index of the position with the largest KL
    top1_agree: float  # fraction of positions whose most likely token is the f32 model's
    n_positions: int


def compare(ref_logits: np.ndarray, logits: np.ndarray) -> Divergence:
    """Summarise how `logits` differ from `ref_logits` over all positions (rows)."""
    kl = kl_divergence(ref_logits, logits)
    agree = np.atleast_2d(ref_logits).argmax(-1) == np.atleast_2d(logits).argmax(-1)
    worst = int(kl.argmax())
    return Divergence(float(kl.mean()), float(kl[worst]), worst, float(agree.mean()), len(kl))
