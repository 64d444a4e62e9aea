"""The engine build itself: CPU-specific code paths that only a real process can exercise."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from llama3v.paths import LLAMA_CPP_PYTHON_VERSION
from llama3v.testing.factory import TinySpec

ROOT = Path(__file__).resolve().parents[1]

# Widths that are multiples of 32 put the q8_0 matrices in ggml's AMX buffers on AMX CPUs.
Q8_TOWER = TinySpec(vision_hidden=64, vision_heads=4, vision_ff=160, vision_act="gelu", text_hidden=96,
                    text_heads=6, text_kv_heads=2, text_ff=192, seed=2)

SCRIPT = """
import sys, numpy as np, torch
from llama3v.runtime.encoder import VisionEncoder
encoder = VisionEncoder(sys.argv[1], n_threads=2)
tile = np.random.default_rng(0).integers(0, 256, (encoder.spec.size,) * 2 + (3,), dtype=np.uint8)
first = encoder.encode(tile)
x = torch.randn(64, 256)
with torch.autocast("cpu", dtype=torch.bfloat16):  # oneDNN's AMX kernels release the tile configuration
    (x @ x.T).sum()
print(float(np.abs(encoder.encode(tile) - first).max()))
"""


def test_amx_matmul_survives_pytorch_bf16_on_the_same_thread(tiny):
    """Patch 0004: a PyTorch bf16 matmul between two AMX encodes used to leave ggml's tiles unconfigured (SIGILL).

    On a CPU without AMX ggml takes its other q8_0 kernels; the two encodes must agree there too."""
    mmproj = tiny(Q8_TOWER, "hf-5", "q8_0").mmproj
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(mmproj)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert float(r.stdout.strip().splitlines()[-1]) == 0.0, "the same tile encodes to the same rows"


def test_the_engine_version_is_one_fact():
    """paths.py, pyproject.toml's pin, what scripts/build_engine.sh builds and the installed engine agree."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}" in deps
    script = (ROOT / "scripts" / "build_engine.sh").read_text()
    line = next(x for x in script.splitlines() if x.startswith("VERSION="))
    r = subprocess.run(["bash", "-c", f'ROOT="{ROOT}"; {line}; echo "$VERSION"'], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout.strip() == LLAMA_CPP_PYTHON_VERSION, r.stderr
    assert script.count(LLAMA_CPP_PYTHON_VERSION) == 0, "the script reads the version, it does not repeat it"
    assert importlib.metadata.version("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION
