"""Quantization: each mmproj type within its NMSE bound, the kept-precision rule, LLM quantization, quant-report."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf import quants as gguf_quants
from PIL import Image

from llama3v.cli.quantize import quantize_file
from llama3v.converters.convert import convert
from llama3v.errors import Llama3vError
from llama3v.evaluation import quant_report as qr
from llama3v.evaluation.kl import compare, kl_divergence
from llama3v.evaluation.parity import NMSE_BOUNDS as BOUNDS
from llama3v.evaluation.parity import mean_row_cosine, nmse, tiles_of
from llama3v.gguf_header import read_gguf
from llama3v.models.llava import LlavaReference
from llama3v.quant import ggml_quants
from llama3v.quant.llm import quantize_llm
from llama3v.quant.requantize import requantize_mmproj
from llama3v.quant.storage import storage_type
from llama3v.quant.types import CONVERT_LLM_TYPES, LLM_QUANT_TYPES, MMPROJ_TYPES
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec, make_checkpoint

Q = GGMLQuantizationType

# BOUNDS: the NMSE bounds per type (evaluation/parity.py, docs/fidelity.md).

# Every width a multiple of 256, so that each type, k-quants included, really applies to the blocks.
TOWERS = {
    "clip": TinySpec(vision_hidden=256, vision_heads=4, vision_layers=3, vision_ff=512, text_hidden=256,
                     text_heads=4, text_kv_heads=2, text_ff=512, seed=2),
    "siglip": TinySpec(vision="siglip", vision_hidden=256, vision_heads=4, vision_ff=768, image_size=64, patch_size=8,
                       feature_layer=-1, text_hidden=256, text_heads=4, text_kv_heads=2, text_ff=512, seed=3),
}


@pytest.fixture(scope="module")
def reference_rows(tiny, picture, scenes_dir):
    """Per tower: the tiles both sides encode (the picture and two scenes) and the reference's rows for them."""
    cache = {}

    def get(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in cache:
            built = tiny(TOWERS[name], "hf-5", "f32")
            encoder = VisionEncoder(built.mmproj)
            tiles = tiles_of([picture, *scenes_dir[:2]], encoder)
            cache[name] = tiles, LlavaReference.from_checkpoint(built.ckpt).encode_tiles(tiles)
        return cache[name]

    return get


def _types(path) -> dict[str, GGMLQuantizationType]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


# --- mmproj -----------------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", list(MMPROJ_TYPES))
@pytest.mark.parametrize("name", list(TOWERS))
def test_every_mmproj_type_loads_and_meets_its_bound(tiny, reference_rows, name, outtype):
    mmproj = tiny(TOWERS[name], "hf-5", outtype, model_outtype="f32").mmproj
    assert _types(mmproj)["v.blk.0.ffn_down.weight"] == MMPROJ_TYPES[outtype], "the type really applies"
    tiles, ref = reference_rows(name)
    encoder = VisionEncoder(mmproj, flash_attn=False)
    ours = np.concatenate([encoder.encode(t) for t in tiles])
    print(f"{name} {outtype}: NMSE {nmse(ours, ref):.3e} cosine {mean_row_cosine(ours, ref):.6f}")
    assert nmse(ours, ref) < BOUNDS[outtype]


@pytest.mark.parametrize("name", list(TOWERS))
def test_towers_depend_on_the_image_beyond_the_bounds(reference_rows, name):
    _, ref = reference_rows(name)
    a, b = np.split(ref[:2 * len(ref) // 3], 2)  # the picture's rows and the first scene's
    assert nmse(a, b) > 4 * max(BOUNDS.values()), "a different image is further off than any type may be"


def test_storage_type_rule():
    blk = "v.blk.0.{}.weight"
    # SigLIP-so400m: 1152 wide, FFN 4304 (a multiple of 16, not of 32)
    assert storage_type(blk.format("ffn_up"), (4304, 1152), Q.Q8_0) == Q.Q8_0
    assert storage_type(blk.format("ffn_down"), (1152, 4304), Q.Q8_0) == Q.F16
    assert storage_type(blk.format("ffn_up"), (4304, 1152), Q.Q4_K) == Q.F16  # 1152 = 4.5 k-quant blocks
    assert storage_type(blk.format("ffn_up"), (4096, 1024), Q.Q4_K) == Q.Q4_K  # CLIP ViT-L
    assert storage_type("v.position_embd.weight", (577, 1024), Q.Q4_0) == Q.F16
    assert storage_type("v.patch_embd.weight", (1024, 3, 14, 14), Q.Q8_0) == Q.F16
    assert storage_type("v.blk.0.ln1.weight", (1024,), Q.Q4_K) == Q.F32
    assert storage_type("rope_freqs.weight", (64,), Q.F16) == Q.F32
    assert storage_type(blk.format("ffn_down"), (1152, 4304), Q.BF16) == Q.BF16  # float types apply everywhere


@pytest.mark.parametrize("outtype", ["q4_k", "q4_0"])
def test_written_file_keeps_precision_by_the_rule(tmp_path, outtype):
    # Rows of 256 take every type; FFN rows of 288 (9 blocks of 32) take q4_0 but not a 256-block k-quant.
    spec = TinySpec(vision_hidden=256, vision_heads=4, vision_layers=1, vision_ff=288, feature_layer=-1,
                    text_hidden=256, text_heads=4, text_kv_heads=2, text_ff=512)
    _, mmproj = convert(make_checkpoint(tmp_path / "ckpt", spec), tmp_path / "out", "f32", outtype)
    requested, types = MMPROJ_TYPES[outtype], _types(mmproj)
    assert types["v.blk.0.ffn_up.weight"] == requested and types["mm.2.weight"] == requested
    assert types["v.blk.0.ffn_down.weight"] == (Q.F16 if outtype == "q4_k" else requested)
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == Q.F16
    assert types["v.class_embd"] == types["v.blk.0.ln1.bias"] == Q.F32
    shapes = {t.name: len(t.shape) for t in GGUFReader(mmproj).tensors}
    kept = GGUFReader(mmproj).get_field("llama3v.quant.kept_precision").contents()
    assert sorted(kept) == sorted(n for n, t in types.items() if shapes[n] > 1 and t != requested)
    assert all(types[n] == Q.F16 for n in kept)


def test_ggml_binding_matches_gguf_py_and_encodes_k_quants():
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0):
        assert np.array_equal(ggml_quants.quantize(x, qtype), gguf_quants.quantize(x, qtype)), qtype.name
    errors = []
    for qtype in (Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K):
        back = gguf_quants.dequantize(ggml_quants.quantize(x, qtype), qtype)
        errors.append(float(np.mean((back - x) ** 2) / np.var(x)))
    assert errors == sorted(errors) and 1e-4 < errors[0] and errors[-1] < 0.2, errors
    with pytest.raises(Llama3vError, match="rows of 100"):
        ggml_quants.quantize(np.zeros((2, 100), np.float32), Q.Q4_K)


def test_requantize_equals_direct_conversion_and_refuses_what_it_should(tiny, tmp_path):
    built = tiny(TOWERS["clip"], "hf-5", "f32")
    for outtype in ("q4_k", "q8_0"):
        direct = tiny(TOWERS["clip"], "hf-5", outtype, model_outtype="f32").mmproj
        again = requantize_mmproj(built.mmproj, tmp_path / f"mmproj-{outtype}.gguf", outtype)
        assert again.read_bytes() == direct.read_bytes(), "same bytes as the converter writes"
    quantized = tmp_path / "mmproj-q8_0.gguf"
    with pytest.raises(Llama3vError, match="already exists"):
        requantize_mmproj(built.mmproj, quantized, "q4_0")
    with pytest.raises(Llama3vError, match="already quantized"):
        requantize_mmproj(quantized, tmp_path / "x.gguf", "q4_0")
    requantize_mmproj(quantized, tmp_path / "x.gguf", "q4_0", allow_requantize=True)
    with pytest.raises(Llama3vError, match="not an mmproj"):
        requantize_mmproj(built.model, tmp_path / "y.gguf", "q4_0")
    with pytest.raises(Llama3vError, match="unknown output type"):
        requantize_mmproj(built.mmproj, tmp_path / "z.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-q4_k.gguf", "mmproj-q8_0.gguf", "x.gguf"]


# --- LLM --------------------------------------------------------------------------------------

# One decoder block at 96 wide (q8_0 applies to every matrix), seed 5: llama.cpp's q8_0 moves the
# logits by up to ~0.4 here, so the seed was chosen for top-1 margins of more than twice that at
# every compared step (asserted below); most seeds have a step with a smaller margin.
LLM_SPEC = TinySpec(text_hidden=96, text_heads=6, text_kv_heads=2, text_ff=192, text_layers=1, seed=5)
PROMPT = "Describe the picture."


def test_q8_0_greedy_output_matches_f32(tiny, picture, tmp_path):
    built = tiny(LLM_SPEC, "hf-5", "f32")
    q8 = quantize_llm(built.model, tmp_path / "model-q8_0.gguf", "q8_0")
    assert _types(q8)["blk.0.ffn_down.weight"] == Q.Q8_0
    runs = {}
    for name, model in (("f32", built.model), ("q8_0", q8)):
        with Session(model, built.mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as session:
            tokens = session.generate(PROMPT, images=[picture], temperature=0, max_tokens=8).wait().tokens
            session.reset()
            runs[name] = tokens, session.score(PROMPT, runs.get("f32", (tokens,))[0], images=[picture])
    (tokens, ref), (q_tokens, q_logits) = runs["f32"], runs["q8_0"]
    assert len(tokens) == 8 and len(set(tokens)) >= 6, "8 steps, not one token repeated"
    assert q_tokens == tokens
    top2 = np.sort(ref[:8], axis=1)[:, -2:]
    error = np.abs(q_logits[:8] - ref[:8]).max(axis=1)
    assert np.all(top2[:, 1] - top2[:, 0] > 2 * error), "each step's top-1 margin exceeds q8_0's logit error"


@pytest.mark.parametrize("qtype", list(LLM_QUANT_TYPES))
def test_every_llm_type_loads_and_generates(tiny, tmp_path, qtype):
    built = tiny(TOWERS["clip"], "hf-5", "f32")  # 256 wide: k-quants apply without fallbacks
    out = quantize_llm(built.model, tmp_path / f"model-{qtype}.gguf", qtype)
    assert read_gguf(out).get("general.file_type") == LLM_QUANT_TYPES[qtype]
    with Session(out, n_ctx=256) as session:
        assert len(session.generate("Hello", temperature=0, max_tokens=3).wait().tokens) == 3


def test_llama_cpp_agrees_on_the_file_type_numbers():
    import llama_cpp

    for name, ftype in LLM_QUANT_TYPES.items():
        suffix = "ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}"
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{suffix}") == int(ftype) == LlamaFileType[suffix]


def test_converter_writes_bf16_llms_libllama_runs(tiny):
    built = tiny(LLM_SPEC, "hf-5", "bf16")
    assert set(CONVERT_LLM_TYPES) == {"f32", "f16", "bf16", "q8_0"}
    assert _types(built.model)["blk.0.ffn_down.weight"] == Q.BF16
    with Session(built.model, built.mmproj, n_ctx=256) as session:
        assert len(session.generate("Hello", temperature=0, max_tokens=3).wait().tokens) == 3


def test_llm_quantize_refuses_and_never_leaves_a_partial_file(tiny, tmp_path, monkeypatch):
    built = tiny(LLM_SPEC, "hf-5", "f32")
    dst = tmp_path / "model-q4_0.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(Llama3vError, match="already exists"):
        quantize_llm(built.model, dst, "q4_0")
    with pytest.raises(Llama3vError, match="unknown LLM type"):
        quantize_llm(built.model, dst, "iq2_xxs", force=True)  # needs an importance matrix: not offered
    with pytest.raises(Llama3vError, match="architecture 'clip'"):
        quantize_llm(built.mmproj, dst, "q4_0", force=True)
    q8 = quantize_llm(built.model, tmp_path / "model-q8_0.gguf", "q8_0")
    with pytest.raises(Llama3vError, match="already quantized"):
        quantize_llm(q8, dst, "q4_0", force=True)

    import llama_cpp

    def fails_halfway(src: bytes, out: bytes, params: object) -> int:
        with open(out, "wb") as f:
            f.write(b"GGUF half")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fails_halfway)
    with pytest.raises(Llama3vError, match="could not quantize"):
        quantize_llm(built.model, dst, "q4_0", force=True)
    assert dst.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-q4_0.gguf", "model-q8_0.gguf"]


def test_quantize_command_dispatches_on_the_architecture(tiny, tmp_path):
    built = tiny(LLM_SPEC, "hf-5", "f32")
    for src in (built.model, built.mmproj):
        shutil.copy(src, tmp_path / src.name)
    mmproj = quantize_file(tmp_path / "mmproj-f32.gguf", "q8_0")
    model = quantize_file(tmp_path / "model-f32.gguf", "Q4_K_M", n_threads=1)
    assert (mmproj.name, model.name) == ("mmproj-q8_0.gguf", "model-q4_k_m.gguf")
    assert read_gguf(mmproj).get("general.architecture") == "clip"
    assert read_gguf(model).get("general.file_type") == LlamaFileType.MOSTLY_Q4_K_M
    with pytest.raises(Llama3vError, match="applies to mmproj"):
        quantize_file(tmp_path / "model-f32.gguf", "q8_0", allow_requantize=True)
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(Llama3vError, match="other.gguf"):
        quantize_file(tmp_path / "other.gguf", "q8_0")


# --- KL and quant-report ----------------------------------------------------------------------

def test_kl_matches_a_hand_computed_case():
    p, q = np.log([[0.25, 0.75]]), np.log([[0.5, 0.5]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812...
    assert kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p + 100.0, q - 7.0)[0] == pytest.approx(expected, rel=1e-9), "logits, not probabilities"
    assert kl_divergence(p, p)[0] == 0.0
    div = compare(np.log([[0.25, 0.75], [0.9, 0.1], [0.4, 0.6]]), np.log([[0.5, 0.5], [0.9, 0.1], [0.45, 0.55]]))
    assert div.worst == 0 and div.kl_max == pytest.approx(expected) and div.n_positions == 3
    assert div.kl_mean == pytest.approx((expected + 0.4 * math.log(0.4 / 0.45) + 0.6 * math.log(0.6 / 0.55)) / 3)
    assert div.top1_agree == pytest.approx(2 / 3)  # [0.5, 0.5]'s argmax is token 0; the reference's is 1


def test_quant_report_on_a_tiny_model(tiny, picture, tmp_path, monkeypatch):
    built = tiny(TOWERS["clip"], "hf-5", "f32")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built.ckpt, ckpt, ignore=shutil.ignore_patterns("gguf"))
    out = tmp_path / "report"
    args = dict(mmproj_types=["f32", "q4_k"], model_types=["f32", "q8_0", "q4_0"], images=[picture], n_predict=6)
    rows = {(r.mmproj_type, r.model_type): r for r in qr.quant_report(ckpt, out, **args)}

    base = rows["f32", "f32"]
    assert base.kl_mean == base.kl_max == 0.0 and base.top1_agree == 1.0, "the f32 pair against itself"
    assert base.n_positions == 7 and base.emb_nmse < BOUNDS["f32"]
    assert rows["f32", "q4_0"].kl_mean > rows["f32", "q8_0"].kl_mean > 0
    assert rows["q4_k", "f32"].kl_mean > 0 and BOUNDS["q8_0"] < rows["q4_k", "f32"].emb_nmse < BOUNDS["q4_k"]
    assert rows["q4_k", "f32"].mmproj_bytes < base.mmproj_bytes / 5
    assert rows["f32", "q4_0"].model_bytes < rows["f32", "q8_0"].model_bytes < base.model_bytes
    assert all(r.encode_ms > 0 and 0 <= r.worst_image < 1 and 0 <= r.worst_step <= 6 for r in rows.values())

    with open(out / "quant-report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and float(table[0]["kl_mean"]) == 0.0
    markdown = (out / "quant-report.md").read_text()
    assert markdown.count("\n| q4_k | ") == 3 and "| f32 | q8_0 |" in markdown
    for name in ("quant-report.png", "quant-report-encode.png"):
        with Image.open(out / name) as png:
            assert png.size == (960, 480) and len(png.getcolors(1 << 16)) > 5

    # Cached per combination: a rerun measures only what is missing.
    calls = []
    measure = qr._divergence
    monkeypatch.setattr(qr, "_divergence", lambda *a: calls.append(a) or measure(*a))
    next(out.glob("cache/*/combo-q4_k+q8_0.json")).unlink()
    again = {(r.mmproj_type, r.model_type): r for r in qr.quant_report(ckpt, out, **args)}
    assert len(calls) == 1 and again == rows

    (ckpt / "config.json").touch()
    with pytest.raises(Llama3vError, match="another checkpoint"):
        qr.quant_report(ckpt, out, **args)
