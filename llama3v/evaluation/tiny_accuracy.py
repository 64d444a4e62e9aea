"""Task accuracy of the embedded tiny model on held-out drawn scenes, through llama.cpp and the reference.

Held-out means scenes whose seeds training never uses and the held-out phrasing of every question
type (llama3v.training.questions). Scoring is the keyword match stated in `questions.score`. Each
side answers greedily from the same pixels and prompt: llama.cpp through a Session, the PyTorch
reference (float32) from the session's prompt tokens and its own image rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from llama3v.runtime.session import Session
from llama3v.training.clips import draw_clip, write_clip
from llama3v.training.questions import TYPES, VIDEO_TYPES, Question, clip_questions, questions_for, score
from llama3v.training.scenes import make_example


@dataclass
class Accuracy:
    """Right answers per question type, and the failures (type, question, expected, answer)."""

    right: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, q: Question, answer: str) -> None:
        """Score one answer."""
        ok = score(q, answer)
        self.right[q.type] += ok
        self.total[q.type] += 1
        if not ok:
            self.failures.append((q.type, q.text, q.answer, answer))

    @property
    def overall(self) -> float:
        """Right answers over all questions."""
        return sum(self.right.values()) / max(sum(self.total.values()), 1)

    def table(self) -> dict[str, str]:
        """'right/total' per type, then overall."""
        out = {t: f"{self.right[t]}/{self.total[t]}" for t in TYPES + VIDEO_TYPES if self.total.get(t)}
        out["overall"] = f"{sum(self.right.values())}/{sum(self.total.values())} ({100 * self.overall:.1f}%)"
        return out


def heldout_questions(seeds: range, per_scene: int | None = None) -> list[tuple[int, Question]]:
    """(scene seed, question) pairs with held-out phrasings; every type the scene can answer, or `per_scene`."""
    out = []
    for seed in seeds:
        qs = questions_for(make_example(seed)[0], np.random.default_rng(seed + 31), heldout=True)
        if per_scene is not None:
            qs = [qs[(seed + k) % len(qs)] for k in range(min(per_scene, len(qs)))]
        out += [(seed, q) for q in qs]
    return out


def evaluate(session: Session, questions: list[tuple[int, Question]], reference: object | None = None,
             max_tokens: int = 48) -> tuple[Accuracy, Accuracy | None]:
    """Accuracy through llama.cpp (greedy), and through the reference when one is given."""
    cpp, ref = Accuracy(), Accuracy() if reference is not None else None
    images: dict[int, object] = {}
    for seed, q in questions:
        image = images.setdefault(seed, make_example(seed)[1])
        session.reset()
        gen = session.generate(q.text, images=[image], temperature=0, max_tokens=max_tokens)
        cpp.add(q, "".join(gen))
        if reference is not None:
            tokens = reference_tokens(reference, session, gen.result.prompt_tokens, gen.result.tokens, image,
                                      max_tokens)
            ref.add(q, b"".join(session.model.piece(t) for t in tokens).decode("utf-8", errors="replace"))
    return cpp, ref


def small_detail(seed: int, zoom: int = 4) -> Image.Image:
    """Held-out scene `seed` drawn small: pasted into one cell of a zoom x zoom grid on a canvas of its
    background colour, so the 112-pixel base view shrinks it zoom times and slices can restore it."""
    image = make_example(seed)[1]
    w, h = image.size
    canvas = Image.new("RGB", (w * zoom, h * zoom), image.getpixel((0, 0)))
    rng = np.random.default_rng(seed + 7)
    canvas.paste(image, (int(rng.integers(zoom)) * w, int(rng.integers(zoom)) * h))
    return canvas


def detail_accuracy(session: Session, seeds: range, max_tiles: int | None, types: tuple[str, ...] = TYPES,
                    max_tokens: int = 48) -> Accuracy:
    """Held-out questions of `types` about `small_detail` pictures, with `max_tiles` slices (None: the base view)."""
    acc = Accuracy()
    session.options.max_tiles = max_tiles
    for seed, q in heldout_questions(seeds):
        if q.type not in types:
            continue
        session.reset()
        acc.add(q, "".join(session.generate(q.text, images=[small_detail(seed)], temperature=0,
                                            max_tokens=max_tokens)))
    session.options.max_tiles = None
    return acc


def clip_accuracy(session: Session, seeds: range, workdir: Path, max_tokens: int = 32) -> tuple[Accuracy, float]:
    """Held-out questions about held-out drawn clips (written as mp4 at 1 fps, sampled by the runtime like any
    video), through llama.cpp; and the chance level: naming one of the shapes that appear after 0 s at random."""
    acc, chance = Accuracy(), []
    for seed in seeds:
        clip, frames = draw_clip(seed)
        path = write_clip(frames, workdir / f"clip-{seed}.mp4")
        later = sum(1 for t in clip.appear if t > 0)
        for q in clip_questions(clip, np.random.default_rng(seed + 31), heldout=True):
            session.reset()
            acc.add(q, session.generate(q.text, videos=[path], temperature=0, max_tokens=max_tokens).wait().text)
            chance.append(1 / later)
        path.unlink()
    return acc, float(np.mean(chance))


def reference_tokens(reference: object, session: Session, prompt: list[int | None], cpp_tokens: list[int],
                     image: object, max_tokens: int) -> list[int]:
    """The reference's own greedy answer (until an end-of-generation token or `max_tokens`).

    One forward pass over the prompt and llama.cpp's answer gives the reference's choice at every
    answer position; where it first differs (or llama.cpp stopped early) the reference goes on
    alone, one token at a time. The result is exactly the reference's greedy decoding.
    """
    import torch

    from llama3v.evaluation.parity import reference_rows

    rows = reference_rows(reference, session.encoder, image)
    x = reference._inputs_embeds(list(prompt) + list(cpp_tokens), rows)
    n = len(prompt)
    with torch.no_grad():
        choice = reference.llm(x[None])[0, n - 1:].argmax(-1).tolist()
        out: list[int] = []
        for k, token in enumerate(choice):
            if session.model.is_end_of_generation(token) or len(out) == max_tokens:
                return out
            out.append(token)
            if k >= len(cpp_tokens) or token != cpp_tokens[k]:
                break
        x = x[: n + len(out) - 1]
        x = torch.cat([x, reference.llm.embed(torch.tensor([out[-1]]))])
        while len(out) < max_tokens:
            token = int(reference.llm(x[None])[0, -1].argmax())
            if session.model.is_end_of_generation(token):
                break
            out.append(token)
            x = torch.cat([x, reference.llm.embed(torch.tensor([token]))])
    return out


def run(model: Path, mmproj: Path, checkpoint: Path | None, seeds: range, per_scene: int | None = None,
        n_threads: int | None = None) -> tuple[Accuracy, Accuracy | None]:
    """Open the GGUFs (f32 KV, flash attention off) and, given a checkpoint, the reference; evaluate."""
    reference = None
    if checkpoint is not None:
        from llama3v.models.llava import LlavaReference

        reference = LlavaReference.from_checkpoint(checkpoint)
    with Session(model, mmproj, n_ctx=512, n_threads=n_threads, kv_type="f32", flash_attn=False) as session:
        return evaluate(session, heldout_questions(seeds, per_scene), reference)


def oracle_caption_accuracy(model: Path, seeds: range, max_tokens: int = 48) -> Accuracy:
    """Accuracy of the LM alone when the image rows are exactly the caption's token embeddings (a
    perfect tower): the same held-out questions, the prompt given to llama.cpp as token ids."""
    import llama_cpp

    from llama3v.training.train_lm import Prompts

    prompts = Prompts(model)
    lm = llama_cpp.Llama(model_path=str(model), n_ctx=512, verbose=False)
    acc = Accuracy()
    for seed, q in heldout_questions(seeds):
        ids = prompts.prompt_ids(make_example(seed)[0], q)
        out = lm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0)
        acc.add(q, out["choices"][0]["text"])
    return acc
