"""Where llama3v keeps what it builds (engine wheels, the llama-cpp-python sdist, demo models) and its test media."""

import os
from pathlib import Path

# The pinned engine, for Python. pyproject.toml pins the same for pip and scripts/build_engine.sh reads it from
# there; tests/test_engine.py checks that all three agree with the installed engine.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Real media for tests, the demo and the benchmarks (tests/data/README.md): present in a checkout, not in a wheel.
TEST_MEDIA = Path(__file__).resolve().parents[1] / "tests" / "data"


def cache_dir() -> Path:
    """$LLAMA3V_CACHE, or ~/.cache/llama3v (scripts/build_engine.sh uses the same)."""
    return Path(os.environ.get("LLAMA3V_CACHE") or Path.home() / ".cache" / "llama3v")


def engine_sdist() -> Path:
    """The llama-cpp-python sdist that `make` downloads to build the engine."""
    return cache_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
