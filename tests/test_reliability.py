"""Reliability: a killed converter leaves the destination intact, memory stays flat, the server sheds load."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import load_image, prepare_tile
from llama3v.testing.factory import TinySpec, make_checkpoint

SPEC = TinySpec(seed=2)


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_kill_9_mid_write_leaves_the_old_file(tmp_path):
    # big enough that writing takes a while: ~120 MB of f32 weights
    ckpt = make_checkpoint(tmp_path / "ckpt", TinySpec(text_hidden=512, text_heads=8, text_kv_heads=4,
                                                       text_layers=8, text_ff=2048), "hf-5")
    out = tmp_path / "out"
    out.mkdir()
    old = b"the previous model file"
    (out / "model-f32.gguf").write_bytes(old)
    proc = subprocess.Popen([sys.executable, "-m", "llama3v.cli", "convert", str(ckpt), "-o", str(out), "--outtype",
                             "f32", "--force", "-q"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # the model is written into the staging folder (converters/convert.py), under a temporary name there too
    while not list(out.glob(".llama3v-convert.*.partial/.model-f32.gguf.*.partial")) and \
            time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "conversion ended before it could be killed mid-write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "model-f32.gguf").read_bytes() == old, "the destination still holds the old file"
    assert list(out.glob(".*.partial")), "(the killed process's temporary file is hidden, not at the destination)"
    subprocess.run([sys.executable, "-m", "llama3v.cli", "convert", str(ckpt), "-o", str(out), "--outtype", "f32",
                    "--force", "-q"], check=True, capture_output=True, timeout=300)
    assert not list(out.glob(".*.partial")), "the next conversion removes what the killed one left"
    assert (out / "model-f32.gguf").read_bytes()[:4] == b"GGUF"


def test_encoding_the_same_image_200_times_keeps_memory_flat(tiny, picture):
    encoder = VisionEncoder(tiny(SPEC).mmproj)
    tile = prepare_tile(load_image(picture), encoder.spec)
    for _ in range(20):
        encoder.encode(tile)
    warm = _rss_kib()
    for _ in range(200):
        encoder.encode(tile)
    assert _rss_kib() < warm * 1.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tiny):
    procs = []

    def start(*extra: str) -> tuple[str, subprocess.Popen]:
        built = tiny(SPEC)
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "llama3v.cli", "serve", "--model", str(built.model),
                                 "--mmproj", str(built.mmproj), "--port", str(port), "-q", "--n-ctx", "8192", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(f"{base}/health", timeout=1)
                return base, proc
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("server did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=20)


def test_serving_200_requests_keeps_memory_flat(serve, picture):
    base, proc = serve()
    uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "What is it?"}]}], "max_tokens": 4}
    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            assert client.post(f"{base}/v1/chat/completions", json=body).status_code == 200
        warm = _rss_kib(proc.pid)
        for _ in range(200):
            assert client.post(f"{base}/v1/chat/completions", json=body).status_code == 200
    assert _rss_kib(proc.pid) < warm * 1.05


def test_full_queue_answers_503_and_recovers(serve):
    base, _ = serve("--max-queue", "1")
    long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1500, "temperature": 0,
            "logit_bias": {"460": -100, "457": -100}}
    statuses: list[int] = []

    def post() -> None:
        statuses.append(httpx.post(f"{base}/v1/chat/completions", json=long, timeout=120).status_code)

    first = threading.Thread(target=post)
    first.start()
    while not httpx.get(f"{base}/health").json()["busy"]:
        time.sleep(0.01)
    second = threading.Thread(target=post)
    second.start()
    while httpx.get(f"{base}/health").json()["queued"] < 1:
        time.sleep(0.01)
    third = httpx.post(f"{base}/v1/chat/completions", json=long, timeout=30)
    assert third.status_code == 503 and "busy" in third.json()["error"]["message"]
    first.join()
    second.join()
    assert statuses == [200, 200]
    assert httpx.get(f"{base}/health").json()["rejected"] == 1


def test_slow_client_is_dropped(serve):
    base, _ = serve("--body-timeout", "1")
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\":")
        t0 = time.monotonic()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
