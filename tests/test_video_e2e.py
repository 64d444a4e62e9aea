"""Video through libmtmd and libllama, held to the PyTorch reference: sampling, budget, prompt, generation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llama3v.evaluation.parity import NMSE_BOUNDS, generation_parity, nmse, reference_video_rows
from llama3v.models.llava import LlavaReference
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.media import EncodeCache, Rows, sample_video, video_parts
from llama3v.runtime.session import Session
from llama3v.runtime.video import Sampling, VideoReader
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)
FULL = 16 * 16  # 16 frames of a 4 x 4 grid


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


@pytest.fixture(scope="module")
def reference(built):
    return LlavaReference.from_checkpoint(built.ckpt)


@pytest.mark.parametrize("budget,pooled,pruned", [(None, False, False), (FULL, False, False), (FULL - 1, True, False),
                                                  (40, True, True)])
def test_rows_follow_the_reference(built, reference, motion_video, budget, pooled, pruned):
    encoder = VisionEncoder(built.mmproj, flash_attn=False)
    video = sample_video(motion_video, 0, encoder, Sampling(frames=16))
    with VideoReader(motion_video) as reader:
        assert video.frames == reader.indices(Sampling(frames=16))
    parts = video_parts(video, encoder, EncodeCache(), budget)
    blocks = [p for p in parts if isinstance(p, Rows)]
    ours = np.concatenate([b.data() for b in blocks])
    indices, ref = reference_video_rows(reference, encoder, str(motion_video), Sampling(frames=16), budget)
    assert indices == video.frames, "the reference samples the same frames"
    assert ours.shape == ref.shape and nmse(ours, ref) < NMSE_BOUNDS["f32"]
    info = blocks[0].info
    assert info.pooled == pooled and (info.threshold > 0) == pruned
    assert len(ours) <= (budget or FULL)
    texts = [p for p in parts if isinstance(p, str)]
    assert len(texts) == len(blocks) and texts[0] == "<t=0.0s>"


def test_static_segment_loses_tokens_moving_part_keeps_them(built, motion_video):
    encoder = VisionEncoder(built.mmproj)
    video = sample_video(motion_video, 0, encoder, Sampling(frames=16))
    parts = video_parts(video, encoder, EncodeCache(), 40)
    kept = {b.frame: b.n for b in parts if isinstance(b, Rows)}
    moving = [n for f, n in kept.items() if 0 < f < 15]
    still = [kept.get(f, 0) for f in video.frames if f > 16]
    assert kept[0] == 4, "the first frame is always whole (pooled 2 x 2)"
    assert min(moving) >= 1 and sum(still) < sum(moving)
    assert sum(kept.values()) <= 40


def test_generous_budget_changes_nothing(built, motion_video):
    with Session(built.model, built.mmproj, n_ctx=2048) as s:
        result = s.generate("What happens?", videos=[motion_video], temperature=0, max_tokens=2).wait()
    (info,) = result.media
    assert info.rows == FULL and not info.pooled and info.frames_kept == 16
    assert result.prompt_tokens.count(None) == FULL


def test_default_budget_fits_the_context(built, motion_video):
    with Session(built.model, built.mmproj, n_ctx=256, video_sampling=Sampling(frames=16)) as s:
        result = s.generate("What happens?", videos=[motion_video], temperature=0, max_tokens=32).wait()
    (info,) = result.media
    assert info.rows < FULL and info.pooled
    assert result.n_prompt_tokens + 32 <= 256


def test_greedy_generation_with_a_video_matches_the_reference(tiny, motion_video):
    built = tiny(TinySpec(seed=4))  # seed: margins over the numeric error (as in test_parity)
    reference = LlavaReference.from_checkpoint(built.ckpt)
    with Session(built.model, built.mmproj, n_ctx=2048, kv_type="f32", flash_attn=False,
                 max_video_tokens=60) as s:
        p = generation_parity(reference, s, "What happens in the video?", [], 16, videos=[str(motion_video)])
    assert 0 < p.n_prompt - 60 < 200, "60 video rows (pooled and pruned) plus text and timestamps"
    print(f"tokens {p.tokens} margin {min(p.margins):.3f} diff {p.max_logit_diff:.2e} ratio {p.prompt_margin_ratio}")
    assert len(p.tokens) == 16 and p.tokens == p.reference_tokens[:16]
    assert len(set(p.tokens)) >= 6
    assert min(p.margins) > 2 * p.max_logit_diff
    assert p.prompt_top1_agree == p.n_prompt and p.prompt_margin_ratio > 2


def test_embed_video_sidecar(built, motion_video, tmp_path):
    out = tmp_path / "v.npy"
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "embed", "--mmproj", str(built.mmproj), "--video",
                        str(motion_video), "--max-video-tokens", "40", "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows, doc = np.load(out), json.loads(out.with_suffix(".json").read_text())
    blocks = [p for p in doc["parts"] if p["type"] == "rows"]
    texts = [p["text"] for p in doc["parts"] if p["type"] == "text"]
    assert sum(b["n_rows"] for b in blocks) == len(rows) == doc["n_rows"] <= 40
    assert [b["first_row"] for b in blocks] == list(np.cumsum([0] + [b["n_rows"] for b in blocks[:-1]]))
    assert texts == [f"<t={b['timestamp']:.1f}s>" for b in blocks]
    assert doc["media"][0]["frames_kept"] == len(blocks) and doc["media"][0]["n_frames"] == 16


@pytest.mark.parametrize("content", [b"", b"not a video at all", None])
def test_bad_video_through_the_cli(built, motion_video, tmp_path, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content if content is not None else motion_video.read_bytes()[:2000])
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "run", "--model", str(built.model), "--mmproj",
                        str(built.mmproj), "--video", str(bad), "-p", "hi", "-n", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "bad.mp4" in r.stderr, r.stderr
