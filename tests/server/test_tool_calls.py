"""Tool calling on a live `miaotui serve` of Qwen2.5-Coder-0.5B-Instruct (its chat template renders tools), driven
by the official openai client: required and named calls always parse and follow the tool's schema, streamed and
non-streamed responses carry the same calls, no tag leaks into content, tool results go back through the template,
and bad tool choices get a 400 naming the parameter."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import model_path
from tests.server.launch import serving

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "number"}, "b": {"type": "number"}},
                                          "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What's the weather like in Paris today?", "What is 17 plus 25?", "Is it raining in Tokyo?",
             "Add 3.5 and 4."]


@pytest.fixture(scope="module")
def base():
    yield from serving(model_path("qwen2.5-coder-0.5b"), "--max-model-len", "2048",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes")  # vLLM's flags, as its users type


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused")


def valid_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        assert call.id and call.type == "function"
        out.append((call.function.name, args))
    return out


def streamed(client, kw: dict, pieces: list[int] | None = None) -> tuple[str, str | None, list[tuple[str, dict]]]:
    """A streamed chat completion put back together: its content, finish reason and (name, arguments) calls;
    `pieces` gets the number of chunks that brought each call's arguments."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        assert len({d.index for d in delta.tool_calls or []}) == len(delta.tool_calls or [])  # one entry a call
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": "", "pieces": 0})
            call["name"] += d.function.name or "" if d.function else ""
            call["arguments"] += d.function.arguments or "" if d.function else ""
            call["pieces"] += bool(d.function and d.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    if pieces is not None:
        pieces += [c["pieces"] for _, c in sorted(calls.items())]
    return content, finish, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_required_calls_always_parse_and_validate(client):
    for i, question in enumerate(QUESTIONS):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}], tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=i, max_tokens=120)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert valid_calls(choice.message.tool_calls)
        assert "<tool_call>" not in (choice.message.content or "")


def test_streamed_calls_equal_the_non_streamed_ones(client):
    kw = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[1]}], "tools": TOOLS,
          "tool_choice": "required", "temperature": 0, "max_tokens": 120}
    whole = valid_calls(client.chat.completions.create(**kw).choices[0].message.tool_calls)
    pieces: list[int] = []
    content, finish, calls = streamed(client, kw, pieces)
    assert finish == "tool_calls" and "<tool_call>" not in content
    assert calls == whole
    assert all(n > 2 for n in pieces), pieces  # the arguments stream as the model writes them, as OpenAI's do


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "add"}},
                                       parallel_tool_calls=False, max_tokens=120, temperature=0)
    calls = valid_calls(r.choices[0].message.tool_calls)
    assert [name for name, _ in calls] == ["add"]


def test_auto_and_a_tool_result_round_trip(base, client):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=120, temperature=0)
    msg = r.choices[0].message  # the model answers with a fenced call, no tags: read as the call all the same
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [name for name, _ in valid_calls(msg.tool_calls)] == ["get_weather"]
    assert streamed(client, {"model": "m", "messages": messages, "tools": TOOLS, "max_tokens": 120,
                             "temperature": 0})[1:] == ("tool_calls", valid_calls(msg.tool_calls))
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    # /tokenize renders the conversation as chat does (the call and its result in it), so its count is chat's
    counted = httpx.post(f"{base}/tokenize", json={"messages": messages}).json()
    prompt = httpx.post(f"{base}/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert counted["count"] == r.usage.prompt_tokens and '"city": "Paris"' in prompt and "21}" in prompt
    with_tools = httpx.post(f"{base}/tokenize", json={"messages": messages, "tools": TOOLS}).json()["count"]
    assert with_tools == client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=1,
                                                        temperature=0).usage.prompt_tokens > counted["count"]


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_get_400(base, body, param):
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_the_tool_agent_example_runs(base):
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).parents[2] / "examples"
    r = subprocess.run([sys.executable, "tool_agent.py", "--server", base, "--model", "m", "--max-tokens", "100"],
                       capture_output=True, text=True, timeout=600, cwd=examples, check=False)
    assert r.returncode == 0, r.stderr
    assert "[calculate(" in r.stdout and "-> 97.0]" in r.stdout, r.stdout  # the tool called, its result back


def test_python_api_tool_calls():
    from miaotui import LLM, SamplingParams

    llm = LLM(str(model_path("qwen2.5-coder-0.5b")), max_model_len=2048)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS[:2]],
                    SamplingParams(temperature=0, max_tokens=120), tools=TOOLS, tool_choice="required",
                    use_tqdm=False)
    for out in outs:
        assert out.finish_reason == "tool_calls" and "<tool_call>" not in out.text
        for call in out.tool_calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.fixture(scope="module")
def llama_style_base(tmp_path_factory):
    """SmolLM2 served with a Llama-style template (`--chat-template`): calls are bare JSON with "parameters"."""
    from tests.engine.test_tools import LLAMA_STYLE

    path = tmp_path_factory.mktemp("template") / "llama_style.jinja"
    path.write_text(LLAMA_STYLE)
    yield from serving(model_path("smollm2-135m"), "--chat-template", str(path))


def test_json_form_calls_stream_as_they_return(llama_style_base):
    client = openai.OpenAI(base_url=f"{llama_style_base}/v1", api_key="unused")
    kw = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[1]}], "tools": TOOLS,
          "tool_choice": "required", "temperature": 0, "max_tokens": 80}
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    whole = valid_calls(choice.message.tool_calls)
    content, finish, calls = streamed(client, kw)
    assert finish == "tool_calls" and content == ""
    assert calls == whole


def test_responses_api_function_calls_streamed_and_round_trip(client):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    kw = {"model": "m", "input": QUESTIONS[1], "tools": tools, "tool_choice": "required", "temperature": 0,
          "max_output_tokens": 120}
    r = client.responses.create(**kw)
    calls = [i for i in r.output if i.type == "function_call"]
    assert calls and all(i.call_id for i in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    with client.responses.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in events and events[-1] == "response.completed"
    assert events.count("response.function_call_arguments.delta") > len(calls)  # arguments as they are written
    assert [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"] == \
        [(c.name, json.loads(c.arguments)) for c in calls]
    back = [{"type": "function_call_output", "call_id": c.call_id, "output": "42"} for c in calls]
    answer = client.responses.create(model="m", input=back, previous_response_id=r.id, tools=tools,
                                     tool_choice="none", max_output_tokens=30, temperature=0)
    assert answer.output_text and all(i.type == "message" for i in answer.output)
