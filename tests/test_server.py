"""Serving: the real `openai` client against a live `llama3v serve`, the llama-cpp-python chat handler, the chat CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pexpect
import pytest

from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)
KEY = "test-key"


def _run_cli(built, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "llama3v.cli", "run", "--model", str(built.model), "--mmproj",
                        str(built.mmproj), "--json", "--temp", "0", "--seed", "1", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, picture, motion_video) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "picture.png").write_bytes(picture.read_bytes())
    (root / "motion.mp4").write_bytes(motion_video.read_bytes())
    (tmp_path_factory.mktemp("private") / "secret.png").write_bytes(picture.read_bytes())
    return root


@pytest.fixture(scope="module")
def server(built, media_root, running_server):
    with running_server(built, "--api-key", KEY, "--allowed-root", str(media_root), "--max-body-mb", "2",
                        "--n-ctx", "8192") as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["model-f32"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["busy"] is False


def test_text_turn_equals_run(built, client):
    r = client.chat.completions.create(model="model-f32", messages=[{"role": "user", "content": "Say hello."}],
                                       temperature=0, seed=1, max_tokens=12)
    cli = _run_cli(built, "-p", "Say hello.", "-n", "12")
    assert r.choices[0].message.content == cli["text"]
    assert r.usage.prompt_tokens == cli["n_prompt_tokens"] and r.usage.completion_tokens == len(cli["tokens"])


def test_image_turn_equals_run(built, client, picture):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(picture)}},
                                             {"type": "text", "text": "What is in the image?"}]}]
    r = client.chat.completions.create(model="model-f32", messages=messages, temperature=0, seed=1, max_tokens=12)
    cli = _run_cli(built, "--image", str(picture), "-p", "What is in the image?", "-n", "12")
    assert r.choices[0].message.content == cli["text"] and len(cli["tokens"]) > 3
    assert r.usage.prompt_tokens == cli["n_prompt_tokens"]


def test_streamed_turn_equals_run(built, client, media_root):
    path = str(media_root / "picture.png")
    stream = client.chat.completions.create(
        model="model-f32", stream=True, temperature=0, seed=1, max_tokens=12, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}},
                                               {"type": "text", "text": "Describe it."}]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    cli = _run_cli(built, "--image", str(media_root / "picture.png"), "-p", "Describe it.", "-n", "12")
    assert text == cli["text"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "really streamed"
    assert chunks[-1].usage.completion_tokens == len(cli["tokens"])


@pytest.mark.parametrize("as_data_uri", [False, True])
def test_video_turn_equals_run(built, client, media_root, as_data_uri):
    path = media_root / "motion.mp4"
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode() if as_data_uri else str(path)
    r = client.chat.completions.create(
        model="model-f32", temperature=0, seed=1, max_tokens=12,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                               {"type": "text", "text": "What happens?"}]}])
    cli = _run_cli(built, "--video", str(path), "-p", "What happens?", "-n", "12", "--n-ctx", "8192")
    assert r.choices[0].message.content == cli["text"]
    assert r.usage.prompt_tokens == cli["n_prompt_tokens"] > 16 * 16


def test_eight_concurrent_requests(client):
    prompts = [f"Question number {i}: what do you see?" for i in range(8)]

    def ask(p: str) -> str:
        return client.chat.completions.create(model="model-f32", messages=[{"role": "user", "content": p}],
                                              temperature=0, seed=1, max_tokens=10).choices[0].message.content

    sequential = [ask(p) for p in prompts]
    answers: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(prompts[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [answers.get(i) for i in range(8)] == sequential
    assert len(set(sequential)) > 1


def test_disconnected_stream_frees_the_model(server, client):
    before = httpx.get(f"{server}/health").json()["cancelled"]
    # end-of-turn tokens banned: this generation would run for thousands of tokens
    body = {"model": "m", "stream": True, "temperature": 0, "max_tokens": 7000,
            "logit_bias": {"460": -100, "457": -100}, "messages": [{"role": "user", "content": "Go on forever."}]}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{server}/v1/chat/completions", json=body,
                                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        next(lines)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        health = httpx.get(f"{server}/health").json()
        if not health["busy"] and health["cancelled"] > before:
            break
        time.sleep(0.05)
    assert health["cancelled"] == before + 1 and not health["busy"]
    quick = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert quick.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("content,status", [
    ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}], 403),
    ([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}], 403),
    ([{"type": "image_url", "image_url": {"url": "MEDIA/../private/secret.png"}}], 403),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!not-base64"}}], 400),
    ([{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}], 400),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}], 400),
    ([{"type": "audio", "audio": "x"}], 400),
])
def test_refused_requests(server, client, media_root, content, status):
    for part in content:
        if part.get("image_url"):
            part["image_url"]["url"] = part["image_url"]["url"].replace("MEDIA", str(media_root))
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok?"}], max_tokens=1)


def test_oversized_body_missing_key_and_bad_json(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"messages": [{"role": "user", "content": "x" * (3 << 20)}]}
    assert httpx.post(f"{server}/v1/chat/completions", json=big, headers=auth).status_code == 413
    assert httpx.post(f"{server}/v1/chat/completions", json={"messages": []}).status_code == 401
    as_json = {**auth, "Content-Type": "application/json"}
    assert httpx.post(f"{server}/v1/chat/completions", content=b"{nope", headers=as_json).status_code == 400
    assert httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, headers=auth).status_code == 400
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_llama_cpp_python_chat_handler_equals_run(built, picture):
    from llama_cpp import Llama

    from llama3v.runtime.chat_handler import Llama3vChatHandler

    llm = Llama(model_path=str(built.model), n_ctx=2048, verbose=False,
                chat_handler=Llama3vChatHandler(str(built.mmproj)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(picture)}},
                                             {"type": "text", "text": "What is in the image?"}]}]
    r = llm.create_chat_completion(messages=messages, temperature=0, seed=1, max_tokens=12)
    cli = _run_cli(built, "--image", str(picture), "-p", "What is in the image?", "-n", "12")
    assert r["choices"][0]["message"]["content"] == cli["text"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in
                       llm.create_chat_completion(messages=messages, temperature=0, max_tokens=12, stream=True))
    assert streamed == cli["text"]
    follow = messages + [{"role": "assistant", "content": cli["text"]}, {"role": "user", "content": "More?"}]
    llm.create_chat_completion(messages=follow, temperature=0, max_tokens=4)
    session = llm.chat_handler.session(llm)
    assert session.encoder.n_encodes == 1, "one encode across three calls: the handler keeps its caches"


def test_chat_cli_in_a_terminal(built, picture):
    child = pexpect.spawn(sys.executable, ["-m", "llama3v.cli", "chat", "--model", str(built.model), "--mmproj",
                                           str(built.mmproj), "--temp", "0", "-n", "8", "-v"],
                          encoding="utf-8", timeout=60)
    try:
        child.expect("> ")
        child.sendline(f"/image {picture}")
        child.expect("image attached")
        child.expect("> ")
        child.sendline("What is in the image?")
        child.expect(r"\[(\d+) prompt positions, (\d+) reused, (\d+) tile encodes")
        assert child.match.group(3) == "1"
        child.expect("> ")
        child.sendline("And what colours?")
        child.expect(r"\[(\d+) prompt positions, (\d+) reused, (\d+) tile encodes")
        assert child.match.group(3) == "0", "the second turn does not encode the image again"
        assert int(child.match.group(2)) > 16, "and reuses the first turn's KV cache"
        child.expect("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
