"""Llama-3.2-Vision (mllama) in llama3v's engine (patches 0005, 0006) against the PyTorch reference.

The reference (llama3v.models.mllama) is held to transformers by tests/test_mllama_reference.py; here
the converted GGUFs run in libllama: the ggml vision encoder's states (NMSE per mmproj type, bounds of
docs/fidelity.md), greedy tokens with an image and text only (identical for 16 steps, varied, with
top-1 margins far above the measured logit error), the real <|image|> id in the prompt, and a
follow-up turn that encodes nothing and recomputes no cross-attention K/V.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the reference needs the optional torch extra")

from llama3v.converters.convert import convert  # noqa: E402
from llama3v.errors import Llama3vError  # noqa: E402
from llama3v.evaluation.scenes import scene  # noqa: E402
from llama3v.models.mllama import MllamaReference  # noqa: E402
from llama3v.runtime.media import EncodeCache  # noqa: E402
from llama3v.runtime.mllama import MllamaEncoder  # noqa: E402
from llama3v.runtime.session import Session  # noqa: E402
from llama3v.testing.mllama_factory import TinyMllamaSpec, make_mllama_checkpoint  # noqa: E402

# Two cross-attention layers (1 and 3), GQA (4 query / 2 KV heads), 28-pixel tiles of 17 positions
# padded to 24, up to 4 tiles, llama3 rope scaling that matters past position 16.
SPEC = TinyMllamaSpec(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 16}, seed=3)
# Widths that are whole quant blocks, so q8_0 really quantizes the encoder's matrices.
WIDE = TinyMllamaSpec(vision_hidden=64, vision_heads=2, vision_ff=128, text_hidden=64, text_heads=4,
                      text_kv_heads=2, text_ff=128, seed=1)
NMSE_BOUND = {"f32": 1e-6, "f16": 1e-4, "q8_0": 1e-3}  # docs/fidelity.md
STEPS = 16
MARGIN = 1e-3  # top-1 minus top-2 logit at every checked step; the engine's logits differ by ~4e-6
PARITY = {"n_ctx": 256, "kv_type": "f32", "flash_attn": False}


def _nmse(x: np.ndarray, ref: np.ndarray) -> float:
    return float(((x - ref) ** 2).mean() / ref.var())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(F32 model GGUF, F32 mmproj GGUF, reference) of SPEC."""
    ckpt = make_mllama_checkpoint(tmp_path_factory.mktemp("mllama"), SPEC)
    model, mmproj = convert(ckpt, ckpt / "gguf", "f32", "f32")
    return model, mmproj, MllamaReference.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def session(built):
    model, mmproj, _ = built
    with Session(model, mmproj, **PARITY) as s:
        yield s


@pytest.mark.parametrize("mmproj_type", list(NMSE_BOUND))
def test_vision_states_nmse_per_type(tmp_path, mmproj_type):
    ckpt = make_mllama_checkpoint(tmp_path / "ckpt", WIDE)
    _, mmproj = convert(ckpt, tmp_path / "out", "f16", mmproj_type)
    ref = MllamaReference.from_checkpoint(ckpt)
    encoder = MllamaEncoder(mmproj, n_threads=2)
    states = []
    for variant, size in ((0, (90, 30)), (1, (28, 28)), (2, (200, 150))):
        tiles = encoder.tiles(scene(variant, *size))
        got, want = encoder.encode(tiles), ref.vision_states(tiles.tiles, tiles.aspect_ratio_id)
        nmse = _nmse(got, want)
        print(f"{mmproj_type} {tiles.grid}: vision states NMSE {nmse:.3g}")
        assert got.shape == want.shape and nmse < NMSE_BOUND[mmproj_type]
        states.append(got)
    one = encoder.encode(encoder.tiles(scene(3, 90, 30)))
    assert _nmse(one, states[0]) > 100 * NMSE_BOUND[mmproj_type], "the encoder depends on the image"
    encoder.close()


@pytest.mark.parametrize("variant,size,prompt", [(1, (90, 30), "Describe it:"), (3, (28, 28), "Describe it:")],
                         ids=["wide-1x3", "one-tile"])
