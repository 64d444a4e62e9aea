"""The CLI contract (README.md, docs/architecture.md): names, outputs and JSON fields scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import load_image, prepare_tile
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", *args], capture_output=True, text=True, timeout=300)
    return r


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


def test_convert_writes_both_files_and_prints_their_paths(built, tmp_path):
    r = _cli("convert", str(built.ckpt), "-o", str(tmp_path), "--model-outtype", "q8_0", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "model-q8_0.gguf"), str(tmp_path / "mmproj-f16.gguf")]
    assert (tmp_path / "model-q8_0.gguf").stat().st_size < built.model.stat().st_size


def test_run_json(built, picture):
    r = _cli("run", "--model", str(built.model), "--mmproj", str(built.mmproj), "--image", str(picture),
             "-p", "Describe <image> briefly.", "-n", "6", "--temp", "0", "--json", "--n-ctx", "512")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"text", "tokens", "prompt_tokens", "n_prompt_tokens", "timings", "decode_tokens_per_s"} <= set(out)
    assert set(out["timings"]) >= {"encode_ms", "prompt_ms", "decode_ms"}
    assert len(out["tokens"]) == 6 and out["n_prompt_tokens"] == len(out["prompt_tokens"])
    assert out["prompt_tokens"].count(None) == 16
    with Session(built.model, built.mmproj, n_ctx=512) as s:
        api = s.generate("Describe <image> briefly.", images=[picture], temperature=0, max_tokens=6).wait()
    assert out["tokens"] == api.tokens and out["text"] == api.text
    assert out["prompt_tokens"] == api.prompt_tokens


def test_run_streams_text(built, picture):
    r = _cli("run", "--model", str(built.model), "--mmproj", str(built.mmproj), "--image", str(picture),
             "-p", "Describe.", "-n", "6", "--temp", "0")
    j = _cli("run", "--model", str(built.model), "--mmproj", str(built.mmproj), "--image", str(picture),
             "-p", "Describe.", "-n", "6", "--temp", "0", "--json")
    assert r.returncode == 0 and r.stdout == json.loads(j.stdout)["text"] + "\n"


def test_embed_writes_rows_and_layout(built, picture, scenes_dir, tmp_path):
    out = tmp_path / "emb.npy"
    r = _cli("embed", "--mmproj", str(built.mmproj), "--image", str(picture), "--image", str(scenes_dir[1]),
             "-o", str(out))
    assert r.returncode == 0, r.stderr
    rows = np.load(out)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert rows.dtype == np.float32 and rows.shape == (32, SPEC.text_hidden)
    assert [(p["media"], p["kind"], p["first_row"], p["n_rows"]) for p in meta["parts"]] == [
        (0, "image", 0, 16), (1, "image", 16, 16)]
    enc = VisionEncoder(built.mmproj)
    np.testing.assert_array_equal(rows[16:], enc.encode(prepare_tile(load_image(scenes_dir[1]), enc.spec)))


@pytest.mark.parametrize("command,options", [
    ("convert", ["--outtype", "--mmproj-outtype", "--model-outtype", "--force"]),
    ("embed", ["--mmproj", "--image", "--video", "--max-tiles", "--max-video-tokens"]),
    ("run", ["--model", "--mmproj", "--image", "--video", "-p", "-n", "--temp", "--top-k", "--top-p", "--seed",
             "--max-tiles", "--max-video-tokens", "--n-ctx", "--threads", "--json", "--system"]),
    ("demo", []),
])
def test_help_documents_the_contract(command, options):
    r = _cli(command, "--help")
    assert r.returncode == 0
    for opt in options:
        assert opt in r.stdout, f"{command} --help lacks {opt}"
