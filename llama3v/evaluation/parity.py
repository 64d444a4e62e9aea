"""How closely the llama.cpp path follows the PyTorch reference: the metrics and the two comparisons.

NMSE = mean((x - ref)^2) / var(ref) over the whole [n_rows, n_embd] arrays (docs/fidelity.md).
Each side prepares nothing for the other: both start from the same uint8 tiles, llama.cpp encodes
them with libmtmd, the reference with PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from llama3v.models.llava import LlavaReference
from llama3v.models.video import fit_budget, sample_indices
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageInput, load_image, prepare_tile, process_image
from llama3v.runtime.session import Session
from llama3v.runtime.video import Sampling, VideoReader

# Embedding NMSE bounds per mmproj type (docs/fidelity.md): f32, f16 and q8_0 were set as goals; the others
# were measured on tiny CLIP/SigLIP and ViT-L/14-336 towers and set with margin.
NMSE_BOUNDS = {"f32": 1e-6, "f16": 1e-4, "bf16": 2e-4, "q8_0": 1e-3, "q6_k": 1e-2, "q5_k": 5e-2, "q5_1": 5e-2,
               "q5_0": 6e-2, "q4_k": 0.15, "q4_1": 0.2, "q4_0": 0.2}


def nmse(x: np.ndarray, ref: np.ndarray) -> float:
    """Mean squared error over the variance of the reference."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {ref.shape}")
    return float(np.mean((x - ref) ** 2) / np.var(ref))


def mean_row_cosine(x: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of the cosine similarity between matching rows."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    num = np.sum(x * ref, axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def tiles_of(images: list[ImageInput], encoder: VisionEncoder) -> np.ndarray:
    """The uint8 tiles both sides encode, [n, size, size, 3]."""
    return np.stack([prepare_tile(load_image(img), encoder.spec) for img in images])


def reference_rows(reference: LlavaReference, encoder: VisionEncoder, image: ImageInput,
                   max_tiles: int | None = None, layout_style: str | None = None) -> np.ndarray:
    """The rows the reference feeds the LLM for one image, from the runtime's tiles and layout."""
    spec = replace(encoder.spec, max_tiles=max_tiles) if max_tiles is not None else encoder.spec
    processed = process_image(load_image(image), spec)
    layout = processed.layout
    if layout.kind != "anyres":  # single tile, or global view + slices (separators are prompt text)
        return reference.encode_tiles(processed.tiles)
    if (layout_style or encoder.default_layout) == "hf":
        return reference.encode_anyres(processed.tiles, layout.grid, layout.image_size)
    per_tile = reference.encode_tiles(processed.tiles).reshape(layout.n_tiles, -1, reference.n_embd)
    return np.concatenate([*per_tile[1:], per_tile[0]])


def reference_video_rows(reference: LlavaReference, encoder: VisionEncoder, path: str, sampling: Sampling,
                         budget: int | None, measure: str = "pixels") -> tuple[list[int], np.ndarray]:
    """The frame indices the reference samples and the rows it feeds the LLM for a video (from the same frames)."""
    with VideoReader(path) as reader:
        info = reader.info
        indices = sample_indices(info.frame_count, info.fps, sampling.frames, sampling.fps, sampling.start,
                                 sampling.end)
        tiles = [prepare_tile(Image.fromarray(f.rgb), encoder.spec) for f in reader.frames(indices)]
    g = encoder.grid
    grids = reference.encode_tiles(np.stack(tiles)).reshape(len(tiles), g * g, reference.n_embd)
    _, rows, _ = fit_budget(list(grids), tiles, g, budget if budget is not None else len(tiles) * g * g, measure)
    return indices, np.concatenate(rows)


@dataclass
class EmbeddingParity:
    """llama.cpp's image embeddings against the reference's."""

    nmse: float
    cosine: float
    n_rows: int


def embedding_parity(reference: LlavaReference, encoder: VisionEncoder, images: list[ImageInput]) -> EmbeddingParity:
    """Encode the same tiles on both sides and compare the rows."""
    tiles = tiles_of(images, encoder)
    ours = np.concatenate([encoder.encode(t) for t in tiles])
    ref = reference.encode_tiles(tiles)
    return EmbeddingParity(nmse(ours, ref), mean_row_cosine(ours, ref), len(ref))


@dataclass
class GenerationParity:
    """Greedy tokens and prompt predictions of llama.cpp against the reference."""

    tokens: list[int]
    reference_tokens: list[int]
    margins: list[float]  # reference top-1 minus top-2 logit at each generated step
    prompt_top1_agree: int
    n_prompt: int
    max_logit_diff: float  # over all prompt positions
    prompt_margin_ratio: float  # min over prompt positions of (reference top-1 margin) / (max |logit diff| there)

    @property
    def tokens_equal(self) -> bool:
        """The generated tokens are the reference's."""
        return self.tokens == self.reference_tokens[:len(self.tokens)]


def generation_parity(reference: LlavaReference, session: Session, prompt: str, images: list[ImageInput],
                      n_steps: int = 16, videos: list[str] = ()) -> GenerationParity:
    """Greedy-generate `n_steps` on both sides from the same prompt and media (images first, then videos, as
    `generate` places them without markers); compare tokens and logits."""
    gen = session.generate(prompt, images=images, videos=videos, temperature=0, max_tokens=n_steps, all_logits=True)
    result = gen.wait()
    if result.n_reused:
        raise ValueError("generation parity needs a session whose KV cache does not already hold the prompt")
    ours = session.prompt_logits
    o = session.options
    blocks = [reference_rows(reference, session.encoder, img, o.max_tiles, o.image_layout) for img in images]
    blocks += [reference_video_rows(reference, session.encoder, v, o.video_sampling, info.budget, o.video_measure)[1]
               for v, info in zip(videos, result.media[len(images):], strict=True)]
    rows = np.concatenate(blocks) if blocks else None
    ref_logits = reference.logits(result.prompt_tokens, rows)
    ref_tokens, margins = reference.greedy(result.prompt_tokens, rows, n_steps)
    return GenerationParity(
        tokens=result.tokens,
        reference_tokens=ref_tokens,
        margins=margins,
        prompt_top1_agree=int(np.sum(ours.argmax(1) == ref_logits.argmax(1))),
        n_prompt=len(ref_logits),
        max_logit_diff=float(np.max(np.abs(ours - ref_logits))),
        prompt_margin_ratio=float(np.min(_margins(ref_logits) / np.max(np.abs(ours - ref_logits), axis=1))),
    )


def _margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]