def test_greedy_tokens_equal_the_reference(built, session, variant, size, prompt):
    _, _, ref = built
    image = scene(variant, *size)
    result = session.generate(prompt, images=[image], temperature=0, max_tokens=STEPS).wait()
    ids = result.prompt_tokens
    assert ids.count(ref.config.image_token_index) == 1 and None not in ids  # the real <|image|> id, no rows
    tiles = session.encoder.tiles(image)
    assert result.media[0].n_tiles == tiles.n_tiles == size[0] // 28 * max(1, size[1] // 28)
    want, margins = ref.greedy(ids, [(tiles.tiles, tiles.aspect_ratio_id)], STEPS)
    print(f"{tiles.grid}: tokens {result.tokens}, min margin {min(margins):.3g}")
    assert result.tokens == want
    assert len(set(want)) > 2, f"degenerate continuation {want}"
    assert min(margins) > MARGIN, f"near tie in {margins}"


def _prompt_logits(session, ref, image, states=None):
    """(engine, reference) logits of every prompt position; the system turn puts text before the image."""
    tiles = session.encoder.tiles(image)
    session.reset()
    session.cache = EncodeCache()
    if states is not None:  # the decoder alone: the image's states are the reference's
        session.cache.get(session.encoder.key(tiles), lambda: states)
    result = session.generate("Describe it:", images=[image], system="You see.", temperature=0, max_tokens=1,
                              all_logits=True).wait()
    want = ref.logits(result.prompt_tokens, [(tiles.tiles, tiles.aspect_ratio_id)])
    got = session.prompt_logits
    assert got.shape[0] == want.shape[0] and want.std() > 1.0
    assert np.all(np.isneginf(got[:, want.shape[1]:])), "<|image|> and the spare rows are never sampled"
    return got[:, :want.shape[1]], want


def test_decoder_logits_equal_the_reference_at_every_position(built, session):
    """With the reference's vision states, libllama's decoder is the reference's (text before the image too)."""
    _, _, ref = built
    image = scene(1, 90, 30)
    tiles = session.encoder.tiles(image)
    got, want = _prompt_logits(session, ref, image, ref.vision_states(tiles.tiles, tiles.aspect_ratio_id))
    diff = float(np.abs(got - want).max())
    print(f"decoder alone, {len(want)} prompt positions: max abs logits diff {diff:.3g}")
    assert diff < 1e-4


def test_end_to_end_top1_of_every_prompt_position(built, session):
    """Each side encodes the image itself: the top-1 token of every prompt position is the reference's."""
    _, _, ref = built
    got, want = _prompt_logits(session, ref, scene(1, 90, 30))
    print(f"end to end: max abs logits diff {float(np.abs(got - want).max()):.3g}")
    assert np.array_equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("variant,size", [(1, (90, 30)), (3, (28, 28)), (2, (56, 56))],
                         ids=["wide-1x3", "one-tile", "grid-2x2"])
def test_real_tiles_mode_equals_the_reference(built, variant, size):
    """`--mllama-tiles real`: only the real tiles are encoded; states and greedy tokens equal the reference's
    real-tiles mode; an image with every tile slot real gives exactly the all-slots states."""
    model, mmproj, ref = built
    encoder = MllamaEncoder(mmproj, n_threads=2)
    tiles = encoder.tiles(scene(variant, *size))
    real, every = encoder.encode(tiles, "real"), encoder.encode(tiles, "all")
    encoder.close()
    rows = tiles.n_tiles * ref.config.vision.n_positions
    assert real.shape == (rows, every.shape[1])
    nmse = _nmse(real, ref.vision_states(tiles.tiles, tiles.aspect_ratio_id, "real"))
    deviation = _nmse(real, every[:rows])
    print(f"{tiles.grid}: real-tiles states NMSE vs reference {nmse:.3g}; vs all slots (the deviation) {deviation:.3g}")
    assert nmse < NMSE_BOUND["f32"]
    if tiles.n_tiles == ref.config.vision.max_num_tiles:
        assert np.array_equal(real, every)
    else:
        assert deviation > 1e-3, "without the padding tiles the real tiles' states change (docs/mllama.md, rule 1)"
    with Session(model, mmproj, **PARITY, mllama_tile_slots="real") as s:
        result = s.generate("Describe it:", images=[scene(variant, *size)], temperature=0, max_tokens=STEPS).wait()
        assert s.encoder.n_encodes == 1
    want, margins = ref.greedy(result.prompt_tokens, [(tiles.tiles, tiles.aspect_ratio_id)], STEPS, "real")
    assert result.tokens == want and min(margins) > MARGIN, (result.tokens, want, margins)


