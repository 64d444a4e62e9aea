"""Questions about a drawn scene, several phrasings per type, and how an answer is scored.

Each type has training phrasings and held-out phrasings (`heldout=True`) never used in training.
Scoring is keyword matching, stated per type in `score`: the answer must name the right value and
no competing value of the same kind (so "red or blue" is wrong).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from llama3v.training.scenes import COLORS, SHAPES, SLOTS, WORDS, Scene

TYPES = ("color", "shape", "count", "position", "size", "word", "describe")

# (training phrasings, held-out phrasings); {x}/{y} are filled with a shape or colour.
PHRASINGS = {
    "color": (["What colour is the {x}?", "What color is the {x}?", "Which colour does the {x} have?"],
              ["Tell me the color of the {x}."]),
    "shape": (["What shape is the {x} one?", "Which shape is {x}?", "What is the shape of the {x} object?"],
              ["The {x} object is what kind of shape?"]),
    "count": (["How many shapes are there?", "How many shapes are in the image?", "Count the shapes."],
              ["What is the number of shapes in this picture?"]),
    "position": (["Where is the {x}?", "Where is the {x} in the image?", "In which part of the image is the {x}?"],
                 ["Where can the {x} be found?"]),
    "size": (["Which is bigger, the {x} or the {y}?", "Which is larger: the {x} or the {y}?",
              "Is the {x} or the {y} bigger?"],
             ["Which shape is larger, the {x} or the {y}?"]),
    "word": (["What word is written in the image?", "Read the word in the image.", "What does the text say?"],
             ["Which word is printed in this picture?"]),
    "describe": (["Describe the image.", "What is in this image?", "What do you see?"],
                 ["Give a short description of this picture."]),
}

WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "middle": "in the middle"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_WORDS = {"left": ("left",), "right": ("right",), "top": ("top", "above", "upper"),
                  "bottom": ("bottom", "below", "lower"), "middle": ("middle", "centre", "center")}


@dataclass(frozen=True)
class Question:
    """A question about a scene and what a correct answer must contain."""

    type: str
    text: str
    answer: str  # the expected value: a colour, shape, number, slot, shape name or word
    reply: str = ""  # a correct answer in words: the training target for the LM's adapter


def questions_for(scene: Scene, rng: np.random.Generator, heldout: bool) -> list[Question]:
    """One question of every type that the scene can answer, with a random phrasing of the split."""
    def pick(kind: str) -> str:
        options = PHRASINGS[kind][1 if heldout else 0]
        return options[int(rng.integers(len(options)))]

    out = []
    obj = scene.shapes[int(rng.integers(len(scene.shapes)))]
    n = len(scene.shapes)
    out.append(Question("color", pick("color").format(x=obj.shape), obj.color, f"The {obj.shape} is {obj.color}."))
    out.append(Question("shape", pick("shape").format(x=obj.color), obj.shape, f"It is a {obj.shape}."))
    out.append(Question("count", pick("count"), str(n),
                        f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'}."))
    out.append(Question("position", pick("position").format(x=obj.shape), obj.slot,
                        f"The {obj.shape} is {WHERE[obj.slot]}."))
    pairs = [(a, b) for a in scene.shapes for b in scene.shapes if a.size == "big" and b.size == "small"]
    if pairs:
        big, small = pairs[int(rng.integers(len(pairs)))]
        first, second = (big, small) if rng.random() < 0.5 else (small, big)
        out.append(Question("size", pick("size").format(x=first.shape, y=second.shape), big.shape,
                            f"The {big.shape} is bigger."))
    if scene.word:
        out.append(Question("word", pick("word"), scene.word, f"The word is {scene.word.upper()}."))
    described = ", ".join(f"a {s.size} {s.color} {s.shape} {WHERE[s.slot]}" for s in scene.shapes)
    out.append(Question("describe", pick("describe"), "; ".join(f"{s.color} {s.shape}" for s in scene.shapes),
                        f"I see {described}."))
    return out


def _mentions(text: str, words: tuple[str, ...] | list[str]) -> set[str]:
    found = set()
    for w in words:
        if re.search(rf"\b{re.escape(w)}s?\b", text):
            found.add(w)
    return found


def score(question: Question, answer: str) -> bool:
    """Keyword match: the expected value named, no competing value of the same kind named.

    describe: every shape's colour and kind named, and no colour or kind that is not in the scene.
    count: the digit or the number word. position: the slot or a synonym (middle/centre/center).
    """
    text = answer.lower()
    kind = question.type
    if kind == "color":
        return _mentions(text, list(COLORS)) == {question.answer}
    if kind in ("shape", "size"):
        return _mentions(text, list(SHAPES)) == {question.answer} if kind == "shape" else \
            _first_shape(text, question) == question.answer
    if kind == "count":
        names = {str(n) for n in NUMBERS} | set(NUMBERS.values())
        said = {w for w in re.findall(r"\b\w+\b", text) if w in names}
        n = int(question.answer)
        return bool(said) and said <= {str(n), NUMBERS[n]}
    if kind == "position":
        said = {slot for slot, words in POSITION_WORDS.items() if _mentions(text, words)}
        return said == {question.answer}
    if kind == "word":
        return _mentions(text, list(WORDS)) == {question.answer}
    pairs = [p.split() for p in question.answer.split("; ")]
    colors, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    return _mentions(text, list(COLORS)) == colors and _mentions(text, list(SHAPES)) == shapes


def _first_shape(text: str, question: Question) -> str | None:
    # "Which is bigger, the circle or the star?" -> the answer names the bigger one; if it names
    # both ("the circle is bigger than the star") the one named first is taken.
    hits = [(m.start(), s) for s in SHAPES for m in re.finditer(rf"\b{s}s?\b", text)]
    return min(hits)[1] if hits else None


__all__ = ["PHRASINGS", "Question", "SLOTS", "TYPES", "questions_for", "score"]
