"""The mllama reference (llama3v.models.mllama) and tile preprocessing against transformers, the oracle.

Tiny random MllamaForConditionalGeneration checkpoints in HF's format (llama3v.testing.mllama_factory)
are loaded by transformers, which must find every parameter in the file; prompts and cross-attention
masks come from transformers' MllamaProcessor, pixels from MllamaImageProcessorPil, and the reference
reads the same checkpoint through llama3v's own loader with llama3v's own tiles. Bound: max abs diff
< 1e-4 on F32 logits.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference needs the optional torch extra")
transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")

from PIL import Image  # noqa: E402
from transformers.models.mllama import image_processing_pil_mllama as hf_image  # noqa: E402
from transformers.models.mllama import processing_mllama as hf_processing  # noqa: E402

from llama3v.evaluation.scenes import scene  # noqa: E402
from llama3v.mllama_format import IMAGE_TOKEN, aspect_ratios, cross_attention_spans  # noqa: E402
from llama3v.models.mllama import MllamaReference  # noqa: E402
from llama3v.runtime.mllama_image import best_canvas, fit_to_canvas, mllama_tiles  # noqa: E402
from llama3v.testing.mllama_factory import TinyMllamaSpec, make_mllama_checkpoint  # noqa: E402

TOL = 1e-4  # reference vs HF transformers, max abs diff on F32 logits
# Two cross-attention layers, GQA (4 query heads, 2 KV heads), 17 positions per tile padded to 24,
# llama3 rope scaling that matters past position 16.
SPEC = TinyMllamaSpec(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 16}, seed=3)
# (width, height): one tile; a wide image on a 1 x 3 grid; a tall one on 3 x 1; a 2 x 2 downscale.
SIZES = {"one-tile": (28, 28), "wide": (90, 30), "tall": (25, 80), "big": (200, 150)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint dir, HF model loaded from it, reference loaded from it, MllamaProcessor)."""
    path = make_mllama_checkpoint(tmp_path_factory.mktemp("mllama"), SPEC)
    model, info = transformers.MllamaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    ref = MllamaReference.from_checkpoint(path)
    cfg = ref.config
    image_processor = hf_image.MllamaImageProcessorPil(
        size={"height": cfg.vision.image_size, "width": cfg.vision.image_size}, max_image_tiles=cfg.max_image_tiles,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return path, model, ref, hf_processing.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _image(kind: str, variant: int = 0) -> Image.Image:
    w, h = SIZES[kind]
    return scene(variant, w, h)


def _normalize(tiles: np.ndarray, mean, std) -> np.ndarray:
    """HF's rescale + normalize, written independently of the reference: [N,H,W,3] uint8 -> [N,3,H,W]."""
    x = (tiles.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(0, 3, 1, 2)


def test_canvas_and_fit_equal_transformers():
    for max_tiles in (1, 2, 4, 6):
        for h in (1, 13, 28, 29, 55, 56, 100, 333, 1000):
            for w in (1, 17, 28, 60, 84, 112, 500, 2000):
                assert best_canvas(h, w, max_tiles, 28) == tuple(
                    int(v) // 28 for v in hf_image.get_optimal_tiled_canvas(h, w, max_tiles, 28)), (h, w, max_tiles)
                ch, cw = best_canvas(h, w, max_tiles, 28)
                assert fit_to_canvas(h, w, ch * 28, cw * 28, 28) == tuple(
                    int(v) for v in hf_image.get_image_size_fit_to_canvas(h, w, ch * 28, cw * 28, 28))
    assert aspect_ratios(4) == hf_image.get_all_supported_aspect_ratios(4)


@pytest.mark.parametrize("kind", list(SIZES))
def test_pixels_equal_mllama_image_processor(built, kind):
    _, _, ref, processor = built
    cfg = ref.config
    img = _image(kind)
    ours = mllama_tiles(img, cfg.vision.image_size, cfg.max_image_tiles)
    hf = processor.image_processor(images=[[img]], return_tensors="np")
    rows, cols = ours.grid
    assert hf["num_tiles"] == [[rows * cols]] and ours.n_tiles == rows * cols
    assert int(hf["aspect_ratio_ids"][0, 0]) == ours.aspect_ratio_id
    np.testing.assert_array_equal(hf["aspect_ratio_mask"][0, 0], [1] * ours.n_tiles + [0] * (4 - ours.n_tiles))
    pixels = hf["pixel_values"][0, 0]
    diff = float(np.abs(pixels[:ours.n_tiles] - _normalize(ours.tiles, cfg.image_mean, cfg.image_std)).max())
    print(f"{kind}: grid {ours.grid}, max abs pixel diff {diff:.3g}")
    assert diff < 1e-6  # the same uint8 values (one step is ~0.015 after normalisation)
    assert not pixels[ours.n_tiles:].any(), "padding tiles are zeros after normalisation"
    assert {"one-tile": (1, 1), "wide": (1, 3), "tall": (3, 1), "big": (2, 2)}[kind] == ours.grid


def test_photo_pixels_equal_mllama_image_processor(built, photo):
    _, _, ref, processor = built
    img = Image.open(photo).convert("RGB")
    ours = mllama_tiles(img, ref.config.vision.image_size, ref.config.max_image_tiles)
    hf = processor.image_processor(images=[[img]], return_tensors="np")
    pixels = hf["pixel_values"][0, 0, :ours.n_tiles]
    np.testing.assert_allclose(pixels, _normalize(ours.tiles, ref.config.image_mean, ref.config.image_std), atol=1e-6)


SPAN_CASES = [[5, 9, 1, 7], [1, 9, 2, 3, 9, 4], [9, 9, 1, 2], [1, 9, 9, 2, 9, 3, 4], [1, 2, 9], [1, 2]]


@pytest.mark.parametrize("ids", SPAN_CASES)
def test_cross_attention_spans_equal_mllama_processor(ids):
    want = hf_processing.get_cross_attention_token_mask(ids, 9)
    want = [(a, len(ids) if b == -1 else b) for a, b in want]
    assert cross_attention_spans(ids, 9) == want


def _inputs(processor, text: str, images: list[Image.Image]):
    return processor(text=text, images=[images] if images else None, return_tensors="pt")


def _compare(built, text: str, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    _, model, ref, processor = built
    inputs = _inputs(processor, text, images)
    ids = inputs["input_ids"][0].tolist()
    cfg = ref.config
    tiles = [mllama_tiles(img, cfg.vision.image_size, cfg.max_image_tiles) for img in images]
    got = ref.logits(ids, [(t.tiles, t.aspect_ratio_id) for t in tiles])
    with torch.no_grad():
        want = model(**inputs).logits[0].numpy()
    assert got.shape == want.shape == (len(ids), cfg.text.vocab_size)
    return got, want


CASES = {
    "one-tile": ("<|image|>What is in this picture, and where?", ["one-tile"]),
    "wide, text before the image": ("Look here: <|image|>What is in this picture?", ["wide"]),
    "two images": ("<|image|>first, then<|image|>second: compare them.", ["tall", "big"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(built, case):
    text, kinds = CASES[case]
    got, want = _compare(built, text, [_image(k, i) for i, k in enumerate(kinds)])
    assert want.std() > 1.0, "logits too flat for the comparison to mean anything"
    diff = float(np.abs(got - want).max())
    print(f"{case}: {len(got)} positions, max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_long_prompt_exercises_rope_scaling(built):
    text = "<|image|>" + "tell me about the shapes and the colours " * 3
    got, want = _compare(built, text, [_image("wide")])
    assert len(got) > 2 * SPEC.rope_scaling["original_max_position_embeddings"]
    diff = float(np.abs(got - want).max())
    print(f"{len(got)} positions: max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_text_only_matches_transformers(built):
    got, want = _compare(built, "No picture here, only words.", [])
    diff = float(np.abs(got - want).max())
    print(f"text only: max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_image_matters_and_reaches_text_before_it(built):
    """The image changes every position after it; as in HF, it also reaches text before <|image|>."""
    _, model, ref, processor = built
    text = "Look here: <|image|>What is it?"
    a, _ = _compare(built, text, [_image("wide", 0)])
    b, _ = _compare(built, text, [_image("wide", 5)])
    ids = _inputs(processor, text, [_image("wide")])["input_ids"][0].tolist()
    first_image = ids.index(ref.config.image_token_index)
    assert np.abs(a[first_image:] - b[first_image:]).max() > 1000 * TOL
    # A text row that sees no image attends uniformly to all image positions (HF's zeroed mask row).
    assert np.abs(a[:first_image] - b[:first_image]).max() > 1000 * TOL
    states = [ref.vision_states(mllama_tiles(_image("wide", v), 28, 4).tiles, 3) for v in (0, 5)]
    assert states[0].shape == (ref.n_states, ref.config.text.hidden_size)
    assert np.abs(states[0] - states[1]).max() > 1000 * TOL, "the encoder depends on the image"


def test_greedy_matches_transformers(built):
    _, model, ref, processor = built
    images = [_image("wide", 2)]
    inputs = _inputs(processor, "<|image|>Describe it:", images)
    ids = inputs["input_ids"][0].tolist()
    tiles = mllama_tiles(images[0], 28, 4)
    tokens, margins = ref.greedy(ids, [(tiles.tiles, tiles.aspect_ratio_id)], n_steps=8)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert tokens == out[0, len(ids):].tolist()
    assert len(set(tokens)) > 2, f"degenerate continuation {tokens}"
    assert min(margins) > 10 * TOL, f"near tie in {margins}"


def test_rejects_mismatched_images(built):
    _, _, ref, _ = built
    tiles = mllama_tiles(_image("wide"), 28, 4)
    image_id = ref.config.image_token_index
    with pytest.raises(ValueError, match="image"):
        ref.logits([1, image_id, 2], [])
    with pytest.raises(ValueError, match="image"):
        ref.logits([1, 2], [(tiles.tiles, tiles.aspect_ratio_id)])
    with pytest.raises(ValueError, match="aspect_ratio_id"):
        ref.logits([image_id, 2], [(tiles.tiles, 99)])
    assert ref.logits([image_id, 2], [(tiles.tiles, tiles.aspect_ratio_id)]).shape[0] == 2  # valid input works


def test_image_token_is_in_the_tokenizer(built):
    path, _, ref, processor = built
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == ref.config.image_token_index
    assert ref.config.image_token_index == ref.config.text.vocab_size