def test_text_only_equals_the_reference(built, session):
    _, _, ref = built
    session.reset()
    result = session.generate("hello there", temperature=0, max_tokens=STEPS).wait()
    want, margins = ref.greedy(result.prompt_tokens, [], STEPS)
    assert result.tokens == want and len(set(want)) > 2
    assert min(margins) > MARGIN, f"near tie in {margins}"


def test_follow_up_reuses_the_image_and_the_prefix(built, session):
    _, _, ref = built
    image = scene(1, 90, 30)
    session.reset()
    first = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it:"}]}]
    one = session.chat(first, temperature=0, max_tokens=8).wait()
    assert one.n_encodes <= 1 and one.timings["cross_states_ms"] > 0
    convo = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "And then?"}]
    two = session.chat(convo, temperature=0, max_tokens=STEPS).wait()
    assert two.n_encodes == 0 and two.timings["cross_states_ms"] == 0.0, "nothing re-encoded, no cross K/V"
    assert two.n_reused >= len(one.prompt_tokens), "the first turn's KV prefix is kept"
    tiles = session.encoder.tiles(image)
    want, margins = ref.greedy(two.prompt_tokens, [(tiles.tiles, tiles.aspect_ratio_id)], STEPS)
    assert two.tokens == want and min(margins) > MARGIN
    # A different image in the same place: everything is recomputed (text before it depends on it too).
    other = [{"role": "user", "content": [{"type": "image", "image": scene(2, 90, 30)},
                                          {"type": "text", "text": "Describe it:"}]}]
    three = session.chat(other, temperature=0, max_tokens=4).wait()
    assert three.n_reused == 0 and three.n_encodes == 1


def test_run_json_reports_the_image_token(built, photo):
    model, mmproj, ref = built
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "run", "--model", str(model), "--mmproj", str(mmproj),
                        "--image", str(photo), "-p", "Describe it:", "-n", "4", "--temp", "0", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"].count(ref.config.image_token_index) == 1
    assert out["media"][0]["n_tiles"] >= 1 and "cross_states_ms" in out["timings"] and len(out["tokens"]) == 4


def test_two_images_each_seen_by_its_own_span(built, session):
    """Text before the first image, between the images and after: HF's spans (docs/mllama.md, rule 3)."""
    _, _, ref = built
    images = [scene(1, 90, 30), scene(2, 25, 80)]
    tiles = [session.encoder.tiles(im) for im in images]
    session.reset()
    session.cache = EncodeCache()
    for t in tiles:  # the decoder alone: the reference's states
        session.cache.get(session.encoder.key(t), lambda t=t: ref.vision_states(t.tiles, t.aspect_ratio_id))
    result = session.generate("Look: <image> versus <image> which?", images=images, temperature=0,
                              max_tokens=1, all_logits=True).wait()
    ids = result.prompt_tokens
    image_at = [i for i, t in enumerate(ids) if t == ref.config.image_token_index]
    assert len(image_at) == 2 and image_at[1] - image_at[0] > 1
    want = ref.logits(ids, [(t.tiles, t.aspect_ratio_id) for t in tiles])
    diff = float(np.abs(session.prompt_logits[:, :want.shape[1]] - want).max())
    print(f"two images ({tiles[0].grid}, {tiles[1].grid}), {len(ids)} positions: max abs logits diff {diff:.3g}")
    assert diff < 1e-4


def test_bad_pairs_and_media_are_refused_clearly(built, session, tiny):
    """An mllama file paired with a LLaVA one, a video for an mllama model, an image without an mmproj."""
    model, mmproj, _ = built
    llava = tiny()  # the default tiny LLaVA pair
    for pair in ((model, llava.mmproj), (llava.model, mmproj)):
        with pytest.raises(Llama3vError, match="do not belong together"):
            Session(*pair, n_ctx=64)
    with pytest.raises(Llama3vError, match="take images, not videos"):
        session.generate("What happens?", videos=["clip.mp4"], max_tokens=1).wait()
    with Session(model, None, n_ctx=64) as text_only, pytest.raises(Llama3vError, match="no mmproj"):
        text_only.generate("hi", images=[scene(0, 28, 28)], max_tokens=1).wait()
    session.reset()
    assert session.generate("still fine", temperature=0, max_tokens=2).wait().tokens  # valid input still works


