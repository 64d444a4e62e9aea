"""Sessions: media at their markers, KV-prefix reuse, the encode cache, sampling and stopping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from llama3v.errors import Llama3vError
from llama3v.evaluation.parity import generation_parity
from llama3v.models.llava import LlavaReference
from llama3v.runtime.media import EncodeCache
from llama3v.runtime.options import SessionOptions
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


def _session(built, **kw) -> Session:
    return Session(built.model, built.mmproj, n_ctx=kw.pop("n_ctx", 1024), kv_type="f32", flash_attn=False, **kw)


def _none_runs(prompt_tokens: list) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, t in enumerate(prompt_tokens + [0]):
        if t is None and start is None:
            start = i
        elif t is not None and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_two_images_each_at_its_marker(built, picture, scenes_dir):
    reference = LlavaReference.from_checkpoint(built.ckpt)
    with _session(built) as s:
        p = generation_parity(reference, s, "Compare <image> with <image> please.", [picture, scenes_dir[0]], 8)
        result = s.generate("Compare <image> with <image> please.", images=[picture, scenes_dir[0]],
                            temperature=0, max_tokens=1).wait()
    assert p.prompt_top1_agree == p.n_prompt, "the reference fills the first marker with the first image"
    runs = _none_runs(result.prompt_tokens)
    assert [n for _, n in runs] == [16, 16]
    between = result.prompt_tokens[runs[0][0] + 16:runs[1][0]]
    with _session(built) as s:
        assert between == s.model.tokenize(" with ")
    with _session(built) as s:
        swapped = generation_parity(reference, s, "Compare <image> with <image> please.", [scenes_dir[0], picture], 8)
    assert swapped.tokens != p.tokens, "the order of the images matters"


def test_media_without_markers_go_before_the_text(built, picture):
    with _session(built) as s:
        result = s.generate("What is this?", images=[picture], temperature=0, max_tokens=1).wait()
        text = s.model.tokenize("\nWhat is this?")
    (start, n), = _none_runs(result.prompt_tokens)
    assert n == 16
    assert result.prompt_tokens[start + n:start + n + len(text)] == text


@pytest.mark.parametrize("prompt,images", [("<image> and <image>", 1), ("no marker <image>", 2), ("<video>", 1)])
def test_marker_count_must_match(built, picture, prompt, images):
    with _session(built) as s, pytest.raises(Llama3vError, match="marker"):
        s.generate(prompt, images=[picture] * images)


def test_follow_up_reuses_kv_and_encodes_nothing(built, picture):
    history = [{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                            {"type": "text", "text": "What is in the image?"}]}]
    with _session(built) as s:
        first = s.chat(history, temperature=0, max_tokens=8).wait()
        assert first.n_encodes == 1
        history += [{"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And the colours?"}]
        second = s.chat(history, temperature=0, max_tokens=8).wait()
    assert second.n_encodes == 0, "the image is in the KV prefix (and the encode cache)"
    image_end = max(i for i, t in enumerate(second.prompt_tokens) if t is None) + 1
    assert second.n_reused > image_end, "the image and the first turn are not decoded again"
    with _session(built) as fresh:
        cold = fresh.chat(history, temperature=0, max_tokens=8, all_logits=True).wait()
    assert cold.n_encodes == 1 and cold.n_reused == 0
    assert second.tokens == cold.tokens


def test_reused_prefix_gives_the_same_logits(built, picture):
    with _session(built) as s:
        s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=4).wait()
        warm = s.generate("Describe <image> in detail.", images=[picture], temperature=0, max_tokens=4,
                          all_logits=True).wait()
        warm_logits = s.prompt_logits
    with _session(built) as s:
        cold = s.generate("Describe <image> in detail.", images=[picture], temperature=0, max_tokens=4,
                          all_logits=True).wait()
        cold_logits = s.prompt_logits
    assert warm.n_reused > 16 and warm.n_encodes == 0
    np.testing.assert_allclose(warm_logits, cold_logits[warm.n_reused:], atol=1e-4)
    assert warm.tokens == cold.tokens


def test_a_changed_image_is_encoded(built, picture, scenes_dir):
    with _session(built) as s:
        s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=2).wait()
        other = s.generate("Describe <image>.", images=[scenes_dir[1]], temperature=0, max_tokens=2).wait()
    assert other.n_encodes == 1
    assert other.n_reused < other.prompt_tokens.index(None) + 1


def test_encode_cache_is_bounded():
    cache = EncodeCache(max_bytes=3 * 400)
    calls = []

    def rows(i):
        def compute():
            calls.append(i)
            return np.full((10, 10), i, np.float32)  # 400 bytes
        return compute

    for i in range(4):
        cache.get(f"k{i}", rows(i))
    assert len(cache) == 3 and calls == [0, 1, 2, 3]
    cache.get("k1", rows(1))  # still cached
    cache.get("k0", rows(0))  # evicted first, computed again
    assert calls == [0, 1, 2, 3, 0]


def test_seeded_sampling_is_reproducible(built, picture):
    outs = []
    for seed in (7, 7, 8):
        with _session(built) as s:
            outs.append(s.generate("Describe <image>.", images=[picture], temperature=1.0, top_k=50, top_p=0.95,
                                   seed=seed, max_tokens=12).wait().tokens)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_stop_string_ends_the_answer(built, picture):
    with _session(built) as s:
        full = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=12).wait()
        cut = full.text[3:6]
        stopped = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=12, stop=[cut]).wait()
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(cut)]


def test_streamed_pieces_make_the_text(built, picture):
    with _session(built) as s:
        gen = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=12)
        pieces = list(gen)
    assert len(pieces) > 1 and "".join(pieces) == gen.result.text
    assert gen.result.finish_reason == "length" and len(gen.result.tokens) == 12


def test_generation_stops_at_the_context_end(tiny, picture):
    built = tiny(TinySpec(seed=5), "hf-5", "f32")  # this seed does not end its turn within 256 positions
    with _session(built, n_ctx=64) as s:
        assert s.ctx.n_ctx == 256, "llama.cpp rounds the context up to a multiple of 256"
        result = s.generate("Hi <image>", images=[picture], temperature=0, max_tokens=500).wait()
    assert result.finish_reason == "length"
    assert result.n_prompt_tokens + len(result.tokens) == 256, "generation fills the context, no further"


def test_score_teacher_forces_a_continuation(built, picture):
    with _session(built) as s:
        result = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=6).wait()
        s.reset()
        logits = s.score("Describe <image>.", result.tokens, images=[picture])
        forced = s.score("Describe <image>.", [5, 6, 7], images=[picture])
    assert logits.shape == (7, s.model.n_vocab)
    assert logits.argmax(axis=1)[:6].tolist() == result.tokens, "greedy tokens are each row's top-1"
    np.testing.assert_allclose(forced[0], logits[0], atol=1e-4), "the prompt's last position is the same"
    assert forced[1:].argmax(axis=1).tolist() != logits[1:4].argmax(axis=1).tolist()


def test_one_rule_decides_what_fits_the_context(built, picture):
    """Context.fits: a prompt and continuation of exactly n_ctx positions score; one more is refused."""
    with _session(built, n_ctx=256) as s:
        n_prompt = s.generate("Hi <image>", images=[picture], temperature=0, max_tokens=1).wait().n_prompt_tokens
        s.reset()
        room = s.ctx.n_ctx - n_prompt
        assert s.score("Hi <image>", [5] * room, images=[picture]).shape == (room + 1, s.model.n_vocab)
        with pytest.raises(Llama3vError, match="do not fit the context of 256"):
            s.score("Hi <image>", [5] * (room + 1), images=[picture])
        assert s.ctx.fits(256) and not s.ctx.fits(257)


def test_session_options_are_the_defaults_and_keywords_change_them(built):
    with Session(built.model, built.mmproj) as s:
        assert s.options == SessionOptions() and s.ctx.n_ctx == SessionOptions.n_ctx
    options = SessionOptions(n_ctx=512, max_tiles=2)
    with Session(built.model, built.mmproj, options, kv_type="f32") as s:
        assert (s.ctx.n_ctx, s.options.max_tiles, s.options.kv_type) == (512, 2, "f32")
    assert options.kv_type == "f16", "the caller's options are not changed"
    with pytest.raises(TypeError):
        Session(built.model, n_context=512)


def test_a_context_past_the_trained_length_warns(tiny):
    built = tiny(TinySpec(seed=2, max_position_embeddings=256), "hf-5", "f32")
    with pytest.warns(UserWarning, match="goes past the 256 the model was trained on"):
        Session(built.model, n_ctx=512).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Session(built.model, n_ctx=256).close()


def test_media_info_records_what_an_image_became(built, picture):
    with _session(built) as s:
        first = s.generate("Describe <image>.", images=[picture], temperature=0, max_tokens=2).wait()
        again = s.generate("Describe <image> again.", images=[picture], temperature=0, max_tokens=2).wait()
    (info,) = first.media
    assert (info.kind, info.layout, info.n_tiles, info.rows) == ("image", "single", 1, 16)
    assert info.encode_ms == sum(info.tile_encode_ms) > 0
    assert again.media[0].encode_ms == 0, "a cache hit encodes nothing"
    assert first.to_json()["media"] == [{"media": 0, "kind": "image", "layout": "single", "grid": [0, 0], "n_tiles": 1,
                                         "tile_encode_ms": info.tile_encode_ms, "rows": 16,
                                         "encode_ms": info.encode_ms}]
