#!/usr/bin/env bash
# Build llama-cpp-python from its pinned sdist with our patches (patches/*.patch) into a
# wheel cached under a key of version + build flags + patches, and print the wheel's path.
#
# pip's own wheel cache ignores CMAKE_ARGS and would hand back a stock (crashing) build, so the
# wheel is built with `pip wheel --no-deps` and kept in our own cache, which a fresh clone on
# the same machine reuses. ccache makes a rebuild with a changed patch take seconds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The version pyproject.toml pins (llama3v/paths.py holds it for Python; tests/test_engine.py checks they agree).
VERSION=$(sed -n 's/^ *"llama-cpp-python==\([0-9][0-9.]*\)",.*$/\1/p' "$ROOT/pyproject.toml")
[ -n "$VERSION" ] || { echo "pyproject.toml pins no llama-cpp-python==VERSION" >&2; exit 1; }
CACHE=${LLAMA3V_CACHE:-$HOME/.cache/llama3v}
PYTHON=${PYTHON:-python3}

# The engine is built for this machine's CPU (-march=native: AVX-512, AMX where present; the SIGILL
# that native builds hit on AMX CPUs is fixed by patch 0002). LLAMA3V_PORTABLE=1 builds for any
# x86-64 with AVX2 instead. Apple builds get Metal from llama-cpp-python's own CMakeLists.
FLAGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
if [ "${LLAMA3V_PORTABLE:-0}" = 1 ]; then
    FLAGS="$FLAGS -DGGML_NATIVE=OFF"
    cpu=portable
else
    FLAGS="$FLAGS -DGGML_NATIVE=ON"
    # A native wheel only runs on CPUs with the same features: they are part of the cache key.
    cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || sysctl -n machdep.cpu.features 2>/dev/null || uname -m)
fi
# LLAMA3V_BLAS=mkl: Intel MKL (pip's mkl-devel, ~1 GB) as ggml's BLAS backend, which patch 0003
# lets libmtmd use: F32 vision towers then run at PyTorch's speed (docs/benchmarks.md).
if [ "${LLAMA3V_BLAS:-}" = mkl ]; then
    "$PYTHON" -m pip install --quiet mkl-devel >&2
    prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
    FLAGS="$FLAGS -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=Generic -DBLAS_LIBRARIES=$prefix/lib/libmkl_rt.so.3"
    # ggml detects MKL by "mkl" in the include path, which a venv's include directory lacks.
    FLAGS="$FLAGS -DBLAS_INCLUDE_DIRS=$prefix/include -DCMAKE_CXX_FLAGS=-DGGML_BLAS_USE_MKL"
fi
FLAGS="$FLAGS ${LLAMA3V_CMAKE_ARGS:-}"

key=$( { echo "$VERSION"; echo "$FLAGS" | sed 's|-DBLAS_[A-Z_]*=[^ ]*||g'; echo "$cpu"; uname -sm; cat "$ROOT"/patches/*.patch; } \
    | sha256sum | cut -c1-16)
wheel_dir="$CACHE/wheels/$VERSION-$key"
if compgen -G "$wheel_dir/*.whl" >/dev/null; then
    ls "$wheel_dir"/*.whl
    exit 0
fi

echo "building llama-cpp-python $VERSION with patches ($key); this takes ~7 min on 2 cores" >&2
sdist_dir="$CACHE/sdist"
mkdir -p "$sdist_dir"
sdist="$sdist_dir/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$sdist_dir" >&2
fi

# A fixed source path keeps ccache hits across patch changes.
src="$CACHE/src/llama-cpp-python"
rm -rf "$src"
mkdir -p "$src"
tar xzf "$sdist" -C "$src" --strip-components=1
for p in "$ROOT"/patches/*.patch; do
    echo "applying $(basename "$p")" >&2
    patch -d "$src" -p1 --forward --quiet < "$p"
done

mkdir -p "$CACHE/wheels"
tmp=$(mktemp -d "$CACHE/wheels/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export CMAKE_ARGS="$FLAGS"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
export CCACHE_BASEDIR="$src" CCACHE_NOHASHDIR=1
"$PYTHON" -m pip wheel --no-deps "$src" -w "$tmp" \
    --config-settings=build-dir="$CACHE/build/llama-cpp-python" >&2
mkdir -p "$wheel_dir"
mv "$tmp"/*.whl "$wheel_dir"/
ls "$wheel_dir"/*.whl
