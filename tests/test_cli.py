"""The CLI contract (README.md, docs/architecture.md): names, outputs and JSON fields scripts rely on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from llama3v.cli import build_parser
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import load_image, prepare_tile
from llama3v.runtime.options import SessionOptions
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3v.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


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


def _help(*command: str) -> tuple[set[str], list[str]]:
    """Parse `llama3v COMMAND --help`: the option strings it documents and its positional arguments, in order."""
    r = _cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    options, positionals, section = set(), [], None
    for line in r.stdout.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
            continue
        entry = re.match(r"^  (\S.*?)(?:\s{2,}|$)", line)  # help text starts 2+ spaces after the entry
        if not entry:
            continue
        if section == "options":  # "-p PROMPT, --prompt PROMPT" -> -p, --prompt
            options.update(item.split()[0] for item in entry.group(1).split(", "))
        elif section == "positional arguments":
            positionals.append(entry.group(1))
    return options, positionals


# The contract (README.md): each command's options and positionals; commands may add more, never lose one.
CONTRACT = {
    "convert": ({"-o", "--outdir", "--outtype", "--mmproj-outtype", "--model-outtype", "--force", "--revision"},
                ["src"]),
    "embed": ({"--mmproj", "--image", "--video", "--max-tiles", "--max-video-tokens", "-o", "--output"}, []),
    "run": ({"--model", "--mmproj", "--image", "--video", "-p", "--prompt", "-n", "--n-predict", "--temp", "--top-k",
             "--top-p", "--seed", "--max-tiles", "--max-video-tokens", "--n-ctx", "--threads", "--json", "--system",
             "--image-layout"}, []),
    "chat": ({"--model", "--mmproj", "--system", "-n", "--temp", "--seed", "--max-tiles", "--n-ctx", "--threads"}, []),
    "serve": ({"--model", "--mmproj", "--host", "--port", "--api-key", "--allowed-root", "--max-tiles", "--n-ctx"}, []),
    "quantize": ({"-o", "--output", "--force", "--allow-requantize", "--threads"}, ["src", "type"]),
    "fix-mmproj": ({"-o", "--output"}, ["mmproj"]),
    "quant-report": ({"--mmproj-types", "--model-types", "--image", "-p", "--prompt", "-n", "-o", "--outdir"}, ["src"]),
    "demo": ({"--workdir", "--parity"}, []),
}
COMMON = {"-h", "--help", "-v", "--verbose", "-q", "--quiet"}


def test_every_subcommand_is_covered():
    options, positionals = _help()
    assert options == {"-h", "--help", "--version"} and positionals == ["COMMAND"]
    listed = _cli("--help").stdout.split("positional arguments:")[1].split("options:")[0]
    commands = [m.group(1) for m in re.finditer(r"^    (\S+)", listed, re.MULTILINE)]
    assert sorted(commands) == sorted(CONTRACT), "a new subcommand needs its contract in CONTRACT"


@pytest.mark.parametrize("command", list(CONTRACT))
def test_help_documents_the_contract(command):
    options, positionals = _help(command)
    expected, expected_positionals = CONTRACT[command]
    assert expected | COMMON <= options, f"{command} --help lacks {sorted(expected | COMMON - options)}"
    assert positionals == expected_positionals


def test_the_help_parser_is_not_fooled_by_substrings():
    """serve's help holds "-p" (in --port) and "-n" (in --n-ctx) but has no such options: only real options count."""
    text = _cli("serve", "--help").stdout
    options, _ = _help("serve")
    assert "-p" in text and "-n" in text and "-p" not in options and "-n" not in options
    options, _ = _help("convert")
    assert "--mmproj-outtype" in options and "--mmproj" not in options


def test_session_defaults_come_from_session_options():
    args = build_parser().parse_args(["run", "--model", "m.gguf", "-p", "hi"])
    assert args.n_ctx == SessionOptions.n_ctx and args.video_frames == SessionOptions().video_sampling.frames


def test_bad_environment_defaults_only_concern_serve():
    """LLAMA3V_* values are read when `serve` runs: a bad one is serve's usage error, no other command's problem."""
    env = {**os.environ, "LLAMA3V_PORT": "abc", "LLAMA3V_TIMEOUT": "soon"}
    for command in (["convert", "--help"], ["run", "--help"], ["serve", "--help"]):
        r = _cli(*command, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (command, r.stderr)
    r = _cli("serve", "--model", "m.gguf", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --port: invalid int value: 'abc'" in r.stderr


def test_a_context_past_the_trained_length_is_one_warning_line(tiny):
    built = tiny(TinySpec(seed=2, max_position_embeddings=256), "hf-5", "f32")
    r = _cli("run", "--model", str(built.model), "-p", "Hi", "-n", "1", "--temp", "0", "--n-ctx", "512", "--json")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "trained on" in line]
    assert warning == [f"llama3v: warning: {built.model.name}: a context of 512 positions goes past the 256 the "
                       "model was trained on; answers may degrade beyond that"]
