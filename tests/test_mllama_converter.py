"""The mllama converter against independent readers: transformers loads the checkpoint, gguf-py reads the GGUFs.

The expected GGUF contents are spelled out here from transformers' own parameter names (not from
the converter's tables): every tensor, its layout, and the gates (raw in the model file, tanh or
1 - tanh in the mmproj).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from test_converter import gguf_fields, gguf_tensors, llama_cpp_order
from transformers import MllamaForConditionalGeneration

from llama3v.converters.convert import convert
from llama3v.errors import Llama3vError
from llama3v.quant.types import CONVERT_LLM_TYPES, MMPROJ_TYPES
from llama3v.testing.mllama_factory import LAYOUTS, TinyMllamaSpec, make_mllama_checkpoint

SPEC = TinyMllamaSpec(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 16}, seed=3)
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint dir, model GGUF, mmproj GGUF, transformers' state dict) for SPEC in the hf-5 layout, F32."""
    ckpt = make_mllama_checkpoint(tmp_path_factory.mktemp("mllama"), SPEC)
    model, mmproj = convert(ckpt, ckpt / "gguf", "f32", "f32")
    hf, info = MllamaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state["inv_freq"] = hf.model.language_model.rotary_emb.inv_freq.numpy()  # a buffer, not saved
    return ckpt, model, mmproj, state


