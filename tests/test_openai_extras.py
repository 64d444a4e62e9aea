"""The OpenAI API beyond plain chat: logprobs, JSON output, refusals, the developer role, unknown routes,
max_tokens against the context, /v1/completions: the real `openai` client against a live `llama3v serve`."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from llama3v.runtime.logprobs import log_softmax
from llama3v.runtime.session import Session
from llama3v.testing.factory import TinySpec

SPEC = TinySpec(seed=2)
N_CTX = 256
# Bounded values only (an enum, a boolean, an integer): a random model's JSON must close within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count", "moving"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"},
                         "moving": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def built(tiny):
    return tiny(SPEC, "hf-5", "f32")


@pytest.fixture(scope="module")
def server(built, running_server):
    with running_server(built, "--n-ctx", str(N_CTX)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(built):
    with Session(built.model, n_ctx=N_CTX) as session:
        yield session


def _ask(client, content: str = "Say hello.", **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def test_logprobs_are_the_log_softmax_of_the_logits(client, local):
    r = _ask(client, max_tokens=10, logprobs=True, top_logprobs=3)
    tokens = r.model_extra["llama3v"]["tokens"]
    assert len(tokens) == 10 and len(set(tokens)) > 2, "a varied continuation, not one token repeated"
    expected = log_softmax(local.score("Say hello.", tokens))  # row i predicts tokens[i]
    content = r.choices[0].logprobs.content
    assert len(content) == len(tokens)
    for i, (entry, tok) in enumerate(zip(content, tokens, strict=True)):
        assert entry.logprob == pytest.approx(expected[i, tok], abs=1e-3)
        piece = local.model.piece(tok)
        assert entry.bytes == list(piece) and entry.token == piece.decode("utf-8", "replace")
        best = np.argsort(-expected[i])[:3]
        assert tok == best[0], "greedy picks the most likely token"
        assert [t.bytes for t in entry.top_logprobs] == [list(local.model.piece(int(b))) for b in best]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected[i, best], abs=1e-3)
    assert min(e.logprob for e in content) < -0.01, "not a degenerate one-hot distribution"
    streamed = _ask(client, max_tokens=10, logprobs=True, top_logprobs=3, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert _ask(client, max_tokens=2).choices[0].logprobs is None


def test_json_schema_constrains_the_answer(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}
    r = _ask(client, "Describe the scene as JSON.", max_tokens=120, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"colour", "count", "moving"}
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["moving"], bool)
    assert isinstance(value["count"], int) and not isinstance(value["count"], bool)
    free = _ask(client, "Describe the scene as JSON.", max_tokens=40).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)  # the same request unconstrained: the grammar is what made it JSON


def test_json_object(client, local):
    # A random model writes endless strings; favouring `"` and `}` lets it close them, and only the grammar
    # turns those favoured tokens into JSON.
    (quote,), (close,) = local.model.tokenize('"'), local.model.tokenize("}")
    bias = {str(quote): 10, str(close): 5}
    r = _ask(client, "Answer in JSON.", max_tokens=100, response_format={"type": "json_object"}, logit_bias=bias)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    free = _ask(client, "Answer in JSON.", max_tokens=20, logit_bias=bias).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)


@pytest.mark.parametrize("kw,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer",
                                                                                        "minimum": 3}}}},
     "minimum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "frobnicate"}}}},
     "cannot be expressed"),
    ({"response_format": {"type": "xml"}}, "unsupported response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
     "tools"),
    ({"max_tokens": 5000}, "does not fit"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_refused_with_a_clear_400(client, kw, words):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, **kw)
    assert e.value.status_code == 400 and words in e.value.body["message"]


def test_developer_role_is_the_system_message(client):
    def answer(role: str | None):
        messages = ([{"role": role, "content": "You answer in riddles."}] if role else []) + \
            [{"role": "user", "content": "Hi"}]
        return client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8)

    developer, system, none = answer("developer"), answer("system"), answer(None)
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens > none.usage.prompt_tokens


def test_unknown_routes_answer_openai_errors(server):
    r = httpx.get(f"{server}/v1/engines")
    assert r.status_code == 404 and r.json()["error"]["message"] == "unknown route: GET /v1/engines"
    r = httpx.post(f"{server}/v1/models", json={})
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert "detail" not in r.json()


def test_without_max_tokens_the_answer_ends_with_the_context(client):
    # End-of-turn tokens banned: only the context's end stops this answer (the server's default is 512 tokens).
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Go on forever."}],
                                       temperature=0, logit_bias={"460": -100, "457": -100})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == N_CTX


def test_text_completions(client, local):
    r = client.completions.create(model="m", prompt="The colour of the sky is", max_tokens=8, temperature=0,
                                  logprobs=2)
    local.reset()
    expected = local.complete("The colour of the sky is", max_tokens=8, temperature=0).wait()
    assert r.object == "text_completion" and r.choices[0].text == expected.text and len(expected.tokens) == 8
    assert r.model_extra["llama3v"]["tokens"] == expected.tokens
    assert r.usage.prompt_tokens == expected.n_prompt_tokens
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    streamed = client.completions.create(model="m", prompt="The colour of the sky is", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=[1, 2, 3], max_tokens=2)


def test_frequency_and_presence_penalties(client, local):
    kw = {"max_tokens": 40, "logit_bias": {"460": -100, "457": -100}}  # no end of turn: a long answer
    plain = _ask(client, "Go on forever.", **kw).model_extra["llama3v"]["tokens"]
    tokens = _ask(client, "Go on forever.", frequency_penalty=1.5, presence_penalty=0.5,
                  **kw).model_extra["llama3v"]["tokens"]
    assert len(set(plain)) < len(plain) and tokens != plain, "greedy repeats itself; the penalties change that"
    logits = local.score("Go on forever.", tokens)
    counts, overruled = np.zeros(logits.shape[1]), 0
    for i, tok in enumerate(tokens):  # OpenAI's rule over the tokens generated so far
        raw = logits[i].copy()
        raw[[460, 457]] -= 100
        adjusted = raw - 1.5 * counts - 0.5 * (counts > 0)
        assert adjusted[tok] >= adjusted.max() - 1e-3, "the greedy pick under the penalties (to float error)"
        overruled += raw[tok] < raw.max() - 1e-2
        counts[tok] += 1
    assert overruled >= 1, "the penalties overruled the model's first choice"


def test_the_llama_cpp_python_chat_handler_takes_the_same_options(built):
    from llama_cpp import Llama

    from llama3v.errors import Llama3vError
    from llama3v.runtime.chat_handler import Llama3vChatHandler

    llm = Llama(model_path=str(built.model), n_ctx=N_CTX, verbose=False,
                chat_handler=Llama3vChatHandler(str(built.mmproj)))
    messages = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "Say hello."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
    r = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=120, response_format=fmt)
    assert set(json.loads(r["choices"][0]["message"]["content"])) == {"colour", "count", "moving"}
    r = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 6 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"]) for e in content), "greedy: the top one"
    streamed = [c["choices"][0]["logprobs"] for c in llm.create_chat_completion(
        messages=messages, temperature=0, max_tokens=6, logprobs=True, stream=True)]
    assert [e["logprob"] for lp in streamed if lp for e in lp["content"]] == \
        pytest.approx([e["logprob"] for e in content], abs=1e-6)
    with pytest.raises(Llama3vError, match="tools"):
        llm.create_chat_completion(messages=messages, tools=[{"type": "function", "function": {"name": "f"}}])
