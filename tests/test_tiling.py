"""High-resolution images: LLaVA-NeXT anyres against transformers, slices, layouts, multi-image, caching."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, PreTrainedTokenizerFast
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llama3v.errors import Llama3vError
from llama3v.evaluation.parity import NMSE_BOUNDS as BOUNDS
from llama3v.evaluation.parity import generation_parity, nmse, reference_rows
from llama3v.evaluation.scenes import scene
from llama3v.models.llava import LlavaReference
from llama3v.runtime import engine
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageSpec, load_image, prepare_tile, process_image
from llama3v.runtime.media import EncodeCache, Rows, image_parts
from llama3v.runtime.session import Session
from llama3v.runtime.tile_arrangement import n_rows
from llama3v.testing.factory import TinySpec

PINPOINTS_336 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
PINPOINTS_56 = tuple((h // 6, w // 6) for h, w in PINPOINTS_336)  # the same grids for a 56-pixel tower
NEXT = TinySpec(grid_pinpoints=PINPOINTS_56, seed=10)  # seed: margins over the numeric error (test_parity)
ODD_SIZES = [(672, 336), (800, 600), (1000, 300), (300, 300), (1, 4000), (4000, 1)]


@pytest.fixture(scope="module")
def hf_processor(tiny):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny(NEXT).ckpt / "tokenizer.json"))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(p) for p in PINPOINTS_336],
        do_rescale=False, do_normalize=False)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("size", ODD_SIZES)
def test_anyres_tiles_and_token_counts_equal_hf(hf_processor, size):
    image = scene(sum(size), *size)
    ours = process_image(image, ImageSpec(336, "squash", grid_pinpoints=PINPOINTS_336))
    hf = hf_processor.image_processor(image, return_tensors="np")
    hf_tiles = np.asarray(hf["pixel_values"][0]).transpose(0, 2, 3, 1)
    assert ours.tiles.shape == hf_tiles.shape
    np.testing.assert_array_equal(ours.tiles, hf_tiles.round().astype(np.uint8))
    h, w = size[1], size[0]
    expected = hf_processor._get_number_of_features(h, w, 336, 336) - 1  # minus CLS under "default"
    assert n_rows(ours.layout, 24, "hf") == expected
    assert n_rows(ours.layout, 24, "llama.cpp") == ours.layout.n_tiles * 576


def test_max_tiles_limits_the_anyres_grid():
    image = scene(1, 1000, 300)
    full = process_image(image, ImageSpec(336, "squash", grid_pinpoints=PINPOINTS_336))
    capped = process_image(image, ImageSpec(336, "squash", grid_pinpoints=PINPOINTS_336, max_tiles=2))
    base_only = process_image(image, ImageSpec(336, "squash", grid_pinpoints=PINPOINTS_336, max_tiles=1))
    assert full.layout.grid == (1, 3) and capped.layout.grid == (1, 2) and base_only.layout.grid == (0, 0)
    assert [p.layout.n_tiles for p in (full, capped, base_only)] == [4, 3, 1]


@pytest.fixture(scope="module")
def next_built(tiny):
    return tiny(NEXT, "hf-5", "f32")


@pytest.fixture(scope="module")
def next_reference(next_built):
    return LlavaReference.from_checkpoint(next_built.ckpt)


def test_reference_matches_transformers_llava_next(next_built, next_reference, picture):
    """The reference's LLaVA-NeXT packing (unpad + newline) equals transformers' on the same tiles."""
    model = LlavaNextForConditionalGeneration.from_pretrained(next_built.ckpt, dtype=torch.float32).eval()
    spec = ImageSpec(56, "squash", grid_pinpoints=PINPOINTS_56)
    processed = process_image(load_image(picture), spec)
    rows = next_reference.encode_anyres(processed.tiles, processed.layout.grid, processed.layout.image_size)
    image_token = model.config.image_token_index
    prompt = [1, 5, 9] + [None] * len(rows) + [7, 3, 2]
    ids = torch.tensor([[image_token if t is None else t for t in prompt]])
    mean = torch.tensor(next_reference.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(next_reference.config.image_std).view(1, 3, 1, 1)
    pixels = ((torch.from_numpy(processed.tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std)[None]
    w, h = processed.layout.image_size
    with torch.no_grad():
        hf = model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[h, w]])).logits[0].numpy()
    ours = next_reference.logits(prompt, rows)
    assert np.max(np.abs(hf - ours)) < 1e-4


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_anyres_rows_within_bounds(tiny, next_reference, picture, scenes_dir, outtype):
    encoder = VisionEncoder(tiny(NEXT, "hf-5", outtype).mmproj, flash_attn=False)
    assert encoder.default_layout == "hf" and encoder.newline is not None
    for image in (picture, *scenes_dir):
        (block,) = image_parts(image, 0, encoder, EncodeCache())
        processed = process_image(load_image(image), encoder.spec)
        ref = next_reference.encode_anyres(processed.tiles, processed.layout.grid, processed.layout.image_size)
        assert block.n == len(ref)
        assert nmse(block.data(), ref) < BOUNDS[outtype]


def test_llama_cpp_layout_is_tiles_then_base(next_built, picture):
    encoder = VisionEncoder(next_built.mmproj)
    (block,) = image_parts(picture, 0, encoder, EncodeCache(), layout_style="llama.cpp")
    processed = process_image(load_image(picture), encoder.spec)
    per_tile = [encoder.encode(t) for t in processed.tiles]
    np.testing.assert_array_equal(block.data(), np.concatenate([*per_tile[1:], per_tile[0]]))


def test_anyres_greedy_generation_matches_the_reference(next_built, next_reference, picture):
    with Session(next_built.model, next_built.mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as s:
        p = generation_parity(next_reference, s, "Describe the picture.", [picture], n_steps=16)
    assert len(p.tokens) == 16 and p.tokens == p.reference_tokens[:16]
    assert len(set(p.tokens)) >= 6
    assert min(p.margins) > 2 * p.max_logit_diff
    assert p.prompt_top1_agree == p.n_prompt and p.prompt_margin_ratio > 2


def test_slices_layout_and_counts(tiny, picture):
    built = tiny(TinySpec(seed=2))
    encoder = VisionEncoder(built.mmproj)
    parts = image_parts(picture, 0, encoder, EncodeCache(), max_tiles=4)
    shape = [p.n if isinstance(p, Rows) else p for p in parts]
    assert shape == [16, "\n", 16, " ", 16, "\n", 16, " ", 16], "global view, then a 2 x 2 grid of slices"
    image = load_image(picture)
    full = np.asarray(image.resize((112, 112), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(parts[0].data(), encoder.encode(prepare_tile(image, encoder.spec)))
    np.testing.assert_array_equal(parts[4].data(), encoder.encode(np.ascontiguousarray(full[:56, 56:])))
    small = Image.new("RGB", (40, 30), (200, 10, 10))
    assert len(image_parts(small, 0, encoder, EncodeCache(), max_tiles=4)) == 1, "small images are not sliced"
    wide = image_parts(scene(1, 1000, 300), 0, encoder, EncodeCache(), max_tiles=6)
    assert [p for p in wide if isinstance(p, str)] == ["\n", " ", " ", " ", " "], "1 x 5 for a 10:3 image"


def test_two_tiled_images_each_at_its_marker(next_built, next_reference, picture, scenes_dir):
    images = [scenes_dir[0], picture]
    with Session(next_built.model, next_built.mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as s:
        p = generation_parity(next_reference, s, "Is <image> like <image>?", images, n_steps=4)
        ours = s.prompt_logits
        s.reset()
        result = s.generate("Is <image> like <image>?", images=images, temperature=0, max_tokens=1).wait()
        rows = [reference_rows(next_reference, s.encoder, img) for img in images]
    counts = [m.rows for m in result.media]
    assert counts == [len(r) for r in rows] and counts[0] == counts[1], "both 4:3, so the same grid"
    none_at = [i for i, t in enumerate(result.prompt_tokens) if t is None]
    first, second = none_at[:counts[0]], none_at[counts[0]:]
    assert first == list(range(first[0], first[0] + counts[0])), "the first image is one contiguous block"
    assert second == list(range(second[0], second[0] + counts[1]))
    assert second[0] - first[-1] > 1, "text between the two markers"
    assert p.max_logit_diff < 0.1, "every position follows the reference: each image is at its own marker"
    swapped = next_reference.logits(result.prompt_tokens, np.concatenate(rows[::-1]))
    assert np.max(np.abs(swapped - ours)) > 1.0, "placing the images the other way round would be visible"


def test_second_turn_with_a_tiled_image_encodes_nothing(next_built, picture):
    with Session(next_built.model, next_built.mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as s:
        first = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=4).wait()
        again = s.generate("Describe <image> again.", images=[picture], temperature=0, max_tokens=4,
                           all_logits=True).wait()
        warm = s.prompt_logits
        s.reset()
        s.cache = EncodeCache()
        cold = s.generate("Describe <image> again.", images=[picture], temperature=0, max_tokens=4,
                          all_logits=True).wait()
    assert first.n_encodes == first.media[0].n_tiles == 5
    assert again.n_encodes == 0 and cold.n_encodes == 5
    np.testing.assert_allclose(warm, s.prompt_logits[again.n_reused:], atol=1e-4)


def test_too_many_tiles_for_the_context_names_the_knobs(tiny, picture):
    built = tiny(TinySpec(seed=2))
    with Session(built.model, built.mmproj, n_ctx=256, max_tiles=6) as s:
        with pytest.raises(Llama3vError, match=r"needs \d+ positions .* lower --max-tiles"):
            s.generate("<image> <image> <image>", images=[picture] * 3)
        s.options.max_tiles = None
        assert len(s.generate("<image> <image> <image>", images=[picture] * 3, max_tokens=1).wait().tokens) == 1


def test_upstream_libmtmd_tiles_our_llava_next_mmproj(next_built, picture):
    """The same mmproj serves upstream llama.cpp: libmtmd's own tokenizer tiles a large image with it."""
    _, mtmd = engine.libs()
    with Session(next_built.model, next_built.mmproj) as s:
        ctx = s.encoder._ctx
        img = np.ascontiguousarray(np.asarray(load_image(picture).resize((112, 56))))
        bitmap = mtmd.mtmd_bitmap_init(112, 56, img.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text(text=mtmd.mtmd_default_marker(), text_len=len(mtmd.mtmd_default_marker()),
                                    add_special=False, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        kinds = [mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                 for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    assert kinds.count(mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE) == 3, "a 2-tile grid plus the overview"
