"""A real `miaotui serve` process on a free loopback port, driven by the official openai client and raw HTTP:
completions and chat (sync, async, streaming), usage, errors with OpenAI bodies, auth, and a disconnected
stream freeing its KV blocks."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.server.launch import free_port

openai = pytest.importorskip("openai")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(smollm2_path):
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "miaotui.cli", "serve", "--model", str(smollm2_path), "--port", str(port),
         "--api-key", KEY, "--served-model-name", "smollm2", "--max-body-bytes", "200000",
         "--kv-cache-memory", str(64 * 2**20), "--threads", "2", "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, text=True)  # a file: a pipe nobody drains would block the server
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(log.read())
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)


def kv_usage(base: str) -> float:
    return metric(base, "miaotui_kv_cache_usage")


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def test_models(client):
    listed = client.models.list().data
    assert [m.id for m in listed] == ["smollm2"]
    assert abs(listed[0].created - time.time()) < 3600  # when the server started, as a Unix time
    assert client.models.retrieve("smollm2") == listed[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-5")
    assert e.value.code == "model_not_found"


def test_a_suffix_on_a_model_without_fim_tokens_is_refused(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "def f():", "suffix": "\n", "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "fill-in-the-middle" in r.json()["error"]["message"]


def test_chat_and_usage(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the "
                                       "capital of France?"}], temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_streaming_with_usage(client):
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(" 5, 6")
    assert chunks[-1].usage.completion_tokens == 8
    full = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert full.choices[0].text == text and full.choices[0].finish_reason == "length"


def test_chat_streaming_async_n_and_stop(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY)
        stream = await c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count "
                                                 "from 1 to 10."}], max_tokens=30, temperature=0, stream=True)
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
        many = await c.completions.create(model="smollm2", prompt="A color:", max_tokens=5, n=3, temperature=1.0,
                                          seed=7)
        stopped = await c.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                             stop=[" 7"])
        return "".join(parts), many, stopped

    text, many, stopped = asyncio.run(main())
    assert "1" in text
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2]
    assert stopped.choices[0].text == " 5, 6," and stopped.choices[0].finish_reason == "stop"


def test_vllms_stop_controls(client):
    """vLLM's extra parameters: min_tokens holds off the end of turn, stop_token_ids end the answer,
    include_stop_str_in_output keeps the stop string, skip_special_tokens false shows the end-of-turn token."""
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0}
    short = client.chat.completions.create(**ask, max_tokens=64)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 48
    longer = client.chat.completions.create(**ask, max_tokens=64, extra_body={"min_tokens": n + 8})
    assert longer.usage.completion_tokens >= n + 8 and longer.choices[0].message.content.startswith(
        short.choices[0].message.content.rstrip(".!?"))
    shown = client.chat.completions.create(**ask, max_tokens=64, extra_body={"skip_special_tokens": False,
                                                                              "include_stop_str_in_output": True})
    assert shown.choices[0].message.content == short.choices[0].message.content + "<|im_end|>"
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"],
                                       stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == " 5, 6, 7"
    comma = httpx.post(f"{str(client.base_url).removesuffix('/v1/')}/tokenize", json={"prompt": ","},
                       headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    cut = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                    extra_body={"stop_token_ids": comma})
    assert cut.choices[0].text == " 5" and cut.choices[0].finish_reason == "stop"


def test_assistant_messages_as_openai_returns_them_are_taken(server, client):
    """A conversation carried over from OpenAI's API: its assistant messages' null or empty refusal, annotations,
    audio and function_call change nothing; a refusal is what the assistant said; a real audio or function_call is
    refused, naming the field."""
    def prompt_tokens(assistant: dict) -> int:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", **assistant},
                 {"role": "user", "content": "Ok"}]
        return client.chat.completions.create(model="smollm2", messages=turns, max_tokens=1).usage.prompt_tokens

    plain = prompt_tokens({"content": "Hello! How can I help?"})
    assert prompt_tokens({"content": "Hello! How can I help?", "refusal": None, "annotations": [], "audio": None,
                          "function_call": None}) == plain
    assert prompt_tokens({"content": None, "refusal": "Hello! How can I help?"}) == plain
    for field, value in [("audio", {"id": "audio_1"}), ("function_call", {"name": "f", "arguments": "{}"})]:
        r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "smollm2", "messages": [{"role": "assistant", "content": "x", field: value}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"messages.0.{field}"
    # this server's own reply carries the same fields, and goes back as it came (a client pushing the raw JSON)
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    raw = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json=ask).json()["choices"][0]["message"]
    assert raw["refusal"] is None and raw["annotations"] == []
    ask["messages"] += [raw, {"role": "user", "content": "Ok"}]
    assert httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=ask).status_code == 200


def test_logprobs(client):
    """Chat's top_logprobs are the n most likely tokens, best first, the chosen one among them where it is one of
    them (greedy: always, first), streamed or not; none at 0; top_logprobs without logprobs is refused."""
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    r = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens and all(i.logprob <= 0 for i in items)
    for i in items:
        top = i.top_logprobs
        assert len(top) == 2 and top[0].logprob >= top[1].logprob
        assert (top[0].token, top[0].logprob) == (i.token, i.logprob) and top[1].token != i.token
    streamed = [lp for ch in client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
                if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert [(i.token, [t.token for t in i.top_logprobs]) for i in streamed] == \
        [(i.token, [t.token for t in i.top_logprobs]) for i in items]
    r = client.chat.completions.create(**ask, logprobs=True)
    assert all(i.top_logprobs == [] for i in r.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(**ask, top_logprobs=2)


def test_completion_logprobs(client):
    """Legacy completions: each token's text, logprob, top alternatives with the chosen one (n or n + 1 of them) and
    text offset; streamed, each chunk carries its own tokens' logprobs, and they add up to the whole answer's; with
    echo the prompt's tokens come first, scored."""
    ask = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    r = client.completions.create(**ask)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and len(top) in (2, 3) and max(top.values()) == logprob  # greedy
    chunks = [ch.choices[0] for ch in client.completions.create(**ask, stream=True) if ch.choices]
    assert all(c.logprobs is None or "".join(c.logprobs.tokens) == c.text for c in chunks)
    assert sum((c.logprobs.tokens for c in chunks if c.logprobs), []) == lp.tokens
    assert sum((c.logprobs.text_offset for c in chunks if c.logprobs), []) == lp.text_offset
    # echo: the prompt's tokens first, scored under the tokens before them (the first has none), then the answer's
    # (lm-eval's loglikelihood requests ask exactly this, a batch of token-id prompts at a time)
    batch = client.completions.create(**{**ask, "prompt": [[504, 3575, 282], [19556]], "echo": True}).choices
    for echoed, n in ((client.completions.create(**ask, echo=True).choices[0], None), (batch[0], 3), (batch[1], 1)):
        e = echoed.logprobs
        if n is None:  # the answer's part as without echo
            n = len(e.tokens) - len(lp.tokens)
            assert e.tokens[n:] == lp.tokens and e.token_logprobs[n:] == lp.token_logprobs
            assert e.text_offset[n:] == [len(ask["prompt"]) + o for o in lp.text_offset]
        assert e.token_logprobs[0] is None and e.top_logprobs[0] is None and "".join(e.tokens[:n]) in echoed.text
        assert all(v < 0 and top[t] == v for t, v, top in zip(e.tokens[1:n], e.token_logprobs[1:n],
                                                              e.top_logprobs[1:n]))
    streamed = [t for ch in client.completions.create(**ask, echo=True, stream=True) if ch.choices
                and ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    assert streamed == client.completions.create(**ask, echo=True).choices[0].logprobs.token_logprobs


def test_completion_batch_of_prompts(server, client):
    """A list of prompts (texts or token lists) is a batch: prompt j's n samples are choices j * n ..., each the
    text that prompt gets alone (greedy), streamed or not, usage summed over the batch; a bad prompt in it is a 400
    naming it."""
    prompts = ["The capital of France is", "1, 2, 3,", "def add(a, b):"]
    ask = {"model": "smollm2", "max_tokens": 5, "temperature": 0}
    alone = [client.completions.create(**ask, prompt=p) for p in prompts]
    r = client.completions.create(**ask, prompt=prompts, n=2)
    assert [(c.index, c.text) for c in r.choices] == [(2 * j + i, a.choices[0].text) for j, a in enumerate(alone)
                                                      for i in range(2)]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    texts: dict[int, str] = {}
    for ch in client.completions.create(**ask, prompt=prompts, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {j: a.choices[0].text for j, a in enumerate(alone)}
    ids = httpx.post(f"{server}/tokenize", json={"prompt": prompts[0]},
                     headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    r = client.completions.create(**ask, prompt=[ids, ids])
    assert [c.text for c in r.choices] == [alone[0].choices[0].text] * 2
    with pytest.raises(openai.BadRequestError, match="prompt 1 is empty"):
        client.completions.create(**ask, prompt=["a", ""])


def test_tokenize_roundtrip(server):
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "Hello 你好"}, headers=h).json()["tokens"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}, headers=h).json()["prompt"] == "Hello 你好"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "smollm2", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "smollm2", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "smollm2", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": "smollm2", "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": "smollm2", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "smollm2", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": "smollm2", "prompt": "hi", "stop_token_ids": [2, 10**6]}, 400, "stop_token_ids"),
    ({"model": "smollm2", "prompt": "x" * 300000}, 413, None),
])
def test_bad_requests_then_a_good_one(server, client, body, status, param):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/completions", headers=h,
                   **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    if body == {"model": "smollm2", "prompt": "hi", "max_tokens": 100000}:
        assert "8192" in err["message"] and "100000" in err["message"]
    assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_unknown_role(server):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("prompt", ["Tell me a long story about a dragon.",
                                    ["Tell me a long story about a dragon.", "Once upon a time", "Dear diary,"]])
def test_disconnect_frees_kv(server, prompt):
    """A client that goes away mid-stream frees its requests' KV cache: one prompt's, or a batch's (every run),
    their generation stopped, not run to its end (each would count 400 tokens)."""
    h = {"Authorization": f"Bearer {KEY}"}
    generated = metric(server, "miaotui_generation_tokens_total")
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=h, timeout=60) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
        assert kv_usage(server) > 0
    deadline = time.monotonic() + 10
    while kv_usage(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv_usage(server) == 0
    assert metric(server, "miaotui_generation_tokens_total") - generated < 400


def test_load_streams_all_complete_and_free_everything(server):
    from miaotui.bench.serve_bench import run_load

    res = asyncio.run(run_load(server, "smollm2", requests=40, concurrency=16, max_tokens=8, api_key=KEY,
                               timeout=300))
    assert res.errors == [] and res.ok == 40 and res.tokens == 40 * 8
    assert kv_usage(server) == 0
    text = httpx.get(f"{server}/metrics").text
    assert re.search(r"^miaotui_requests_running 0", text, re.M)