def _expected_llm(state: dict) -> dict[str, np.ndarray]:
    lm = "model.language_model."
    out = {"token_embd.weight": state[lm + "embed_tokens.weight"], "output_norm.weight": state[lm + "norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(SPEC.text_layers):
        p = f"{lm}layers.{i}."
        out |= {f"blk.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
                f"blk.{i}.ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
                f"blk.{i}.ffn_gate.weight": state[p + "mlp.gate_proj.weight"],
                f"blk.{i}.ffn_up.weight": state[p + "mlp.up_proj.weight"],
                f"blk.{i}.ffn_down.weight": state[p + "mlp.down_proj.weight"]}
        if i in SPEC.cross_layers:
            for x in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                out[f"blk.{i}.cross_attn_{x}.weight"] = state[f"{p}cross_attn.{x}.weight"]
            out[f"blk.{i}.cross_attn_attn_gate"] = state[p + "cross_attn_attn_gate"]  # raw: the graph takes tanh
            out[f"blk.{i}.cross_attn_mlp_gate"] = state[p + "cross_attn_mlp_gate"]
        else:
            out[f"blk.{i}.attn_q.weight"] = llama_cpp_order(state[p + "self_attn.q_proj.weight"], SPEC.text_heads)
            out[f"blk.{i}.attn_k.weight"] = llama_cpp_order(state[p + "self_attn.k_proj.weight"], SPEC.text_kv_heads)
            out[f"blk.{i}.attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
            out[f"blk.{i}.attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
    return out


def _expected_mmproj(state: dict) -> dict[str, np.ndarray]:
    vm = "model.vision_model."
    pos_gate = state[vm + "gated_positional_embedding.gate"]
    out = {
        "v.patch_embd.weight": state[vm + "patch_embedding.weight"],
        "v.class_embd": state[vm + "class_embedding"],
        "v.position_embd.weight": state[vm + "gated_positional_embedding.embedding"],
        "v.position_embd.gate": 1 - np.tanh(pos_gate),
        "v.tile_position_embd.weight": state[vm + "gated_positional_embedding.tile_embedding.weight"],
        "v.tile_position_embd.gate": np.tanh(pos_gate),
        "v.pre_ln.weight": state[vm + "layernorm_pre.weight"], "v.pre_ln.bias": state[vm + "layernorm_pre.bias"],
        "v.post_ln.weight": state[vm + "layernorm_post.weight"], "v.post_ln.bias": state[vm + "layernorm_post.bias"],
        "mm.0.weight": state["model.multi_modal_projector.weight"],
        "mm.0.bias": state["model.multi_modal_projector.bias"],
    }
    for when in ("pre", "post"):
        p = f"{vm}{when}_tile_positional_embedding."
        out[f"v.{when}_tile_position_embd.weight"] = state[p + "embedding.weight"]
        out[f"v.{when}_tile_position_embd.gate"] = np.tanh(state[p + "gate"])
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.o_proj", "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
             "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
    for prefix, group, n in (("v.blk", "transformer", SPEC.vision_layers),
                             ("v.global.blk", "global_transformer", SPEC.global_layers)):
        for i in range(n):
            src = f"{vm}{group}.layers.{i}."
            for part, hf in parts.items():
                for kind in ("weight", "bias"):
                    if src + f"{hf}.{kind}" in state:
                        out[f"{prefix}.{i}.{part}.{kind}"] = state[src + f"{hf}.{kind}"]
            if group == "global_transformer":
                out[f"{prefix}.{i}.attn_gate"] = np.tanh(state[src + "gate_attn"])
                out[f"{prefix}.{i}.ffn_gate"] = np.tanh(state[src + "gate_ffn"])
    return out


def test_every_tensor_equals_transformers(built):
    _, model, mmproj, state = built
    for path, expected in ((model, _expected_llm(state)), (mmproj, _expected_mmproj(state))):
        got = gguf_tensors(path)
        assert set(got) == set(expected) | ({"rope_freqs.weight"} if path == model else set())
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], np.asarray(want, np.float32).reshape(got[name].shape),
                                       rtol=1e-6, atol=0, err_msg=name)
    llm = gguf_tensors(model)
    vocab = json.loads((built[0] / "config.json").read_text())["text_config"]["vocab_size"]
    assert llm["token_embd.weight"].shape[0] == vocab + 8 and llm["output.weight"].shape[0] == vocab
    # llama.cpp divides the plain frequencies by rope_freqs: the result must be transformers' llama3 ones.
    head_dim = SPEC.text_hidden // SPEC.text_heads
    plain = 1.0 / SPEC.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(plain / llm["rope_freqs.weight"], state["inv_freq"], rtol=1e-5)
    assert llm["rope_freqs.weight"][-1] == 8.0 and llm["rope_freqs.weight"][0] < 8.0


def test_metadata(built):
    ckpt, model, mmproj, _ = built
    u32, i32 = GGUFValueType.UINT32, GGUFValueType.INT32
    llm = gguf_fields(model)
    config = json.loads((ckpt / "config.json").read_text())
    vocab = config["text_config"]["vocab_size"]
    assert llm["general.architecture"][1] == "mllama"
    assert llm["mllama.attention.cross_attention_layers"] == (GGUFValueType.ARRAY, list(SPEC.cross_layers))
    assert llm["mllama.block_count"] == (u32, SPEC.text_layers)
    assert llm["mllama.attention.head_count_kv"] == (u32, SPEC.text_kv_heads)
    assert llm["mllama.vocab_size"] == (u32, vocab)
    assert llm["llama3v.mllama.image_token_id"] == (u32, config["image_token_index"])
    tokens = llm["tokenizer.ggml.tokens"][1]
    assert len(tokens) == vocab + 1 and tokens[vocab] == "<|image|>"

    mm = gguf_fields(mmproj)
    assert mm["general.architecture"][1] == "clip" and mm["clip.projector_type"][1] == "mllama"
    assert mm["clip.vision.block_count"] == (u32, SPEC.vision_layers)
    assert mm["clip.vision.embedding_length"] == (u32, SPEC.vision_hidden)
    assert mm["clip.vision.attention.head_count"] == (u32, SPEC.vision_heads)
    assert mm["clip.vision.projection_dim"] == (u32, SPEC.text_hidden)
    assert mm["clip.use_gelu"][1] in (True, 1)
    assert mm["llama3v.preprocess.mode"][1] == "mllama"
    assert mm["llama3v.mllama.max_num_tiles"] == (u32, SPEC.max_tiles)
    assert mm["llama3v.mllama.global_block_count"] == (u32, SPEC.global_layers)
    assert mm["llama3v.mllama.intermediate_layers"][1] == list(SPEC.intermediate_layers)
    assert mm["llama3v.mllama.aspect_ratios"][1] == [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1]
    assert mm["llama3v.mllama.gates_tanh"][1] in (True, 1)
    assert mm["llama3v.mllama.outer_layer_norm_epsilon"][1] == pytest.approx(1e-5)
    assert GGUFReader(mmproj).fields["llama3v.mllama.intermediate_layers"].types[1] == i32


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "hf-5"])
def test_each_layout_is_read_by_transformers_and_converts_to_the_same_files(built, tmp_path, layout):
    ckpt, model, mmproj, state = built
    other = make_mllama_checkpoint(tmp_path / "ckpt", SPEC, layout)
    hf_model, info = MllamaForConditionalGeneration.from_pretrained(other, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf = hf_model.state_dict()
    assert set(hf) == set(state) - {"inv_freq"}
    for name, value in hf.items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)
    m2, mm2 = convert(other, tmp_path / "out", "f32", "f32")
    for a, b in ((model, m2), (mmproj, mm2)):
        ta, tb = gguf_tensors(a), gguf_tensors(b)
        assert set(ta) == set(tb)
        for name in ta:
            np.testing.assert_array_equal(ta[name], tb[name], err_msg=f"{layout}: {name}")


