"""The PyTorch reference (llama3v.models) against Hugging Face transformers, the oracle.

Each case builds a tiny random LlavaForConditionalGeneration, saves it, loads it back through
`LlavaReference.from_checkpoint` (so through `load_llava`), and compares logits on a prompt holding two
drawn scenes. Bound (docs/fidelity.md): max abs diff < 1e-4 on float32 logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference needs the optional torch extra")
transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")

from llama3v.hf.config import TextConfig  # noqa: E402
from llama3v.models.llama import rope_inv_freq  # noqa: E402
from llama3v.models.llava import LlavaReference  # noqa: E402

TOL = 1e-4  # docs/fidelity.md: reference vs HF transformers, max abs diff on logits (F32)
VOCAB = 100
IMAGE_TOKEN = VOCAB - 1
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# Widths are deliberately not powers of two; vision intermediate != hidden (libmtmd misreads equal ones).
CASES = {
    "clip-1blk-last-tied": dict(tower="clip", act="quick_gelu", layers=1, feature_layer=-1, tie="text"),
    "clip-3blk-penult-untied-gelu": dict(tower="clip", act="gelu", layers=3, feature_layer=-2, tie=None),
    "clip-3blk-penult-llama3rope": dict(tower="clip", act="quick_gelu", layers=3, feature_layer=-2, tie=None,
                                        rope=LLAMA3_ROPE),
    "clip-2blk-tied-on-llava-config": dict(tower="clip", act="gelu_new", layers=2, feature_layer=-1, tie="top"),
    "siglip-1blk-last-tied": dict(tower="siglip", act="gelu_pytorch_tanh", layers=1, feature_layer=-1, tie="text"),
    "siglip-3blk-penult-untied-llama3rope": dict(tower="siglip", act="gelu_pytorch_tanh", layers=3, feature_layer=-2,
                                                 tie=None, rope=LLAMA3_ROPE),
}


def _hf_config(tower: str, act: str, layers: int, feature_layer: int, tie: str | None,
               rope: dict | None = None) -> transformers.LlavaConfig:
    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=3, hidden_act=act)
    if tower == "clip":
        vision = transformers.CLIPVisionConfig(image_size=56, patch_size=14, **common)
    else:
        vision = transformers.SiglipVisionConfig(image_size=64, patch_size=8, **common)
    text = transformers.LlamaConfig(
        hidden_size=72, intermediate_size=120, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie == "text",
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 500.0})
    # SigLIP has no class token: "full" keeps every patch, which is what libmtmd computes
    # ("default" would make HF drop the first patch).
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default" if tower == "clip" else "full", tie_word_embeddings=tie is not None)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at a scale that gives O(1) activations and logits spread over several units."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * 1.5 / math.sqrt(p[0].numel()))


def _scene(size: int, variant: int) -> np.ndarray:
    """A drawn RGB scene: a colour gradient, two rectangles and a disc whose places depend on `variant`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    img = np.stack([200 * x + 30, 180 * y + 40, 220 * (1 - x * y)], axis=-1)
    rng = np.random.default_rng(variant)
    for color in ((230, 40, 40), (40, 60, 220)):
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 6, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = color
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    img[(np.arange(size)[:, None] - cy) ** 2 + (np.arange(size)[None, :] - cx) ** 2 < (size // 6) ** 2] = (250, 220, 30)
    return img.clip(0, 255).astype(np.uint8)


def _normalize(tiles: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """HF's rescale + normalize, written independently of the reference: [N,H,W,3] uint8 -> [N,3,H,W]."""
    x = (tiles.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _prompt(n_patches: int, n_images: int, seed: int) -> list[int | None]:
    """Text, then each image's patch positions (None) followed by more text."""
    rng = np.random.default_rng(seed)
    out: list[int | None] = [1, *rng.integers(2, IMAGE_TOKEN, 5).tolist()]
    for _ in range(n_images):
        out += [None] * n_patches + rng.integers(2, IMAGE_TOKEN, 7).tolist()
    return out


def _hf_logits(model, prompt: list[int | None], pixel_values: torch.Tensor) -> np.ndarray:
    ids = torch.tensor([[IMAGE_TOKEN if t is None else t for t in prompt]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits[0].numpy()


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    """(HF model, reference loaded from its saved checkpoint, case spec) for one shape."""
    spec = CASES[request.param]
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(_hf_config(**spec)).eval()
    _randomize(model, seed=sorted(CASES).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ref = LlavaReference.from_checkpoint(path)
    return model, ref, spec


def test_logits_match_transformers(case):
    model, ref, spec = case
    cfg = ref.config
    size, n_patches = cfg.vision.image_size, cfg.vision.n_patches
    tiles = np.stack([_scene(size, 0), _scene(size, 1)])
    prompt = _prompt(n_patches, len(tiles), seed=3)
    if "rope" in spec:  # the scaled frequencies only matter past the original context
        assert len(prompt) > spec["rope"]["original_max_position_embeddings"] + 8

    rows = ref.encode_tiles(tiles)
    assert rows.shape == (len(tiles) * n_patches, cfg.text.hidden_size) and rows.dtype == np.float32
    got = ref.logits(prompt, rows)
    want = _hf_logits(model, prompt, _normalize(tiles, cfg.image_mean, cfg.image_std))
    assert got.shape == want.shape == (len(prompt), VOCAB)
    assert want.std() > 1.0, "logits too flat for the comparison to mean anything"
    diff = float(np.abs(got - want).max())
    print(f"max abs logits diff {diff:.3g}")
    assert diff < TOL


def test_embeddings_depend_on_the_image(case):
    _, ref, _ = case
    size = ref.config.vision.image_size
    a, b = ref.encode_tiles(_scene(size, 0)[None]), ref.encode_tiles(_scene(size, 1)[None])
    noise = ref.encode_tiles(np.random.default_rng(7).integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    assert np.abs(a - b).max() > 1000 * TOL
    assert np.abs(a - noise).max() > 1000 * TOL
    # ... and the image reaches the logits after it.
    prompt = _prompt(ref.config.vision.n_patches, 1, seed=4)
    assert np.abs(ref.logits(prompt, a)[-1] - ref.logits(prompt, b)[-1]).max() > 1000 * TOL


def test_greedy_matches_transformers(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(
        _hf_config("clip", "quick_gelu", layers=2, feature_layer=-2, tie=None)).eval()
    _randomize(model, seed=11)
    model.save_pretrained(tmp_path)
    ref = LlavaReference.from_checkpoint(tmp_path)
    cfg = ref.config
    tiles = _scene(cfg.vision.image_size, 2)[None]
    prompt = _prompt(cfg.vision.n_patches, 1, seed=5)
    tokens, margins = ref.greedy(prompt, ref.encode_tiles(tiles), n_steps=8)

    pixel_values = _normalize(tiles, cfg.image_mean, cfg.image_std)
    hf_tokens, seq = [], list(prompt)
    for _ in range(8):
        hf_tokens.append(int(np.argmax(_hf_logits(model, seq, pixel_values)[-1])))
        seq.append(hf_tokens[-1])
    assert tokens == hf_tokens
    assert len(set(tokens)) > 2, f"degenerate continuation {tokens}"
    assert min(margins) > 10 * TOL, f"near tie in {margins}"


def test_logits_reject_mismatched_media_rows(case):
    _, ref, _ = case
    rows = ref.encode_tiles(_scene(ref.config.vision.image_size, 0)[None])
    prompt = _prompt(ref.config.vision.n_patches, 1, seed=6)
    with pytest.raises(ValueError, match="media"):
        ref.logits(prompt, rows[:-1])
    with pytest.raises(ValueError, match="media"):
        ref.logits(prompt + [None], rows)
    assert ref.logits(prompt, rows).shape == (len(prompt), VOCAB)  # the valid input still works


def test_llama3_rope_frequencies_equal_transformers():
    hf = transformers.LlamaConfig(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                                  rope_parameters=dict(LLAMA3_ROPE))
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf).inv_freq
    cfg = TextConfig.from_dict(hf.to_dict())
    got = rope_inv_freq(cfg)
    assert torch.equal(got, want)
    # All three bands are exercised: kept, blended and divided by the factor.
    plain = rope_inv_freq(TextConfig.from_dict({**hf.to_dict(), "rope_parameters": {"rope_theta": 100.0}}))
    ratio = (plain / got).tolist()
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(8.0) and any(1.0 < r < 8.0 for r in ratio)
