"""Shared fixtures: tiny checkpoints built by the factory, converted once per session, and test media."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama3v.converters.convert import convert
from llama3v.evaluation.scenes import scene
from llama3v.paths import TEST_MEDIA
from llama3v.testing.factory import TinySpec, make_checkpoint


@dataclass
class Built:
    """A built checkpoint and its GGUFs."""

    ckpt: Path
    model: Path
    mmproj: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per session and arguments) a checkpoint and convert it: tiny(spec, layout, outtype)."""
    built: dict = {}

    def make(spec: TinySpec | None = None, layout: str = "hf-5", outtype: str = "f32",
             model_outtype: str | None = None) -> Built:
        spec = spec or TinySpec()
        key = (repr(spec), layout)
        if key not in built:
            built[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), spec, layout)
        ckpt = built[key]
        out = ckpt / "gguf"
        model, mmproj = out / f"model-{model_outtype or outtype}.gguf", out / f"mmproj-{outtype}.gguf"
        if not (model.exists() and mmproj.exists()):
            convert(ckpt, out, model_outtype or outtype, outtype, force=True)
        return Built(ckpt, model, mmproj)

    return make


@pytest.fixture(scope="session")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drawn 640x488 scene (the photo's size): the image tests use wherever any picture will do."""
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    scene(7, 640, 488).save(path)
    return path


@pytest.fixture(scope="session")
def photo() -> Path:
    """The real 640x488 photo in tests/data (tests that need a real photograph)."""
    return _media("photo.jpeg")


@pytest.fixture(scope="session")
def real_clip() -> Path:
    """The real H.264 clip in tests/data (720x358, 240 frames)."""
    return _media("clip.mp4")


def _media(name: str) -> Path:
    path = TEST_MEDIA / name
    assert path.is_file(), f"{path} is part of the repository (tests/data/README.md)"
    return path


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Drawn scenes of several sizes, saved as PNG files."""
    out = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, (w, h) in enumerate([(320, 240), (200, 300), (97, 61)]):
        p = out / f"scene{i}.png"
        scene(i, w, h).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def motion_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s, 10 fps, 96x72 mp4v clip: a square moves over a drawn scene for 1.5 s, then nothing moves."""
    import cv2
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "motion.mp4"
    background = np.asarray(scene(4, 96, 72))[:, :, ::-1].copy()  # BGR for OpenCV
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 72))
    for i in range(30):
        frame = background.copy()
        x = min(i, 15) * 4
        frame[20:44, x:x + 24] = (30, 200, 240)
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def running_server():
    """A context manager that runs `llama3v serve`: with running_server(built, *args) as base_url."""
    return _running_server


@contextlib.contextmanager
def _running_server(built: Built, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`llama3v serve` on the built model and a free loopback port, with extra `args` (and environment `env`);
    yields its base URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama3v.cli", "serve", "--model", str(built.model), "--mmproj",
                             str(built.mmproj), "--port", str(port), "-q", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a request stuck in llama.cpp: the test is over, end it
            proc.kill()
            proc.wait()
