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
VIDEO_TYPES = ("appears", "first")  # about drawn clips (llama3v.training.clips)

# (training phrasings, held-out phrasings); {x}/{y} are filled with a shape or colour.
PHRASINGS = {
    "color": (["What colour is the {x}?", "What color is the {x}?", "Which colour does the {x} have?",
               "What's the colour of the {x}?", "Which color is the {x}?", "The {x} is which colour?",
               "Can you say what colour the {x} is?", "What color has the {x} got?", "Colour of the {x}?",
               "I wonder what color the {x} is.", "Name the colour of the {x}.", "Say which color the {x} is."],
              ["Tell me the color of the {x}."]),
    "shape": (["What shape is the {x} one?", "Which shape is {x}?", "What is the shape of the {x} object?",
               "What kind of shape is {x}?", "Which shape has the colour {x}?", "What is the {x} shape?",
               "Name the shape that is {x}.", "What {x} shape do you see?", "Which object is {x}?",
               "Can you tell which shape is {x}?", "The {x} thing: what shape?", "What's the {x} one?"],
              ["The {x} object is what kind of shape?"]),
    "count": (["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
               "How many objects do you see?", "How many things are drawn?", "Count the objects in the picture.",
               "What's the count of shapes?", "How many figures are there?", "Number of shapes?",
               "How many shapes can you count?", "Tell me how many objects there are.", "How many are drawn here?"],
              ["What is the number of shapes in this picture?"]),
    "position": (["Where is the {x}?", "Where is the {x} in the image?", "In which part of the image is the {x}?",
                  "Where's the {x}?", "Where is the {x} placed?", "Which side is the {x} on?",
                  "Where do you see the {x}?", "Where is the {x} located?", "Position of the {x}?",
                  "In what part of the picture is the {x}?", "Say where the {x} is.", "Where was the {x} drawn?"],
                 ["Where can the {x} be found?"]),
    "size": (["Which is bigger, the {x} or the {y}?", "Which is larger: the {x} or the {y}?",
              "Is the {x} or the {y} bigger?", "Which one is bigger: {x} or {y}?",
              "Of the {x} and the {y}, which is bigger?",
              "Between the {x} and the {y}, which is bigger?", "Which is the big one, the {x} or the {y}?",
              "Which one is larger, {x} or {y}?", "Compare the {x} and the {y}: which is bigger?",
              "Which has the bigger size, the {x} or the {y}?", "Which is the larger one: the {x} or the {y}?",
              "{x} or {y}: which is larger?"],
             ["Which shape is larger, the {x} or the {y}?"]),
    "word": (["What word is written in the image?", "Read the word in the image.", "What does the text say?",
              "What is written here?", "Which word do you see?", "What does the word say?",
              "Read the text.", "What text is in the picture?", "What word is shown?",
              "Can you read the word?", "What are the letters?", "Which word is written?"],
             ["Which word is printed in this picture?"]),
    "describe": (["Describe the image.", "What is in this image?", "What do you see?",
                  "Describe what you see.", "What does the picture show?", "Tell me what is in the image.",
                  "What is drawn here?", "Describe the picture.", "What's in the image?",
                  "List what you see.", "What does this image contain?", "Explain what the image shows."],
                 ["Give a short description of this picture."]),
    "appears": (["What appears at {t} s?", "What appears at second {t}?", "Which shape shows up at {t} s?",
                 "What is new at {t} s?", "What gets added at {t} s?", "At {t} s, what appears?",
                 "What new shape is there at {t} s?", "What comes in at second {t}?"],
                ["Which object is added at {t} seconds?"]),
    "first": (["What changes first?", "What is the first change?", "Which shape appears first after the start?",
               "What is added first?", "What is the first new shape?", "What shows up first?"],
              ["Which object is the first to be added?"]),
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
        # The reply states both sizes before the verdict: two lookups and a comparison of adjacent words,
        # which a 135M LM learns; the bare verdict stayed at chance (docs/tiny-model.md).
        out.append(Question("size", pick("size").format(x=first.shape, y=second.shape), big.shape,
                            f"The {first.shape} is {first.size} and the {second.shape} is {second.size}, "
                            f"so the {big.shape} is bigger."))
    if scene.word:
        out.append(Question("word", pick("word"), scene.word, f"The word is {scene.word.upper()}."))
    described = ", ".join(f"a {s.size} {s.color} {s.shape} {WHERE[s.slot]}" for s in scene.shapes)
    out.append(Question("describe", pick("describe"), "; ".join(f"{s.color} {s.shape}" for s in scene.shapes),
                        f"I see {described}."))
    return out


def clip_questions(clip: object, rng: np.random.Generator, heldout: bool) -> list[Question]:
    """Questions about a drawn clip (llama3v.training.clips.Clip): what appears at a second, what changes first."""
    shapes, appear = clip.scene.shapes, clip.appear
    later = sorted((t, i) for i, t in enumerate(appear) if t > 0)
    t, i = later[int(rng.integers(len(later)))]
    s, (t0, i0) = shapes[i], later[0]
    first = shapes[i0]
    pick = {k: PHRASINGS[k][1 if heldout else 0] for k in VIDEO_TYPES}
    return [Question("appears", pick["appears"][int(rng.integers(len(pick["appears"])))].format(t=t),
                     f"{s.color} {s.shape}", f"A {s.color} {s.shape} appears at {t} s."),
            Question("first", pick["first"][int(rng.integers(len(pick["first"])))], f"{first.color} {first.shape}",
                     f"First a {first.color} {first.shape} appears, at {t0} s.")]


def _mentions(text: str, words: tuple[str, ...] | list[str]) -> set[str]:
    found = set()
    for w in words:
        if re.search(rf"\b{re.escape(w)}s?\b", text):
            found.add(w)
    return found


def score(question: Question, answer: str) -> bool:
    """Keyword match: the expected value named, no competing value of the same kind named.

    size: the shape the answer calls bigger/larger ("... so the star is bigger"), else the first one named.
    appears, first (clips): the object's colour and kind named, no other colour or kind.

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
    if kind in VIDEO_TYPES:  # the one object: its colour and kind, no other
        color, shape = question.answer.split()
        return _mentions(text, list(COLORS)) == {color} and _mentions(text, list(SHAPES)) == {shape}
    pairs = [p.split() for p in question.answer.split("; ")]
    colors, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    return _mentions(text, list(COLORS)) == colors and _mentions(text, list(SHAPES)) == shapes


def _first_shape(text: str, question: Question) -> str | None:
    # "Which is bigger, the circle or the star?" -> the shape the answer calls bigger or larger (the last
    # "<shape> is bigger/larger"), else the first shape it names ("the circle." / "the circle is bigger
    # than the star").
    verdicts = re.findall(rf"\b({'|'.join(SHAPES)})s? is (?:the )?(?:bigger|larger)", text)
    if verdicts:
        return verdicts[-1]
    hits = [(m.start(), s) for s in SHAPES for m in re.finditer(rf"\b{s}s?\b", text)]
    return min(hits)[1] if hits else None


__all__ = ["PHRASINGS", "Question", "SLOTS", "TYPES", "VIDEO_TYPES", "clip_questions", "questions_for", "score"]
