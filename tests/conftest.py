"""Shared fixtures: tiny checkpoints built by the factory, converted once per session, and test media."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from llama3v.converters.convert import convert
from llama3v.evaluation.scenes import scene
from llama3v.models.factory import TinySpec, make_checkpoint

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


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
    """The real photo from ../shared/testdata (tests that need a real photograph)."""
    path = TESTDATA / "photo.jpeg"
    if not path.is_file():
        pytest.skip(f"{TESTDATA} is absent (a checkout outside this team's machines)")
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
