"""Drawn clips for the tiny model's video questions: shapes appear one after another at known seconds.

A clip is one scene (2-4 shapes, no word) drawn once per second for `SECONDS` seconds; each shape
shows from its `appear` second on (the first at 0 s, the others at distinct later seconds). Every
frame is drawn from an equal generator with the shapes not yet there hidden, so canvas, background,
places and colours stay put and only appearances change. `write_clip` stores one as an mp4 at 1
frame per second, which the runtime samples frame by frame with its `<t=N.Ns>` timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from llama3v.training.scenes import Scene, draw_scene, render

SECONDS = 6
CLIP_SEED0 = 5_000_000  # training clips use seeds from here; held-out clips 0..CLIP_SEED0-1


@dataclass(frozen=True)
class Clip:
    """A scene and the second at which each of its shapes appears."""

    scene: Scene
    appear: tuple[int, ...]

    def shown(self, t: int) -> frozenset[int]:
        """Indices of the shapes visible at second t."""
        return frozenset(i for i, a in enumerate(self.appear) if a <= t)

    def scene_at(self, t: int) -> Scene:
        """What the frame at second t shows."""
        return Scene(tuple(s for i, s in enumerate(self.scene.shapes) if i in self.shown(t)))


def draw_clip(seed: int) -> tuple[Clip, list[Image.Image]]:
    """The clip for `seed` and its frames, one per second."""
    rng = np.random.default_rng(seed)
    scene = draw_scene(rng)
    while len(scene.shapes) < 2:
        scene = draw_scene(rng)
    scene = Scene(scene.shapes)  # no word: the clip is about shapes
    later = rng.choice(np.arange(1, SECONDS), size=len(scene.shapes) - 1, replace=False)
    order = rng.permutation(len(scene.shapes))
    appear = [0] * len(scene.shapes)
    for k, i in enumerate(order[1:]):
        appear[int(i)] = int(later[k])
    clip = Clip(scene, tuple(appear))
    style = int(rng.integers(2**31))
    frames = [render(scene, np.random.default_rng(style), hidden=frozenset(range(len(scene.shapes))) - clip.shown(t))
              for t in range(SECONDS)]
    return clip, frames


def write_clip(frames: list[Image.Image], path: Path) -> Path:
    """Write the frames as an mp4 at one frame per second; returns `path`."""
    import cv2

    w, h = frames[0].size
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 1.0, (w, h))
    if not out.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for f in frames:
        out.write(cv2.cvtColor(np.asarray(f.convert("RGB")), cv2.COLOR_RGB2BGR))
    out.release()
    return path
