"""Bunny v1.1's multi-scale (S2) tower: converter, PyTorch reference against an independent build of Bunny's
S2 forward on transformers' SigLIP, and libmtmd + the runtime against the reference per mmproj type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from safetensors.numpy import load_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from llama3v.evaluation.parity import NMSE_BOUNDS, generation_parity, nmse, tiles_of
from llama3v.evaluation.scenes import scene
from llama3v.models.llava import LlavaReference
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.s2 import bicubic_matrix, scale_crops
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec, make_checkpoint

# A tiny Bunny v1.1: SigLIP tower of 60 with patches of 14 (4 x 4 patches, the remainder dropped, as 384 / 14 in
# SigLIP-so400m), scales 60/120/180 (1 + 4 + 9 crops, as 384/768/1152), the 120 scale resampled by 2/3 like 768
# of 1152. Widths of 64 let q8_0 really quantize the tower.
SCALES = (60, 120, 180)
SPEC = TinySpec(vision="siglip", vision_hidden=64, vision_heads=2, vision_ff=128, image_size=60, patch_size=14,
                text_hidden=96, text_heads=8, text_kv_heads=4, text_ff=224, s2_scales=SCALES, preprocess_pad=True,
                seed=15, extra={"model_type": "bunny-llama"})
# The 120 crops reach libmtmd rounded to uint8 (it takes uint8 pixels); against Bunny's float path that
# costs this much on the tiny tower (measured 4.2e-6 on the photo-sized drawn scene, 1.9e-5 on the square one
# with hard edges, where bicubic overshoot is also clipped to 0..255; docs/s2.md).
ROUNDING_FLOOR = 1e-4


@pytest.fixture(scope="module")
def bunny(tiny):
    return tiny(SPEC, "original", "f32")


@pytest.fixture(scope="module")
def reference(bunny):
    return LlavaReference.from_checkpoint(bunny.ckpt)


@pytest.fixture(scope="module")
def images(picture, tmp_path_factory):
    square = tmp_path_factory.mktemp("s2") / "square.png"
    scene(5, 180, 180).save(square)
    return {"padded": picture, "square": square}


def test_bicubic_equals_pytorch():
    x = torch.rand(1, 3, 1152, 1152, dtype=torch.float64)
    for size in (384, 768):
        want = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]
        m = bicubic_matrix(1152, size)
        got = m @ x[0].numpy() @ m.T
        np.testing.assert_allclose(got, want.numpy(), atol=1e-12)
    assert np.array_equal(bicubic_matrix(1152, 384), np.eye(1152)[1::3]), "a third: every third pixel, exactly"


def test_converter_writes_the_tower_once_and_the_s2_projector(bunny):
    reader = GGUFReader(bunny.mmproj)
    fields = {k: f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else [f.parts[i].tolist()[0] for i in f.data]
              for k, f in reader.fields.items() if k in ("llama3v.s2.scales", "clip.vision.projection_dim",
                                                        "clip.vision.image_size")}
    assert fields == {"llama3v.s2.scales": list(SCALES), "clip.vision.projection_dim": SPEC.vision_hidden,
                      "clip.vision.image_size": SCALES[0]}
    tensors = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert len({n.split(".")[2] for n in tensors if n.startswith("v.blk.")}) == SPEC.vision_layers - 1
    state = load_file(str(bunny.ckpt / "model.safetensors"))
    np.testing.assert_array_equal(tensors["s2.mm.0.weight"], state["model.mm_projector.0.weight"])
    np.testing.assert_array_equal(tensors["s2.mm.2.bias"], state["model.mm_projector.2.bias"])
    assert tensors["s2.mm.0.weight"].shape == (SPEC.text_hidden, 3 * SPEC.vision_hidden)
    config = json.loads((bunny.ckpt / "config.json").read_text())
    assert config["use_s2"] is True and config["mm_hidden_size"] == 3 * SPEC.vision_hidden


def test_reference_equals_bunny_s2_on_transformers_siglip(bunny, reference, images):
    """Bunny's S2 forward, built here from transformers' SigLIP (hidden_states[-2]) and explicit crop loops."""
    vc = json.loads((bunny.ckpt / "vision_tower" / "config.json").read_text())
    hf = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vc.items() if k != "model_type"})).eval()
    state = load_file(str(bunny.ckpt / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower.vision_model."
    own = {k[len(prefix):]: torch.from_numpy(v) for k, v in state.items() if k.startswith(prefix)}
    missing = hf.load_state_dict(own, strict=False).missing_keys
    assert all(k.startswith(("post_layernorm.", "head.")) for k in missing), missing  # unused by hidden_states[-2]
    g, d = SCALES[0] // SPEC.patch_size, SPEC.vision_hidden
    tiles = tiles_of(list(images.values()), VisionEncoder(bunny.mmproj, check_engine=False))
    with torch.no_grad():
        for tile, ours in zip(tiles, reference.encode_tiles(tiles).reshape(len(tiles), g * g, -1), strict=True):
            x = (torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
            maps = []
            for size in SCALES:
                n = size // SCALES[0]
                xs = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
                merged = torch.zeros(d, n * g, n * g)
                for i in range(n):
                    for j in range(n):
                        crop = xs[:, :, i * SCALES[0]:(i + 1) * SCALES[0], j * SCALES[0]:(j + 1) * SCALES[0]]
                        h = hf(pixel_values=crop, output_hidden_states=True).hidden_states[-2][0]  # [g*g, d]
                        merged[:, i * g:(i + 1) * g, j * g:(j + 1) * g] = h.T.reshape(d, g, g)
                maps.append(F.avg_pool2d(merged[None], n)[0])
            feats = torch.cat(maps).flatten(1).T  # [g*g, 3d], smallest scale's channels first
            w = {k: torch.from_numpy(state[f"model.mm_projector.{k}"]) for k in ("0.weight", "0.bias", "2.weight",
                                                                                  "2.bias")}
            want = F.linear(F.gelu(F.linear(feats, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])
            np.testing.assert_allclose(ours, want.numpy(), atol=2e-5, rtol=1e-4)


def _rounded(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The runtime's resize (uint8, rounded) of normalised [B, 3, S, S] images, normalised again."""
    out = []
    for image in pixels:
        u8 = ((image.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().astype(np.uint8)
        crops = scale_crops(u8, (SCALES[0], size))[-1]
        n = size // SCALES[0]
        out.append(np.concatenate([np.concatenate(crops[i * n:(i + 1) * n], axis=1) for i in range(n)]))
    return (torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_s2_embeddings_within_bounds(tiny, reference, images, outtype):
    built = tiny(SPEC, "original", outtype)
    encoder = VisionEncoder(built.mmproj, n_threads=2, flash_attn=False)
    tiles = tiles_of(list(images.values()), encoder)
    ours = np.stack([encoder.encode(t) for t in tiles])
    same_pixels = reference.encode_tiles(tiles, resize=_rounded).reshape(ours.shape)
    bunny = reference.encode_tiles(tiles).reshape(ours.shape)
    for name, a, b, c in zip(images, ours, same_pixels, bunny, strict=True):
        engine, total = nmse(a, b), nmse(a, c)
        print(f"{outtype} {name}: NMSE vs reference on the same uint8 crops {engine:.2e}, vs Bunny's float "
              f"path {total:.2e} (rounding alone {nmse(b, c):.2e})")
        assert engine < NMSE_BOUNDS[outtype]
        assert total < NMSE_BOUNDS[outtype] + ROUNDING_FLOOR
    assert nmse(ours[0], ours[1]) > 100 * (NMSE_BOUNDS[outtype] + ROUNDING_FLOOR), "the tower depends on the image"


def test_s2_greedy_generation_matches_the_reference(bunny, reference, images):
    with Session(bunny.model, bunny.mmproj, n_ctx=1024, kv_type="f32", flash_attn=False) as session:
        p = generation_parity(reference, session, "Describe the picture.", [images["padded"]], n_steps=16)
    print(f"tokens {p.tokens} min step margin {min(p.margins):.3f} max prompt logit diff {p.max_logit_diff:.2e}")
    assert len(p.tokens) == 16 and p.tokens == p.reference_tokens[:16]
    assert len(set(p.tokens)) >= 6, "generation is not one token repeated"
    assert min(p.margins) > 2 * p.max_logit_diff, "each step's top-1 margin exceeds the numeric error"
    assert p.prompt_top1_agree == p.n_prompt
    assert p.prompt_margin_ratio > 2, "each prompt position's top-1 margin exceeds its numeric error"


def test_bad_s2_configs_are_refused(tmp_path):
    from llama3v.converters.convert import convert
    from llama3v.errors import Llama3vError

    ckpt = make_checkpoint(tmp_path / "ckpt", SPEC, "original")
    config = json.loads((ckpt / "config.json").read_text())
    for scales, match in (("60,100,180", "multiples"), ("120,180", "starting with it")):
        (ckpt / "config.json").write_text(json.dumps({**config, "s2_scales": scales}))
        with pytest.raises(Llama3vError, match=match):
            convert(ckpt, tmp_path / "out", "f32", "f32")
    (ckpt / "config.json").write_text(json.dumps({**config, "mm_hidden_size": SPEC.vision_hidden}))
    with pytest.raises(Llama3vError, match="times 3 scales"):
        convert(ckpt, tmp_path / "out", "f32", "f32")
    assert not (tmp_path / "out").exists()


def test_an_mm0_only_mmproj_is_refused(tmp_path, tiny):
    """The design that would run a linear projector in libmtmd per crop cannot: an mmproj without mm.2 crashes
    libmtmd at load (clip_n_mmproj_embd reads mm.2 unchecked), so the checks refuse it before libmtmd sees it."""
    from gguf import GGUFWriter

    from llama3v.errors import Llama3vError

    source = tiny(TinySpec(vision="siglip"), "hf-5", "f32").mmproj
    reader = GGUFReader(source)
    path = tmp_path / "mm0-only.gguf"
    writer = GGUFWriter(path, "clip")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        if not t.name.startswith("mm.2."):
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Llama3vError, match="tensor mm.2.weight is missing"):
        VisionEncoder(path, check_engine=False)
    VisionEncoder(source, check_engine=False)  # the file it was cut from loads
