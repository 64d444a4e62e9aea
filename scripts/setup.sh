#!/usr/bin/env bash
# Create .venv with llama3v, its test dependencies and our patched llama-cpp-python build.
# Idempotent: a second run only checks that the installed engine is the one the patches describe.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # the CPU wheel this team's machines carry; any torch>=2.3 works

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
wheel=$(PYTHON=.venv/bin/python scripts/build_engine.sh)
if [ ! -f .venv/.installed ] || [ "$(cat .venv/.installed)" != "$wheel $(sha256sum pyproject.toml)" ]; then
    .venv/bin/python -m pip install --quiet "$wheel" "$TORCH_SPEC" -e '.[test]'
    # pip keeps an installed llama-cpp-python of the same version; make sure it is this build.
    .venv/bin/python -m pip install --quiet --force-reinstall --no-deps "$wheel"
    echo "$wheel $(sha256sum pyproject.toml)" > .venv/.installed
fi
# The chat page's browser test (tests/test_web_page.py) drives Debian's Chromium through chromedriver and
# skips without them: install them where we can, say how where we cannot. Nothing to do when present.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
            >/dev/null) || echo "setup: could not install chromium; the browser test will skip" >&2
    else
        echo "setup: no chromium/chromedriver, so the browser test will skip; install them" \
            "(Debian/Ubuntu: sudo apt-get install chromium chromium-driver)" >&2
    fi
fi