# Llama-3.2-Vision's prompt semantics for a conversation with images, as a parts template (written here,
# not Meta's): BOS once, each turn's header, its parts in order (an image part is one <|image|>), <|eot_id|>.
PARTS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|image|>{% elif p['type'] == 'text' %}{{ p['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _hf_ids(ckpt, template, messages, images):
    """transformers' ids: MllamaProcessor's apply_chat_template, then processor(text, images) as the model card does."""
    from transformers import AutoTokenizer, MllamaImageProcessor, MllamaProcessor

    processor = MllamaProcessor(MllamaImageProcessor.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt),
                                chat_template=template)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=images or None, add_special_tokens=False)["input_ids"][0]


def _ours(image):
    return {"type": "image", "image": image}


@pytest.mark.parametrize("template", ["checkpoint", "parts"])
def test_prompt_ids_equal_mllama_processor(built, tmp_path, template):
    """One image before the text, a follow-up turn, and two images in one turn: MllamaProcessor's ids."""
    model, mmproj, ref = built
    ckpt = model.parent.parent
    a, b = scene(1, 90, 30), scene(2, 25, 80)
    if template == "parts":
        path = tmp_path / "mllama.jinja"
        path.write_text(PARTS_TEMPLATE, encoding="utf-8")
        hf_template, options = PARTS_TEMPLATE, {"chat_template": str(path)}
        hf_image = [{"type": "image"}]
    else:  # the checkpoint's own Llama-3 template takes strings: the image is <|image|> in the text
        hf_template, options = json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"], {}
        hf_image = "<|image|>"

    def hf_content(text, n_images):
        if template == "parts":
            return hf_image * n_images + [{"type": "text", "text": text}]
        return hf_image * n_images + text

    cases = [
        ([{"role": "user", "content": [_ours(a), {"type": "text", "text": "Describe it:"}]}],
         [{"role": "user", "content": hf_content("Describe it:", 1)}], [a]),
        ([{"role": "user", "content": [_ours(a), {"type": "text", "text": "Describe it:"}]},
          {"role": "assistant", "content": "A wide scene."}, {"role": "user", "content": "And then?"}],
         [{"role": "user", "content": hf_content("Describe it:", 1)},
          {"role": "assistant", "content": "A wide scene."}, {"role": "user", "content": "And then?"}], [a]),
        ([{"role": "user", "content": [_ours(a), _ours(b), {"type": "text", "text": "Which is wider?"}]}],
         [{"role": "user", "content": hf_content("Which is wider?", 2)}], [a, b]),
    ]
    with Session(model, mmproj, n_ctx=256, **options) as s:
        for ours, theirs, images in cases:
            s.reset()
            got = s.chat(ours, temperature=0, max_tokens=1).wait().prompt_tokens
            want = _hf_ids(ckpt, hf_template, theirs, images)
            assert got.count(ref.config.image_token_index) == len(images)
            assert got == want, f"{template}: {got} != {want}"


def test_embed_writes_the_projected_vision_states(built, session, picture, tmp_path):
    """`embed` on an mllama mmproj: each image's real tiles' states (the cross K/V's source), as the reference's."""
    model, mmproj, ref = built
    small = tmp_path / "small.png"
    scene(3, 28, 28).save(small)
    out = tmp_path / "states.npy"
    cmd = [sys.executable, "-m", "llama3v.cli", "embed", "--mmproj", str(mmproj), "--image", str(picture),
           "--image", str(small), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows, doc = np.load(out), json.loads(out.with_suffix(".json").read_text())
    assert rows.shape == (doc["n_rows"], doc["n_embd"]) and [m["n_tiles"] for m in doc["media"]][1] == 1
    for entry, source in zip(doc["parts"], (picture, small), strict=True):
        tiles = session.encoder.tiles(source)
        got = rows[entry["first_row"]:entry["first_row"] + entry["n_rows"]]
        want = ref.vision_states(tiles.tiles, tiles.aspect_ratio_id)[:tiles.n_tiles * entry["rows_per_tile"]]
        nmse = _nmse(got, want)
        print(f"embed {tiles.grid}: {len(got)} rows, NMSE {nmse:.3g}")
        assert got.shape == want.shape and nmse < NMSE_BOUND["f32"]
    video = subprocess.run(cmd[:-2] + ["--video", "clip.mp4", "-o", str(tmp_path / "v.npy")],
                           capture_output=True, text=True, timeout=120)
    assert video.returncode == 1 and "takes images, not videos" in video.stderr
    assert len(video.stderr.strip().splitlines()) == 1 and not (tmp_path / "v.npy").exists()
