"""Facts of Llama-3.2-Vision (mllama) shared by the converter, the reference and the runtime (no torch, no numpy).

The image token, the tile grids and their aspect-ratio ids, and HF's cross-attention spans (which
image each text token sees). The mllama GGUF names are in gguf_schema.py with the others.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<|image|>"
# What follows an image given before a message's text: nothing, as in MllamaProcessor's prompts
# (`<|image|>Describe it:`), where LLaVA formats put a newline.
IMAGE_SEPARATOR = ""

def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, columns) of at most `max_tiles` tiles, in MllamaImageProcessor's id order (id = index + 1)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """For each <|image|> in `ids`, the half-open range of positions that attend to that image (MllamaProcessor).

    Image k is seen from its own token up to the next image token; the last image until the end.
    A run of adjacent image tokens is one group: each of them is seen until the group's end span.
    Positions before the first image token see no image.
    """
    starts = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(starts, [*starts[1:], len(ids)], strict=False)]  # no image: no span
    end = len(ids)
    for span in reversed(spans):
        if span[1] == span[0] + 1:  # directly followed by another image token
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]
