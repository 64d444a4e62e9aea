"""The converter against independent readers: transformers loads the checkpoint, gguf-py reads the GGUF."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from transformers import LlavaForConditionalGeneration

from llama3v.converters.convert import convert
from llama3v.errors import Llama3vError
from llama3v.testing.factory import LAYOUTS, TinySpec, make_checkpoint

SPEC = TinySpec(vision_layers=3, feature_layer=-2, rope_scaling={"factor": 8.0, "original_max_position_embeddings": 64})


def gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32, numpy order (rows, cols)."""
    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == GGMLQuantizationType.F16:
            data = data.astype(np.float32)
        out[t.name] = data.reshape([int(d) for d in reversed(t.shape)])
    return out


def gguf_fields(path) -> dict:
    reader = GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        vtype = field.types[0]
        if vtype == GGUFValueType.STRING:
            out[name] = (vtype, bytes(field.parts[field.data[0]]).decode())
        elif vtype == GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                out[name] = (vtype, [bytes(field.parts[i]).decode() for i in field.data])
            else:
                out[name] = (vtype, [field.parts[i].tolist()[0] for i in field.data])
        else:
            out[name] = (vtype, field.parts[field.data[0]].tolist()[0])
    return out


def llama_cpp_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a HF rotate-half Q/K weight rearranged to llama.cpp's adjacent pairs, by index."""
    d = w.shape[0] // n_head
    idx = [h * d + (j // 2) + (j % 2) * (d // 2) for h in range(n_head) for j in range(d)]
    return w[idx]


@pytest.fixture(scope="module")
def hf_state(tiny) -> dict[str, np.ndarray]:
    built = tiny(SPEC, "hf-5", "f32")
    model = LlavaForConditionalGeneration.from_pretrained(built.ckpt, dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_every_tensor_equals_the_checkpoint(tiny, hf_state):
    built = tiny(SPEC, "hf-5", "f32")
    mm, llm = gguf_tensors(built.mmproj), gguf_tensors(built.model)
    vt = "model.vision_tower."
    expect = {
        "v.patch_embd.weight": vt + "embeddings.patch_embedding.weight",
        "v.class_embd": vt + "embeddings.class_embedding",
        "v.position_embd.weight": vt + "embeddings.position_embedding.weight",
        "v.pre_ln.weight": vt + "pre_layrnorm.weight",
        "v.pre_ln.bias": vt + "pre_layrnorm.bias",
        "mm.0.weight": "model.multi_modal_projector.linear_1.weight",
        "mm.0.bias": "model.multi_modal_projector.linear_1.bias",
        "mm.2.weight": "model.multi_modal_projector.linear_2.weight",
        "mm.2.bias": "model.multi_modal_projector.linear_2.bias",
    }
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
             "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    n_blocks = SPEC.vision_layers - 1  # feature layer -2: the last block is not needed
    for i in range(n_blocks):
        for part, hf in parts.items():
            for kind in ("weight", "bias"):
                expect[f"v.blk.{i}.{part}.{kind}"] = f"{vt}encoder.layers.{i}.{hf}.{kind}"
    assert set(mm) == set(expect), "mmproj holds exactly the needed tensors (no post_ln, no unused block)"
    for name, hf in expect.items():
        np.testing.assert_array_equal(mm[name], hf_state[hf], err_msg=name)

    lm = "model.language_model."
    head_dim = SPEC.text_hidden // SPEC.text_heads
    assert set(llm) == {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{p}.weight" for i in range(SPEC.text_layers) for p in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    np.testing.assert_array_equal(llm["token_embd.weight"], hf_state[lm + "embed_tokens.weight"])
    np.testing.assert_array_equal(llm["output.weight"], hf_state["lm_head.weight"])
    for i in range(SPEC.text_layers):
        p = f"{lm}layers.{i}."
        np.testing.assert_array_equal(llm[f"blk.{i}.attn_q.weight"],
                                      llama_cpp_order(hf_state[p + "self_attn.q_proj.weight"], SPEC.text_heads))
        np.testing.assert_array_equal(llm[f"blk.{i}.attn_k.weight"],
                                      llama_cpp_order(hf_state[p + "self_attn.k_proj.weight"], SPEC.text_kv_heads))
        np.testing.assert_array_equal(llm[f"blk.{i}.attn_v.weight"], hf_state[p + "self_attn.v_proj.weight"])
        np.testing.assert_array_equal(llm[f"blk.{i}.ffn_gate.weight"], hf_state[p + "mlp.gate_proj.weight"])
        np.testing.assert_array_equal(llm[f"blk.{i}.attn_norm.weight"], hf_state[p + "input_layernorm.weight"])
    assert llm["rope_freqs.weight"].shape == (head_dim // 2,)
    assert llm["rope_freqs.weight"][0] == 1.0 and llm["rope_freqs.weight"][-1] == 8.0, "high freqs kept, low scaled"


def test_metadata(tiny):
    built = tiny(SPEC, "hf-5", "f32")
    mm = gguf_fields(built.mmproj)
    u32 = GGUFValueType.UINT32
    assert mm["general.architecture"][1] == "clip"
    assert mm["clip.projector_type"][1] == "mlp"
    assert mm["clip.vision.image_size"] == (u32, SPEC.image_size)
    assert mm["clip.vision.patch_size"] == (u32, SPEC.patch_size)
    assert mm["clip.vision.embedding_length"] == (u32, SPEC.vision_hidden)
    assert mm["clip.vision.block_count"] == (u32, SPEC.vision_layers - 1)
    assert mm["clip.vision.projection_dim"] == (u32, SPEC.text_hidden)
    assert mm["clip.vision.feature_layer"][1] == [SPEC.vision_layers - 1]
    assert mm["clip.use_gelu"][1] is False or mm["clip.use_gelu"][1] == 0, "quick_gelu tower"
    np.testing.assert_allclose(mm["clip.vision.image_mean"][1], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    assert mm["llama3v.vision.hf_feature_layer"][1] == -2

    llm = gguf_fields(built.model)
    assert llm["general.architecture"][1] == "llama"
    assert llm["llama.embedding_length"] == (u32, SPEC.text_hidden)
    assert llm["llama.attention.head_count_kv"] == (u32, SPEC.text_kv_heads)
    assert llm["llama.rope.freq_base"][1] == pytest.approx(SPEC.rope_theta)
    tokens = llm["tokenizer.ggml.tokens"][1]
    config = json.loads((built.ckpt / "config.json").read_text())
    assert len(tokens) == config["text_config"]["vocab_size"]
    assert tokens[llm["tokenizer.ggml.bos_token_id"][1]] == "<|begin_of_text|>"
    assert "<|start_header_id|>" in llm["tokenizer.chat_template"][1]


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "hf-5"])
def test_each_layout_converts_to_the_same_files(tiny, layout):
    reference = tiny(SPEC, "hf-5", "f32")
    other = tiny(SPEC, layout, "f32")
    for a, b in ((reference.mmproj, other.mmproj), (reference.model, other.model)):
        ta, tb = gguf_tensors(a), gguf_tensors(b)
        assert set(ta) == set(tb)
        for name in ta:
            np.testing.assert_array_equal(ta[name], tb[name], err_msg=f"{layout}: {name}")


@pytest.mark.parametrize("layout", ["hf-4.45", "hf-4.52"])
def test_transformers_reads_the_older_layouts_as_the_same_model(tiny, hf_state, layout):
    """The factory's layouts are real: transformers maps them to the same parameters."""
    built = tiny(SPEC, layout, "f32")
    model = LlavaForConditionalGeneration.from_pretrained(built.ckpt, dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(hf_state)
    for name, value in state.items():
        np.testing.assert_array_equal(value.numpy(), hf_state[name], err_msg=name)


@pytest.mark.parametrize("dtype,shards,fmt", [("bf16", 1, "safetensors"), ("f16", 3, "safetensors"),
                                              ("f32", 2, "bin"), ("bf16", 1, "bin")])
def test_weight_formats(tmp_path, tiny, dtype, shards, fmt):
    ckpt = make_checkpoint(tmp_path / "ckpt", SPEC, "hf-5", dtype=dtype, shards=shards, fmt=fmt)
    if shards > 1:
        assert len(list(ckpt.glob(f"*.{'safetensors' if fmt == 'safetensors' else 'bin'}"))) == shards
    model, mmproj = convert(ckpt, tmp_path / "out", "f32", "f32")
    reference = tiny(SPEC, "hf-5", "f32")
    step = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}[dtype]
    for a, b in ((reference.mmproj, mmproj), (reference.model, model)):
        ta, tb = gguf_tensors(a), gguf_tensors(b)
        for name in ta:
            np.testing.assert_allclose(tb[name], ta[name], rtol=step, atol=step * 1e-3, err_msg=name)
            if dtype != "f32" and name == "token_embd.weight":
                assert not np.array_equal(ta[name], tb[name]), "the reduced-precision source was really read"


def test_quantized_outputs_keep_precision_where_required(tiny):
    built = tiny(SPEC, "hf-5", "q8_0")
    reader = GGUFReader(built.mmproj)
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q = GGMLQuantizationType
    assert types["v.patch_embd.weight"] == Q.F16 and types["v.position_embd.weight"] == Q.F16
    assert types["v.class_embd"] == Q.F32 and types["v.blk.0.ln1.weight"] == Q.F32
    # rows of 48 are not a multiple of q8_0's 32-block: those matrices stay f16
    assert types["v.blk.0.attn_q.weight"] == Q.F16
    assert types["v.blk.0.ffn_down.weight"] == Q.F16  # rows of 80 (the FFN width)
    assert types["mm.2.weight"] == Q.F16  # rows of 72
    kept = gguf_fields(built.mmproj)["llama3v.quant.kept_precision"][1]
    assert "v.blk.0.attn_q.weight" in kept and "v.patch_embd.weight" in kept


def test_q8_0_applies_where_rows_allow(tmp_path):
    spec = TinySpec(vision_hidden=64, vision_heads=4, vision_ff=128, text_hidden=96, text_heads=6, text_ff=192)
    ckpt = make_checkpoint(tmp_path / "ckpt", spec, "hf-5")
    model, mmproj = convert(ckpt, tmp_path / "out", "q8_0", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(mmproj).tensors}
    assert types["v.blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["mm.2.weight"] == GGMLQuantizationType.Q8_0
    types = {t.name: t.tensor_type for t in GGUFReader(model).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_linear_projector_is_expressed_exactly(tmp_path):
    spec = TinySpec(projector="linear")
    ckpt = make_checkpoint(tmp_path / "ckpt", spec, "original")
    model, mmproj = convert(ckpt, tmp_path / "out", "f32", "f32")
    t = gguf_tensors(mmproj)
    x = np.random.default_rng(0).standard_normal((5, spec.vision_hidden)).astype(np.float32)

    def gelu(v: np.ndarray) -> np.ndarray:
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    through_mlp = gelu(x @ t["mm.0.weight"].T + t["mm.0.bias"]) @ t["mm.2.weight"].T + t["mm.2.bias"]
    w = t["mm.0.weight"][:spec.text_hidden]
    b = t["mm.0.bias"][:spec.text_hidden]
    np.testing.assert_allclose(through_mlp, x @ w.T + b, atol=1e-5)


def _drop_tensor(ckpt, name):
    from llama3v.hf.checkpoint import open_checkpoint
    from llama3v.testing.factory import write_safetensors

    c = open_checkpoint(ckpt)
    tensors = {n: c.get(n) for n in c.shapes if n != name}
    write_safetensors(ckpt / "model.safetensors", tensors, "f32")


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", SPEC, "hf-5")
    _drop_tensor(ckpt, "language_model.model.layers.1.mlp.up_proj.weight")
    with pytest.raises(Llama3vError, match="text.layers.1.mlp.up_proj.weight"):
        convert(ckpt, tmp_path / "out", "f32", "f32")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unsupported_architecture(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", SPEC, "hf-5")
    config = json.loads((ckpt / "config.json").read_text())
    for key in ("vision_config", "text_config"):
        config.pop(key)
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(Llama3vError, match="unsupported architecture 'Qwen2VLForConditionalGeneration'"):
        convert(ckpt, tmp_path / "out")


def test_full_select_strategy_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", SPEC, "hf-5")
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(Llama3vError, match="keeps the class token"):
        convert(ckpt, tmp_path / "out")


def test_existing_output_is_kept_unless_forced(tmp_path, tiny):
    built = tiny(SPEC, "hf-5", "f32")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(built.model, out / "model-f32.gguf")
    before = (out / "model-f32.gguf").read_bytes()
    with pytest.raises(Llama3vError, match="already exists; pass --force"):
        convert(built.ckpt, out, "f32", "f32")
    assert (out / "model-f32.gguf").read_bytes() == before
    convert(built.ckpt, out, "f32", "f32", force=True)
    assert (out / "mmproj-f32.gguf").exists()


def test_failure_mid_write_leaves_the_destination_untouched(tmp_path, tiny, monkeypatch):
    built = tiny(SPEC, "hf-5", "f32")
    out = tmp_path / "out"
    convert(built.ckpt, out, "f32", "f32")
    before = (out / "model-f32.gguf").read_bytes()

    from gguf import GGUFWriter

    real_write = GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing_write(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert(built.ckpt, out, "f32", "f32", force=True)
    assert (out / "model-f32.gguf").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-f32.gguf", "model-f32.gguf"], "no partial files"


def test_llava_next_pinpoints_merge_type_and_newline(tiny):
    from transformers import LlavaNextForConditionalGeneration

    spec = TinySpec(grid_pinpoints=((56, 112), (112, 56), (112, 112), (168, 56)), seed=3)
    built = tiny(spec, "hf-5", "f32")
    fields = gguf_fields(built.mmproj)
    assert fields["clip.vision.image_grid_pinpoints"][1] == [112, 56, 56, 112, 112, 112, 56, 168], "(width, height)"
    assert fields["clip.vision.mm_patch_merge_type"][1] == "spatial_unpad"
    assert fields["llama3v.preprocess.mode"][1] == "squash", "LLaVA-NeXT's base view"
    model = LlavaNextForConditionalGeneration.from_pretrained(built.ckpt, dtype=torch.float32)
    newline = gguf_tensors(built.mmproj)["v.image_newline"]
    np.testing.assert_array_equal(newline, model.model.image_newline.detach().numpy())
    for layout in ("hf-4.52", "original"):
        other = gguf_tensors(tiny(spec, layout, "f32").mmproj)
        np.testing.assert_array_equal(other["v.image_newline"], newline, err_msg=layout)
        assert gguf_fields(tiny(spec, layout, "f32").mmproj)["clip.vision.image_grid_pinpoints"] == \
            fields["clip.vision.image_grid_pinpoints"]