def _vision_states_from_mmproj(path, tiles: np.ndarray, aspect_ratio_id: int) -> np.ndarray:
    """The encoder computed from the mmproj alone, as docs/formats.md describes it: the file is sufficient."""
    t = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in gguf_tensors(path).items()}  # copies: read-only maps
    f = {k: v[1] for k, v in gguf_fields(path).items()}
    d, size, patch = f["clip.vision.embedding_length"], f["clip.vision.image_size"], f["clip.vision.patch_size"]
    heads, n_tiles_max, eps = f["clip.vision.attention.head_count"], f["llama3v.mllama.max_num_tiles"], \
        f["clip.vision.attention.layer_norm_epsilon"]
    n_pos = (size // patch) ** 2 + 1
    n_pad = -(-n_pos // 8) * 8
    x = torch.zeros(n_tiles_max, 3, size, size)
    mean, std = (torch.tensor(f[k]).view(1, 3, 1, 1) for k in ("clip.vision.image_mean", "clip.vision.image_std"))
    x[:len(tiles)] = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std
    x = torch.nn.functional.conv2d(x, t["v.patch_embd.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = x + t["v.pre_tile_position_embd.weight"][aspect_ratio_id].view(n_tiles_max, 1, d) * \
        t["v.pre_tile_position_embd.gate"]
    x = torch.cat([t["v.class_embd"].expand(n_tiles_max, 1, d), x], dim=1)
    x = x + t["v.position_embd.weight"] * t["v.position_embd.gate"] + \
        t["v.tile_position_embd.weight"][aspect_ratio_id].view(n_tiles_max, n_pos, d) * t["v.tile_position_embd.gate"]

    def ln(h, name, e):
        return torch.nn.functional.layer_norm(h, (d,), t[name + ".weight"], t[name + ".bias"], e)

    outer = f["llama3v.mllama.outer_layer_norm_epsilon"]
    x = torch.nn.functional.pad(ln(x, "v.pre_ln", outer), (0, 0, 0, n_pad - n_pos))
    pad = torch.ones(n_tiles_max, n_pad)
    pad[:len(tiles), :n_pos] = 0
    pad = pad.reshape(-1, 1)
    mask = pad @ pad.T * torch.finfo(torch.float32).min  # only padding x padding is masked, as HF
    x = x.reshape(1, -1, d)

    def layer(h, pre, gated):
        q, k, v = (torch.nn.functional.linear(ln(h, pre + "ln1", eps), t[f"{pre}attn_{c}.weight"])
                   .view(1, -1, heads, d // heads).transpose(1, 2) for c in "qkv")
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(h.shape)
        a = torch.nn.functional.linear(a, t[pre + "attn_out.weight"])
        h = h + (a * t[pre + "attn_gate"] if gated else a)
        m = torch.nn.functional.linear(ln(h, pre + "ln2", eps), t[pre + "ffn_up.weight"], t[pre + "ffn_up.bias"])
        m = torch.nn.functional.linear(torch.nn.functional.gelu(m), t[pre + "ffn_down.weight"],
                                       t[pre + "ffn_down.bias"])
        return h + (m * t[pre + "ffn_gate"] if gated else m)

    kept = {}
    for i in range(f["clip.vision.block_count"]):
        x = layer(x, f"v.blk.{i}.", False)
        kept[i] = x
    x = ln(x, "v.post_ln", outer).view(n_tiles_max, n_pad, d)
    x = (x + t["v.post_tile_position_embd.weight"][aspect_ratio_id].view(n_tiles_max, 1, d) *
         t["v.post_tile_position_embd.gate"]).reshape(1, -1, d)
    for i in range(f["llama3v.mllama.global_block_count"]):
        x = layer(x, f"v.global.blk.{i}.", True)
    inter = torch.stack([kept[i] for i in f["llama3v.mllama.intermediate_layers"]], dim=-1)
    feats = torch.cat([x.view(n_tiles_max, n_pad, d), inter.reshape(n_tiles_max, n_pad, -1)], dim=-1)[:, :n_pos]
    out = torch.nn.functional.linear(feats, t["mm.0.weight"], t["mm.0.bias"])
    return out.reshape(-1, out.shape[-1]).numpy()


def test_the_mmproj_alone_reproduces_the_vision_states(built):
    """Every key and tensor the encoder needs is in the file, with the semantics docs/formats.md gives them."""
    from llama3v.evaluation.scenes import scene
    from llama3v.models.mllama import MllamaReference
    from llama3v.runtime.mllama_image import mllama_tiles

    ckpt, _, mmproj, _ = built
    ref = MllamaReference.from_checkpoint(ckpt)
    for w, h in ((90, 30), (28, 28)):
        tiles = mllama_tiles(scene(4, w, h), SPEC.image_size, SPEC.max_tiles)
        want = ref.vision_states(tiles.tiles, tiles.aspect_ratio_id)
        got = _vision_states_from_mmproj(mmproj, tiles.tiles, tiles.aspect_ratio_id)
        diff = float(np.abs(got - want).max())
        print(f"{tiles.grid}: max abs diff of the states from the mmproj alone {diff:.3g}")
        assert got.shape == want.shape and diff < 1e-4 and want.std() > 0.1


def _logits_from_model_gguf(path, ids: list[int], states: np.ndarray | None, n_tiles: list[int]) -> np.ndarray:
    """The decoder computed from the model GGUF alone, as llama.cpp would: interleaved rope on the permuted
    Q/K with `rope_freqs`, tanh of the raw gates, HF's cross-attention mask (docs/mllama.md)."""
    from llama3v.mllama_format import cross_attention_spans

    t = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in gguf_tensors(path).items()}
    f = {k: v[1] for k, v in gguf_fields(path).items()}
    n_head, n_kv, hd = f["mllama.attention.head_count"], f["mllama.attention.head_count_kv"], \
        f["mllama.rope.dimension_count"]
    eps, cross = f["mllama.attention.layer_norm_rms_epsilon"], f["mllama.attention.cross_attention_layers"]
    T = len(ids)
    freqs = f["mllama.rope.freq_base"] ** (-torch.arange(0, hd, 2).double() / hd) / t["rope_freqs.weight"].double()
    angle = (torch.arange(T).double()[:, None] * freqs[None]).float()  # [T, hd/2]

    def rope(x):  # x [T, heads, hd]; llama.cpp's "normal" rope rotates adjacent pairs
        x = x.view(T, x.shape[1], hd // 2, 2)
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        return torch.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], -1).flatten(2)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def lin(x, name):
        return torch.nn.functional.linear(x, t[name])

    def ffn(x, b):
        return lin(torch.nn.functional.silu(lin(x, b + "ffn_gate.weight")) * lin(x, b + "ffn_up.weight"),
                   b + "ffn_down.weight")

    if states is not None:
        sees = torch.zeros(T, len(n_tiles), SPEC.max_tiles)
        for i, ((a, e), n) in enumerate(zip(cross_attention_spans(ids, f["llama3v.mllama.image_token_id"]), n_tiles,
                                            strict=True)):
            sees[a:e, i, :n] = 1
        sees = sees.repeat_interleave(states.shape[0] // (len(n_tiles) * SPEC.max_tiles), dim=2).reshape(T, -1)
        row = sees.any(-1, keepdim=True).float()
        mask = torch.where(sees.bool() | ~row.bool(), 0.0, float("-inf"))  # rows that see nothing: uniform
        s_t = torch.from_numpy(states)
    x = t["token_embd.weight"][torch.tensor(ids)]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(f["mllama.block_count"]):
        b = f"blk.{i}."
        h = rms(x, t[b + "attn_norm.weight"])
        if i in cross:
            if states is None:
                continue  # text only: the cross-attention layers are skipped
            q = rms(lin(h, b + "cross_attn_q_proj.weight").view(T, n_head, hd), t[b + "cross_attn_q_norm.weight"])
            k = rms(lin(s_t, b + "cross_attn_k_proj.weight").view(-1, n_kv, hd), t[b + "cross_attn_k_norm.weight"])
            v = lin(s_t, b + "cross_attn_v_proj.weight").view(-1, n_kv, hd)
            att = mask
        else:
            q = rope(lin(h, b + "attn_q.weight").view(T, n_head, hd))
            k = rope(lin(h, b + "attn_k.weight").view(T, n_kv, hd))
            v = lin(h, b + "attn_v.weight").view(T, n_kv, hd)
            att = causal
        k, v = (z.repeat_interleave(n_head // n_kv, dim=1).transpose(0, 1) for z in (k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=att)
        a = a.transpose(0, 1).reshape(T, -1)
        if i in cross:
            x = x + torch.tanh(t[b + "cross_attn_attn_gate"]) * lin(a, b + "cross_attn_o_proj.weight")
            x = x + torch.tanh(t[b + "cross_attn_mlp_gate"]) * row * ffn(rms(x, t[b + "ffn_norm.weight"]), b)
        else:
            x = x + lin(a, b + "attn_output.weight")
            x = x + ffn(rms(x, t[b + "ffn_norm.weight"]), b)
    return lin(rms(x, t["output_norm.weight"]), "output.weight").numpy()


def test_the_model_gguf_alone_reproduces_the_logits(built):
    """The decoder file is complete: permuted Q/K, rope_freqs, raw gates and the mask rules give the reference."""
    from llama3v.evaluation.scenes import scene
    from llama3v.models.mllama import MllamaReference
    from llama3v.runtime.mllama_image import mllama_tiles

    ckpt, model, _, _ = built
    ref = MllamaReference.from_checkpoint(ckpt)
    image = ref.config.image_token_index
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, 400, 6)] + [image] + [int(i) for i in rng.integers(0, 400, 30)]
    tiles = mllama_tiles(scene(4, 90, 30), SPEC.image_size, SPEC.max_tiles)
    states = ref.vision_states(tiles.tiles, tiles.aspect_ratio_id)
    for prompt, images, st in ((ids, [(tiles.tiles, tiles.aspect_ratio_id)], states), (ids[:6], [], None)):
        want = ref.logits(prompt, images)
        got = _logits_from_model_gguf(model, prompt, st, [tiles.n_tiles] if images else [])
        diff = float(np.abs(got - want).max())
        print(f"{len(prompt)} positions, {len(images)} image: max abs logits diff from the model GGUF alone {diff:.3g}")
        assert diff < 1e-4 and want.std() > 1.0


# Widths that are whole q8_0 / q4_x blocks, so the quantized types really apply.
WIDE = TinyMllamaSpec(vision_hidden=64, vision_heads=2, vision_ff=128, text_hidden=64, text_heads=4,
                      text_kv_heads=2, text_ff=128, seed=1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_mllama_checkpoint(tmp_path_factory.mktemp("wide"), WIDE)


@pytest.mark.parametrize("mmproj_type", list(MMPROJ_TYPES))
def test_every_mmproj_type(wide, tmp_path, mmproj_type):
    model_type = mmproj_type if mmproj_type in CONVERT_LLM_TYPES else "f16"
    model, mmproj = convert(wide, tmp_path, model_type, mmproj_type)
    reference = gguf_tensors(convert(wide, tmp_path / "f32", "f32", "f32")[1])
    types = {t.name: t.tensor_type for t in GGUFReader(mmproj).tensors}
    requested = Q[mmproj_type.upper()]
    kept = requested if requested in (Q.F32, Q.F16, Q.BF16) else Q.F16
    for name in ("v.tile_position_embd.weight", "v.pre_tile_position_embd.weight", "v.position_embd.weight"):
        assert types[name] == kept, f"{name}: embeddings keep f16 or better"
    assert types["v.blk.0.ln1.weight"] == Q.F32 and types["v.global.blk.0.attn_gate"] == Q.F32
    if requested in (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32):
        assert types["v.blk.0.attn_q.weight"] == requested and types["mm.0.weight"] == requested
    got = gguf_tensors(mmproj) if requested in (Q.F32, Q.F16) else {}
    for name, value in got.items():
        np.testing.assert_allclose(value, reference[name], atol=2e-3 * max(1.0, np.abs(reference[name]).max()),
                                   err_msg=name)
    llm_types = {t.name: t.tensor_type for t in GGUFReader(model).tensors}
    assert llm_types["blk.1.cross_attn_attn_gate"] == Q.F32
    if model_type == "q8_0":
        assert llm_types["blk.1.cross_attn_q_proj.weight"] == Q.Q8_0


def test_llama_3_2_11b_vision_config_parses_with_its_real_shapes():
    from transformers import MllamaConfig as HFMllamaConfig

    from llama3v.hf.mllama_config import MllamaConfig

    hf = HFMllamaConfig().to_dict()  # transformers' defaults: Llama-3.2-11B-Vision's shapes with 448 tiles
    cfg = MllamaConfig.from_dicts(hf, {"max_image_tiles": 4, "size": {"height": 448, "width": 448}})
    assert (cfg.vision.n_positions, cfg.vision.n_padded, cfg.vision.vision_output_dim) == (1025, 1032, 7680)
    assert cfg.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38] and cfg.n_embedding_rows == 128264
    assert cfg.image_token_index == cfg.text.vocab_size == 128256 and cfg.vision.attention_heads == 16
    with pytest.raises(Llama3vError, match="aspect-ratio ids would disagree"):
        MllamaConfig.from_dicts(hf, {"max_image_tiles": 2})


def test_llm_types_beyond_the_converters_are_refused(wide, tmp_path):
    with pytest.raises(Llama3vError, match="unknown output type 'q4_k_m'"):
        convert(wide, tmp_path, "q4_k_m", "f16")


def _edit_config(ckpt, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        target = config
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    (ckpt / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    from llama3v.hf.checkpoint import open_checkpoint
    from llama3v.testing.factory import write_safetensors

    ckpt = make_mllama_checkpoint(tmp_path / "ckpt", SPEC)
    c = open_checkpoint(ckpt)
    dropped = "language_model.model.layers.3.cross_attn.k_norm.weight"
    write_safetensors(ckpt / "model.safetensors", {n: c.get(n) for n in c.shapes if n != dropped}, "f32")
    with pytest.raises(Llama3vError, match=r"text\.layers\.3\.cross_attn\.k_norm\.weight"):
        convert(ckpt, tmp_path / "out", "f32", "f32")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_image_token_absent_from_the_vocabulary_is_refused(tmp_path):
    ckpt = make_mllama_checkpoint(tmp_path / "ckpt", SPEC)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|image|>"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(Llama3vError, match="lacks the image token"):
        convert(ckpt, tmp_path / "out", "f32", "f32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    ({"text_config__cross_attention_layers": []}, "without cross_attention_layers"),
    ({"text_config__cross_attention_layers": [1, 9]}, "must be distinct layers"),
    ({"vision_config__vision_output_dim": 7}, "vision_output_dim"),
    ({"vision_config__intermediate_layers_indices": [1, 4]}, "intermediate_layers_indices"),
    ({"image_token_index": 10_000}, "outside the token embedding"),
    ({"text_config__rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope scaling"),
])
def test_bad_configs_are_refused(tmp_path, change, message):
    ckpt = make_mllama_checkpoint(tmp_path / "ckpt", SPEC)
    _edit_config(ckpt, **change)
    with pytest.raises(Llama3vError, match=message):
        convert(ckpt, tmp_path / "out", "f32", "f32")


def test_quantize_handles_an_mllama_model_and_its_mmproj(built, tmp_path):
    """llama.cpp's quantizer knows the mllama architecture through llama3v's engine patch 0005."""
    from llama3v.cli.quantize import quantize_file

    _, model, mmproj, _ = built
    q = quantize_file(model, "q4_k_m", tmp_path / "m.gguf")
    llm_types = {t.name: t.tensor_type for t in GGUFReader(q).tensors}
    assert gguf_fields(q)["general.architecture"][1] == "mllama"
    assert llm_types["blk.1.cross_attn_attn_gate"] == Q.F32 and llm_types["blk.1.cross_attn_q_norm.weight"] == Q.F32
    out = quantize_file(mmproj, "q8_0", tmp_path / "mm.gguf")
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["v.tile_position_embd.weight"] == Q.F16 and types["v.global.blk.0.attn_gate"] == Q.F32
    assert gguf_fields(out)["clip.projector_type"][1] == "mllama"
