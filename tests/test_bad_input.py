"""Bad input is a clear error naming the problem, never a crash: in the API and through the CLI process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama3v.errors import Llama3vError
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)
OTHER_WIDTH = TinySpec(seed=2, text_hidden=96, text_heads=6, text_kv_heads=2)


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, built, tiny) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {}
    jpeg = d / "truncated.jpg"
    from llama3v.evaluation.scenes import scene

    scene(0).save(d / "ok.jpg", quality=90)
    raw = (d / "ok.jpg").read_bytes()
    jpeg.write_bytes(raw[: len(raw) // 3])
    files["truncated image"] = jpeg
    files["not an image"] = d / "notes.txt"
    files["not an image"].write_text("this is not a picture\n")
    files["random bytes"] = d / "noise.png"
    files["random bytes"].write_bytes(bytes(range(256)) * 40)
    for name, src in (("truncated model", built.model), ("truncated mmproj", built.mmproj)):
        data = src.read_bytes()
        files[name] = d / f"{name.replace(' ', '-')}.gguf"
        files[name].write_bytes(data[: int(len(data) * 0.6)])
    files["mismatched mmproj"] = tiny(OTHER_WIDTH, "hf-5", "f32").mmproj
    # A u32 key rewritten as i32: libmtmd aborts the process on such a file.
    data = bytearray(built.mmproj.read_bytes())
    key = b"clip.vision.image_size"
    at = data.index(key) + len(key)
    assert data[at:at + 4] == (4).to_bytes(4, "little")
    data[at:at + 4] = (5).to_bytes(4, "little")
    files["wrong key type"] = d / "wrong-type.gguf"
    files["wrong key type"].write_bytes(bytes(data))
    files["model as mmproj"] = built.model
    # Same-length byte edits that the fuzz run found crashing libmtmd / aborting libllama before the checks:
    for name, src, find, repl in (
            ("renamed vision tensor", built.mmproj, b"v.blk.0.attn_q.weight", b"v.blk*0.attn_q.weight"),
            ("misshapen vision tensor", built.mmproj, *_swapped_dims(built.mmproj, b"v.blk.1.ffn_up.weight")),
            ("NUL in a token", built.model, _token_bytes(built.model), None)):
        data = src.read_bytes()
        at = data.index(find)
        repl = repl or find[:9] + b"\0" + find[10:]  # after the 8-byte length prefix and one text byte
        files[name] = d / f"{name.replace(' ', '-')}.gguf"
        files[name].write_bytes(data[:at] + repl + data[at + len(find):])
    return files


def _swapped_dims(path: Path, name: bytes) -> tuple[bytes, bytes]:
    """A matrix's tensor-table entry (name, n_dims, two u64 dims) and the same with its dims swapped."""
    data = path.read_bytes()
    at = data.index(name) + len(name)
    entry = data[at - len(name):at + 4 + 16]
    assert int.from_bytes(entry[len(name):len(name) + 4], "little") == 2
    return entry, entry[:len(name) + 4] + entry[len(name) + 12:] + entry[len(name) + 4:len(name) + 12]


def _token_bytes(model: Path) -> bytes:
    """An ASCII vocabulary entry (its length prefix and text) long enough to put a NUL inside."""
    from llama3v.gguf_header import read_gguf

    tokens = read_gguf(model, ("tokenizer.ggml.tokens",)).get("tokenizer.ggml.tokens")
    token = next(t for t in tokens if len(t) >= 4 and t.isascii())
    raw = token.encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("name,match", [("truncated image", "not a readable image"),
                                        ("not an image", "not a readable image"),
                                        ("random bytes", "not a readable image")])
def test_bad_image(built, bad_files, name, match):
    with Session(built.model, built.mmproj) as s, pytest.raises(Llama3vError, match=match):
        s.generate("What is this?", images=[bad_files[name]])


def test_missing_image(built, tmp_path):
    with Session(built.model, built.mmproj) as s, pytest.raises(Llama3vError, match="no such image file"):
        s.generate("What is this?", images=[tmp_path / "absent.jpg"])


@pytest.mark.parametrize("name,match", [("truncated model", "lies outside the file|truncated"),
                                        ("truncated mmproj", "lies outside the file|truncated")])
def test_truncated_gguf(built, bad_files, name, match):
    model = bad_files[name] if "model" in name else built.model
    mmproj = bad_files[name] if "mmproj" in name else built.mmproj
    with pytest.raises(Llama3vError, match=match) as e:
        Session(model, mmproj)
    assert str(bad_files[name]) in str(e.value), "the message names the file"


def test_mmproj_of_another_width(built, bad_files):
    with pytest.raises(Llama3vError, match="projects to 96-wide embeddings but .* expects 72"):
        Session(built.model, bad_files["mismatched mmproj"])


def test_wrong_key_type_is_caught_before_libmtmd(bad_files):
    with pytest.raises(Llama3vError, match="clip.vision.image_size has type INT32, libmtmd requires UINT32"):
        VisionEncoder(bad_files["wrong key type"])


@pytest.mark.parametrize("name,match", [("renamed vision tensor", "tensor v.blk.0.attn_q.weight is missing"),
                                        ("misshapen vision tensor",
                                         r"tensor v.blk.1.ffn_up.weight has shape \[\d+, \d+\], the file's keys")])
def test_incomplete_vision_tower_is_caught_before_libmtmd(bad_files, name, match):
    with pytest.raises(Llama3vError, match=match):
        VisionEncoder(bad_files[name])


def test_nul_in_a_vocabulary_token_is_caught_before_libllama(built, bad_files):
    with pytest.raises(Llama3vError, match="token contains a NUL byte"):
        Session(bad_files["NUL in a token"], built.mmproj)


def test_model_given_as_mmproj(built, bad_files):
    with pytest.raises(Llama3vError, match="not an mmproj file"):
        VisionEncoder(bad_files["model as mmproj"])


def test_prompt_longer_than_the_context(built, picture):
    with Session(built.model, built.mmproj, n_ctx=256) as s:
        with pytest.raises(Llama3vError, match=r"needs \d+ positions \(16 for media\) but the context holds 256"):
            s.generate("word " * 400, images=[picture])
        ok = s.generate("Still working?", images=[picture], temperature=0, max_tokens=2).wait()
    assert len(ok.tokens) == 2, "the session still works after a refused prompt"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3v.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["truncated image", "not an image", "truncated model", "truncated mmproj",
                                  "mismatched mmproj", "wrong key type", "prompt too long"])
def test_cli_bad_input_is_one_line_and_exit_1(built, bad_files, picture, case):
    model, mmproj, image, prompt = built.model, built.mmproj, picture, "What is this?"
    if case in ("truncated image", "not an image"):
        image = bad_files[case]
    elif case == "truncated model":
        model = bad_files[case]
    elif case == "prompt too long":
        prompt = "word " * 5000
    else:
        mmproj = bad_files[case]
    r = _cli("run", "--model", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt, "-n", "2")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama3v: error: "), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_usage_error_is_exit_2():
    r = _cli("run", "--model")
    assert r.returncode == 2


def test_cli_convert_refuses_to_overwrite(built, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(built.model, out / "model-f16.gguf")
    r = _cli("convert", str(built.ckpt), "-o", str(out), "-q")
    assert r.returncode == 1 and "already exists; pass --force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf"], "nothing written beside it"
