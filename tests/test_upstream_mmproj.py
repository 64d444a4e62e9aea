"""mmproj files as upstream llama.cpp's legacy LLaVA converter writes them: no clip.vision.feature_layer.

libmtmd then runs block_count - 1 blocks (llama.cpp #25817). llama3v warns on load, and
`llama3v fix-mmproj` adds the key; the numbers below prove both the consequence and the fix.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from llama3v import gguf_schema as S
from llama3v.converters.fix_mmproj import fix_mmproj, rewrite_metadata
from llama3v.errors import Llama3vWarning
from llama3v.evaluation.parity import nmse
from llama3v.gguf_header import read_gguf
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import load_image, prepare_tile
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(vision_layers=4, seed=4)  # feature layer -2: 3 blocks written, feature_layer = [3]


def _encode(path, tile) -> np.ndarray:
    encoder = VisionEncoder(path, flash_attn=False)
    try:
        return encoder.encode(tile)
    finally:
        encoder.close()


def _quietly(path, tile) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Llama3vWarning)
        return _encode(path, tile)


def test_mmproj_without_feature_layer_warns_runs_one_block_short_and_is_fixed(tiny, picture, tmp_path):
    ours = tiny(SPEC, "hf-5", "f32").mmproj
    blocks = read_gguf(ours).get(S.BLOCK_COUNT)
    assert blocks == 3 and read_gguf(ours).get(S.FEATURE_LAYER) == [3]
    legacy, short = tmp_path / "legacy.gguf", tmp_path / "short.gguf"
    rewrite_metadata(ours, legacy, remove=(S.FEATURE_LAYER,))
    rewrite_metadata(ours, short, add={S.FEATURE_LAYER: [blocks - 1]})
    assert S.FEATURE_LAYER not in read_gguf(legacy).kv

    tile = prepare_tile(load_image(picture), VisionEncoder(ours, flash_attn=False).spec)
    right = _quietly(ours, tile)
    with pytest.warns(Llama3vWarning, match=r"runs only 2 of its 3 vision blocks.*llama3v fix-mmproj"):
        wrong = _encode(legacy, tile)
    # The consequence, in numbers: exactly the embeddings of a file told to run block_count - 1 blocks,
    # and far from the checkpoint's (which `ours` matches to NMSE < 1e-6 in test_parity).
    assert np.array_equal(wrong, _quietly(short, tile))
    assert nmse(wrong, right) > 1e-2

    fixed = tmp_path / "fixed.gguf"
    assert fix_mmproj(legacy, fixed) == (fixed, [3])
    assert read_gguf(fixed).get(S.FEATURE_LAYER) == [3]
    assert np.array_equal(_quietly(fixed, tile), right)
    assert fix_mmproj(fixed) == (fixed, None), "a file with the key is left alone"

    # The command line: the warning is one line on stderr, and the fix works in place.
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "embed", "--mmproj", str(legacy), "--image", str(picture),
                        "-o", str(tmp_path / "e.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"llama3v: warning: {legacy} has no clip.vision.feature_layer: libmtmd runs only 2")
    cli_rows = np.load(tmp_path / "e.npy")  # `embed` runs libmtmd's default flash attention: not bit-equal
    assert nmse(cli_rows, wrong) < 1e-5 and nmse(cli_rows, right) > 1e-2
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "fix-mmproj", str(legacy)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(legacy) and "added clip.vision.feature_layer = [3]" in r.stderr
    assert read_gguf(legacy).get(S.FEATURE_LAYER) == [3]
    tensors = read_gguf(ours).tensors
    assert {n: (t.type, t.nbytes) for n, t in read_gguf(legacy).tensors.items()} == \
        {n: (t.type, t.nbytes) for n, t in tensors.items()}


def test_fix_mmproj_refuses_a_model_file(tiny):
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "fix-mmproj", str(tiny(SPEC, "hf-5", "f32").model)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not an mmproj file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
