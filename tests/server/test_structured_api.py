"""Structured output through the OpenAI API on a live `miaotui serve`, driven by the official openai client:
response_format json_schema / json_object on chat and completions (streamed and not), vLLM's structured_outputs and
guided_* fields, logit_bias; every bad constraint a 400 naming its parameter, and the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.engine.test_structured import PERSON, SMALL
from tests.server.launch import serving

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def base(smollm2_path):
    yield from serving(smollm2_path, "--dtype", "float32")


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "Make up a person and describe them as JSON."}]


def test_chat_json_schema_streamed_and_not(client):
    r = client.chat.completions.create(model="m", messages=MESSAGES, response_format=SCHEMA_FORMAT,
                                       max_tokens=200, temperature=1.0, seed=7)
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="m", messages=MESSAGES, response_format=SCHEMA_FORMAT,
                                            max_tokens=200, temperature=1.0, seed=7, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text


def test_completions_json_object_and_schema(client):
    r = client.completions.create(model="m", prompt="A JSON object describing a cat:", max_tokens=80,
                                  temperature=0, extra_body={"response_format": {"type": "json_object"}})
    text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), (finish, text)
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}}
    r = client.completions.create(model="m", prompt="A record:", max_tokens=60, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), SMALL)


def test_vllm_fields(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Is water wet?"}],
                                       max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=8, extra_body={"grammar": 'root ::= "a"{5,5}'})  # llama-server's
    assert r.choices[0].message.content == "aaaaa" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="m", prompt="Today's date:", max_tokens=20, temperature=0.7, seed=3,
                                  extra_body={"structured_outputs": {"regex": r"20\d\d-[01]\d-[0-3]\d"}})
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", r.choices[0].text)
    r = client.completions.create(model="m", prompt="x", max_tokens=10, temperature=1.0, seed=1,
                                  extra_body={"guided_json": {"type": "array", "items": {"type": "integer"},
                                                              "maxItems": 2}})
    assert isinstance(json.loads(r.choices[0].text), list)


def test_logit_bias(base, client):
    plain = client.completions.create(model="m", prompt="The capital of France is", max_tokens=1, temperature=0)
    first = httpx.post(f"{base}/tokenize", json={"prompt": plain.choices[0].text, "add_special_tokens": False}
                       ).json()["tokens"][0]
    banned = client.completions.create(model="m", prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
    ({"grammar": 'root ::= "a" ('}, "grammar"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, None),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_get_400_naming_the_parameter(base, body, param, stream):
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "stream": stream,
                                                         **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
