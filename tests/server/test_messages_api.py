"""Anthropic's Messages API on a live `miaotui serve`, through Anthropic's own SDK: text and streamed text, tool use
(forced, streamed as input_json deltas, and a tool_result sent back), stop sequences and max_tokens as its stop
reasons, structured output (`messages.parse`), token counting, the key in `x-api-key`, and errors in Anthropic's
shape that its SDK raises as its own exceptions."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import model_path
from tests.server.launch import serving

anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

KEY = "messages-key"
MODEL = "m"  # the served name (tests.server.launch)
GREEDY = {"extra_body": {"temperature": 0}}  # the SDK no longer names temperature; the API still takes it
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    yield from serving(model_path("qwen2.5-coder-0.5b"), "--max-model-len", "2048", "--api-key-file", str(key_file))


@pytest.fixture
def client(base):
    return anthropic.Anthropic(base_url=base, api_key=KEY)  # sent as x-api-key, as Anthropic's API takes it


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_text_streamed_and_not(client):
    r = client.messages.create(model=MODEL, max_tokens=40, messages=ask("Count from 1 to 5."), **GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.stop_reason == "end_turn"
    assert [b.type for b in r.content] == ["text"] and "3" in r.content[0].text
    assert r.usage.output_tokens > 0 and r.usage.input_tokens + r.usage.cache_read_input_tokens > 10
    with client.messages.stream(model=MODEL, max_tokens=40, messages=ask("Count from 1 to 5."), **GREEDY) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert final.content[0].text == r.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == r.usage.output_tokens
    system = client.messages.create(model=MODEL, max_tokens=40, system=[{"type": "text", "text": "Reply in French."}],
                                    messages=ask("Say hello."), **GREEDY)
    assert system.content[0].text != client.messages.create(model=MODEL, max_tokens=40, messages=ask("Say hello."),
                                                            **GREEDY).content[0].text


def test_stop_sequence_and_max_tokens_are_stop_reasons(client):
    r = client.messages.create(model=MODEL, max_tokens=40, stop_sequences=["3"],
                               messages=ask("Count from 1 to 5, separated by commas."), **GREEDY)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", "3") and "3" not in r.content[0].text
    r = client.messages.create(model=MODEL, max_tokens=3, messages=ask("Tell me a long story."), **GREEDY)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


def test_tool_use_streamed_and_a_result_sent_back(client):
    kw = {"model": MODEL, "max_tokens": 80, "tools": [WEATHER], "tool_choice": {"type": "any"},
          "messages": ask("What is the weather in Paris?"), **GREEDY}
    r = client.messages.create(**kw)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(**kw) as s:
        deltas = [e for e in s if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
        final = s.get_final_message()
    assert len(deltas) > 2  # the input streams as the model writes it
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(use.name, use.input)]
    named = client.messages.create(**{**kw, "tool_choice": {"type": "tool", "name": "get_weather"}})
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_weather"]
    turns = [*kw["messages"], {"role": "assistant", "content": r.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C, sunny"}]}]
    counted = client.messages.count_tokens(model=MODEL, messages=turns, tools=[WEATHER]).input_tokens
    answer = client.messages.create(**{**kw, "messages": turns, "tool_choice": {"type": "auto"}, "max_tokens": 1})
    assert counted == answer.usage.input_tokens + answer.usage.cache_read_input_tokens  # the prompt it runs
    answer = client.messages.create(**{**kw, "messages": turns, "tool_choice": {"type": "none"}})
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text" and answer.content[0].text


def test_structured_output_with_parse(client):
    class Person(pydantic.BaseModel):
        name: str
        age: int

    r = client.messages.parse(model=MODEL, max_tokens=60, output_format=Person,
                              messages=ask("Ann is 30 years old. Give her as JSON."), **GREEDY)
    assert r.parsed_output == Person(name="Ann", age=30)


@pytest.mark.parametrize("body, status, kind, word", [
    ({"model": MODEL, "messages": ask("hi")}, 400, "invalid_request_error", "max_tokens"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}]}]},
     400, "invalid_request_error", "image"),
    ({"model": MODEL, "max_tokens": 5, "messages": ask("hi"), "thinking": {"type": "enabled", "budget_tokens": 1024}},
     400, "invalid_request_error", "thinking"),
    ({"model": MODEL, "max_tokens": 5, "messages": ask("hi"), "output_config": {"effort": "low"}},
     400, "invalid_request_error", "effort"),
    ({"model": MODEL, "max_tokens": 5, "messages": ask("hi"), "tools": [{"type": "web_search_20250305",
                                                                        "name": "web_search"}]},
     400, "invalid_request_error", "web_search"),
    ({"model": MODEL, "max_tokens": 5, "messages": ask("hi"), "tools": [WEATHER], "tool_choice": {"type": "tool"}},
     400, "invalid_request_error", "name goes with type 'tool'"),
    ({"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": ask("hi")}, 404, "not_found_error", "claude"),
])
def test_errors_have_anthropics_shape(base, client, body, status, kind, word):
    r = httpx.post(f"{base}/v1/messages", json=body, headers={"x-api-key": KEY})
    assert r.status_code == status and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == kind and word in r.json()["error"]["message"], r.json()
    if "max_tokens" not in body:  # the SDK itself asks for it before sending
        return
    with pytest.raises(anthropic.APIStatusError) as e:  # the SDK raises its own exception for it
        client.messages.create(**body)
    assert e.value.status_code == status and word in str(e.value)


def test_the_key_is_asked_for_in_anthropics_header_too(base):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base, api_key="wrong").messages.create(model=MODEL, max_tokens=5,
                                                                            messages=ask("hi"))
    r = httpx.post(f"{base}/v1/messages/count_tokens", json={"model": MODEL, "messages": ask("hi")})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{base}/v1/messages/count_tokens", json={"model": MODEL, "messages": ask("hi")},
                   headers={"Authorization": f"Bearer {KEY}"})  # OpenAI's way in works as well
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 2},
                   headers={"x-api-key": KEY})
    assert r.status_code == 200 and json.loads(r.text)["choices"]
