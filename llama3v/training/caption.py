"""The caption a scene's image rows are trained to spell, in the LM's own tokens, at fixed rows.

The projector's second layer holds the LM's input embeddings of every token a caption can use, so a
trained tower + projector emits (close to) the embeddings of this text; the LM (adapted by a small
LoRA, llama3v.training.train_lm) answers questions about it. Each part of the caption has a fixed
width in tokens (padded with PAD), so image row r always means the same thing (the count, or slot s's
size, colour or shape, or the word): a tower learns such a fixed layout far faster than a free
sentence whose token positions depend on what came before (measured: docs/tiny-model.md).
"""

from __future__ import annotations

from llama3v.training.scenes import SLOTS, Scene

# (text, width in tokens); every size, colour, shape and slot name is one SmolLM2 token after a space.
COUNT_WIDTH, SLOT_WIDTH, WORD_WIDTH = 3, 6, 5


def caption_parts(scene: Scene) -> list[tuple[str, int]]:
    """'3 shapes.', then per slot ' left: big red circle.' or ' left: no shape here.', then ' word: CAT.'."""
    n = len(scene.shapes)
    parts = [(f"{n} shape{'' if n == 1 else 's'}.", COUNT_WIDTH)]
    by_slot = {s.slot: s for s in scene.shapes}
    for slot in SLOTS:
        s = by_slot.get(slot)
        parts.append((f" {slot}: {s.size} {s.color} {s.shape}." if s else f" {slot}: no shape here.", SLOT_WIDTH))
    parts.append((f" word: {scene.word.upper()}." if scene.word else " word: none.", WORD_WIDTH))
    return parts


def caption(scene: Scene) -> str:
    """The caption as one string (what the image rows spell, without the padding)."""
    return "".join(text for text, _ in caption_parts(scene))
