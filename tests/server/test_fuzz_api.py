"""Hypothesis-generated requests against a real `miaotui serve`: every endpoint, with the request models' fields
given values of every JSON type (wrong types, extreme numbers, huge and empty strings, unicode edge cases, nested
garbage) beside plausible ones, plus unknown fields and non-JSON bodies. Property: every answer is 2xx, or 4xx
with an OpenAI error body — never a 5xx, never a hang — and the server still serves a good request afterwards.

A bounded run in the suite; the long one: `MIAOTUI_FUZZ_EXAMPLES=2000 python -m pytest tests/server/test_fuzz_api.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from tests.server.launch import free_port, wait_healthy

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("MIAOTUI_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "\x00", "\ud7ff\ufffd", "é" * 50, "<|im_end|>",
                                                        "{{ raise('x') }}", "\u202e\u200b", "x" * 5000]))
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
                                 "content": st.one_of(TEXT, JSON)})
PLAUSIBLE = {
    "prompt": st.one_of(TEXT, st.lists(st.integers(-5, 60000), max_size=8)),
    "messages": st.lists(MESSAGE, max_size=3),
    "max_tokens": st.integers(-2, 70), "max_completion_tokens": st.integers(-2, 70),
    "temperature": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "min_p": NUMBERS, "n": st.integers(-1, 20),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20)), "seed": NUMBERS, "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "logprobs": st.one_of(
        st.booleans(), st.integers(-1, 30)), "top_logprobs": st.integers(-1, 30), "echo": st.booleans(),
    "presence_penalty": NUMBERS, "frequency_penalty": NUMBERS, "repetition_penalty": NUMBERS,
    "ignore_eos": st.booleans(), "model": TEXT, "user": TEXT, "tokens": st.lists(st.integers(-(2**40), 2**40)),
    "add_special_tokens": st.booleans(), "tools": JSON,
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), TEXT), NUMBERS, max_size=3),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}),
                                 st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema":
                                                        st.fixed_dictionaries({"name": TEXT, "schema": JSON})})),
    "structured_outputs": st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar", "json_object"]),
                                          JSON, max_size=2),
    "guided_regex": TEXT, "guided_choice": st.lists(TEXT, max_size=3), "guided_grammar": TEXT, "guided_json": JSON,
    # Anthropic's Messages API
    "system": st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)),
    "stop_sequences": st.lists(TEXT, max_size=3), "thinking": JSON, "output_config": JSON,
    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])}),
}
ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/messages",
             "/v1/messages/count_tokens"]


@st.composite
def requests(draw):
    method_path = draw(st.sampled_from([("POST", p) for p in ENDPOINTS] + [("GET", "/v1/models"),
                                                                           ("GET", "/health"), ("GET", "/metrics"),
                                                                           ("GET", "/v1/completions"),
                                                                           ("POST", "/v1/nope")]))
    fields = draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=6, unique=True))
    body = {}
    for f in fields:
        body[f] = draw(st.one_of(PLAUSIBLE[f], JSON) if draw(st.booleans()) else PLAUSIBLE[f])
    if draw(st.integers(0, 9)) == 0:
        body[draw(TEXT)] = draw(JSON)  # an unknown field
    raw = None
    if draw(st.integers(0, 14)) == 0:
        raw = draw(st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"prompt": "a"' * 3]))
    return method_path, body, raw


@pytest.fixture(scope="module")
def base(smollm2_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "miaotui.cli", "serve", "--model", str(smollm2_path), "--port", str(port),
         "--max-model-len", "64", "--max-request-tokens", "64", "--kv-cache-memory", str(16 * 2**20),
         "--dtype", "float32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a pipe would fill
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_generated_requests_never_get_a_5xx(base):
    statuses: Counter = Counter()
    client = httpx.Client(base_url=base, timeout=120)

    @FUZZ
    @given(requests())
    def run(case):
        (method, path), body, raw = case
        if raw is not None:
            r = client.request(method, path, content=raw, headers={"content-type": "application/json"})
        else:
            data = json.dumps(body).encode()  # NaN and Infinity go out as JS literals, as some clients send them
            r = client.request(method, path, content=data, headers={"content-type": "application/json"}) \
                if method == "POST" else client.get(path)
        statuses[r.status_code] += 1
        assert r.status_code < 500, (method, path, body, r.text[:500])
        if r.status_code >= 400:  # OpenAI's error body, or Anthropic's on its paths: both have error.message
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"], r.text
        if sum(statuses.values()) % 10 == 0:
            ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert ok.status_code == 200, ok.text

    run()
    print(f"{sum(statuses.values())} generated requests: {dict(sorted(statuses.items()))}")
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0
