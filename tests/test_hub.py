"""`llama3v convert org/name`: a Hub id resolved through huggingface_hub's cache, offline.

The test lays out a Hugging Face cache by hand (HF_HOME/hub/models--org--name/snapshots/<rev>/ and
refs/main), as huggingface_hub leaves it after a download, and runs the command with HF_HUB_OFFLINE=1.
huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported, so the command runs in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama3v.testing.factory import TinySpec

ROOT = Path(__file__).resolve().parents[1]
REV = "0123456789abcdef0123456789abcdef01234567"
SPEC = TinySpec(seed=6)


def _convert(cwd: Path, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llama3v.cli", "convert", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hub(tiny, tmp_path_factory):
    """A checkpoint as a local directory named like the repo (converted into by-path/), and the same files in a
    Hub cache."""
    built = tiny(SPEC, "hf-5", "f32")
    base = tmp_path_factory.mktemp("hub")
    local = base / "local" / "tiny-llava"
    shutil.copytree(built.ckpt, local, ignore=shutil.ignore_patterns("gguf"))
    repo = base / "hf" / "hub" / "models--tiny-org--tiny-llava"
    shutil.copytree(local, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    by_path = _convert(base, base / "empty-hf", str(local), "-o", "by-path", "-q")
    assert by_path.returncode == 0, by_path.stderr
    return base, local


def test_convert_by_hub_id_equals_convert_by_path(hub):
    base, _ = hub
    for args in ((), ("--revision", REV)):
        out = f"by-id{len(args)}"
        by_id = _convert(base, base / "hf", "tiny-org/tiny-llava", "-o", out, "-q", *args)
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout.split() == [str(Path(out) / "model-f16.gguf"), str(Path(out) / "mmproj-f16.gguf")]
        for name in ("model-f16.gguf", "mmproj-f16.gguf"):
            assert (base / out / name).read_bytes() == (base / "by-path" / name).read_bytes(), name


def test_a_missing_hub_id_is_a_clear_error(hub):
    base, _ = hub
    for args, looked_for in [(("tiny-org/absent",), "tiny-org/absent"),
                             (("tiny-org/tiny-llava", "--revision", "v9"), "tiny-org/tiny-llava (revision v9)")]:
        r = _convert(base, base / "hf", *args, "-o", "never")
        assert r.returncode == 1
        line, = r.stderr.strip().splitlines()
        assert looked_for in line and str(base / "hf" / "hub") in line and "HF_HUB_OFFLINE" in line, line
        assert not (base / "never").exists()


def test_a_local_path_wins_over_the_hub(hub):
    base, local = hub
    # cwd holds tiny-org/tiny-llava as a directory, and the Hub cache is empty: the directory is converted.
    shutil.copytree(local, base / "cwd" / "tiny-org" / "tiny-llava")
    r = _convert(base / "cwd", base / "empty-hf", "tiny-org/tiny-llava", "-o", "out", "-q")
    assert r.returncode == 0, r.stderr
    assert (base / "cwd" / "out" / "model-f16.gguf").read_bytes() == (base / "by-path" / "model-f16.gguf").read_bytes()
    r = _convert(base / "cwd", base / "empty-hf", "tiny-org/tiny-llava", "-o", "out2", "--revision", "main")
    assert r.returncode == 1 and "--revision applies to Hugging Face Hub ids" in r.stderr
