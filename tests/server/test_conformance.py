"""OpenAI's exact shapes and the server's edges on a live `miaotui serve` (an API key, an allowed browser origin,
/metrics protected): system_fingerprint, the role-only first chunk and the finish-only last chunk, cached prompt
tokens in usage, routes without /v1, OpenAI error bodies for 404/405, service_tier, CORS preflight before
authentication (and from a page on another origin in a real Chromium), authentication on every route that computes,
vLLM's chat-template controls and /tokenizer_info, llama.cpp's /tokenize `content`."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import httpx
import pytest

from tests.conftest import model_path
from tests.server.launch import free_port, serving

openai = pytest.importorskip("openai")
KEY = "conformance-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PAGE_PORT = free_port()
ORIGIN = f"http://127.0.0.1:{PAGE_PORT}"
LONG = "The history of the printing press begins in the fifteenth century. " * 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    yield from serving(model_path("smollm2-135m"), "--api-key-file", str(key_file), "--allowed-origins", ORIGIN,
                       "--protect-metrics", "--dtype", "float32", "--served-model-name", "m", "gpt-4o-mini")


@pytest.fixture(scope="module")
def loopback():
    """A server that lets in pages from this machine on any port (the browser test's server must not), with
    credentials and two methods (vLLM's CORS flags)."""
    yield from serving(model_path("smollm2-135m"), "--allowed-origins", "localhost", "--allow-credentials",
                       "--allowed-methods", "GET,POST", "--dtype", "float32")


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)


def chat(base, path="/v1/chat/completions", **body):
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0, **body}
    return httpx.post(f"{base}{path}", json=body, headers=AUTH, timeout=120)


def test_chat_stream_has_openai_shape(client):
    kw = {"model": "m", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12,
          "temperature": 0}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("fp_")
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    assert last.finish_reason == whole.choices[0].finish_reason and last.delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_usage_counts_cached_prompt_tokens(client):
    kw = {"model": "m", "prompt": LONG, "max_tokens": 4, "temperature": 0}
    client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64
    for _ in range(2):  # the first puts the chat prompt in the prefix cache, the second finds it there
        streamed = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": LONG}], max_tokens=4, stream=True,
            stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= 64
    assert streamed[-1].usage.completion_tokens_details.reasoning_tokens == 0


def test_routes_without_v1_and_openai_error_bodies(base):
    assert chat(base, "/chat/completions").status_code == 200
    r = httpx.post(f"{base}/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert httpx.get(f"{base}/models", headers=AUTH).json()["data"][0]["id"] == "m"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        r = httpx.request(method, f"{base}{path}", headers=AUTH)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_service_tier(base):
    assert chat(base, service_tier="auto").status_code == 200
    r = chat(base, service_tier="flex")
    assert r.status_code == 400 and r.json()["error"]["param"] == "service_tier"


def test_cors_preflight_is_answered_before_authentication(base):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{base}/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in r.headers  # not unless --allow-credentials
    r = httpx.options(f"{base}/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # no grant: browsers block
    r = chat(base)
    assert r.status_code == 200
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                   headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the page can read why


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
    ("POST", "/v1/completions", {"prompt": "hi"}), ("POST", "/chat/completions", {"messages": []}),
    ("POST", "/v1/responses", {"input": "hi"}), ("POST", "/v1/embeddings", {"input": "hi"}),
    ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/tokenizer_info", None)])
def test_every_route_that_computes_asks_for_the_key(base, method, path, body):
    r = httpx.request(method, f"{base}{path}", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/metrics", headers=AUTH).status_code == 200


def test_chat_template_controls(base):
    messages = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    go_on = chat(base, messages=messages, add_generation_prompt=False, continue_final_message=True)
    fresh = chat(base, messages=messages)
    assert go_on.status_code == 200 and fresh.status_code == 200
    assert go_on.json()["usage"]["prompt_tokens"] < fresh.json()["usage"]["prompt_tokens"]
    for body, param in [({"messages": messages, "continue_final_message": True}, "continue_final_message"),
                        ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
                        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")]:
        r = chat(base, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert chat(base, chat_template_kwargs={"enable_thinking": False}).status_code == 200


def test_tokenize_takes_llama_cpp_content(base):
    by_prompt = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"}, headers=AUTH).json()
    by_content = httpx.post(f"{base}/tokenize", json={"content": "Hello world"}, headers=AUTH).json()
    assert by_content["tokens"] == by_prompt["tokens"] and by_prompt["tokens"]
    r = httpx.post(f"{base}/tokenize", json={"prompt": "a", "content": "b"}, headers=AUTH)
    assert r.status_code == 400
    back = httpx.post(f"{base}/detokenize", json={"tokens": by_prompt["tokens"]}, headers=AUTH).json()
    assert back["prompt"] == back["content"] == "Hello world"  # vLLM's key and llama.cpp's
    for special in (True, False):  # llama.cpp's add_special means vLLM's add_special_tokens
        ours = httpx.post(f"{base}/tokenize", json={"prompt": "<|im_start|>hi", "add_special_tokens": special},
                          headers=AUTH).json()
        theirs = httpx.post(f"{base}/tokenize", json={"content": "<|im_start|>hi", "add_special": special},
                            headers=AUTH).json()
        assert ours["tokens"] == theirs["tokens"]
    r = httpx.post(f"{base}/tokenize", json={"prompt": "a", "add_special": True, "add_special_tokens": True},
                   headers=AUTH)
    assert r.status_code == 400
    r = httpx.post(f"{base}/tokenize", json={"prompt": "a", "add_generation_prompt": False}, headers=AUTH)
    assert r.status_code == 400 and "add_generation_prompt" in r.json()["error"]["message"]  # chat's, not a prompt's


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(base):
    """vLLM's /tokenizer_info, as lm-eval's API models read it to tokenize through the server: its special tokens
    are the vocabulary's, and its chat template renders what chat requests are given."""
    jinja2 = pytest.importorskip("jinja2")
    info = httpx.get(f"{base}/tokenizer_info", headers=AUTH).json()
    assert info["tokenizer_class"] and info["model_max_length"] == httpx.get(
        f"{base}/v1/models", headers=AUTH).json()["data"][0]["max_model_len"]

    def ids(**body):
        return httpx.post(f"{base}/tokenize", json=body, headers=AUTH).json()["tokens"]
    assert len(ids(prompt=info["eos_token"], add_special_tokens=False)) == 1  # one special token, as lm-eval takes it
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    template = jinja2.Environment().from_string(info["chat_template"])
    text = template.render(messages=messages, add_generation_prompt=True)
    assert ids(prompt=text, add_special_tokens=False) == ids(messages=messages)
    answered = template.render(messages=[*messages, {"role": "assistant", "content": "Blue."}])
    assert "Blue." + info["eos_token"] in answered  # the end of a turn: lm-eval's stop string


def test_the_model_answers_to_each_served_name(base):
    ids = [m["id"] for m in httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["m", "gpt-4o-mini"]
    for name in ids:
        r = chat(base, model=name)
        assert r.status_code == 200 and r.json()["model"] == name  # the name the client used
    assert chat(base, model="gpt-5").status_code == 404


def test_localhost_origins_are_any_loopback_page(loopback):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080", "http://localhost"):
        r = httpx.options(f"{loopback}/v1/chat/completions", headers={**pre, "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert (b"Access-Control-Allow-Origin", origin.encode()) in r.headers.raw  # spelled as most servers do
        assert r.headers["access-control-allow-credentials"] == "true"
        assert r.headers["access-control-allow-methods"] == "GET, POST"
    r = httpx.options(f"{loopback}/v1/chat/completions",  # a method outside --allowed-methods
                      headers={**pre, "Origin": "http://localhost", "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 200 and "method" in r.text and "DELETE" not in r.headers["access-control-allow-methods"]
    for origin in ("http://localhost.evil.com", "http://notlocalhost", "https://example.com"):
        r = httpx.options(f"{loopback}/v1/chat/completions", headers={**pre, "Origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_page_on_another_origin_calls_the_api_in_a_real_browser(base, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    (tmp_path / "index.html").write_text("<!doctype html><title>app</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", PAGE_PORT), handler)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    script = """async ([url, key]) => {
        try {
            const r = await fetch(url + '/v1/chat/completions', {method: 'POST', headers: {
                'Authorization': 'Bearer ' + key, 'Content-Type': 'application/json'},
                body: JSON.stringify({messages: [{role: 'user', content: 'Hi'}], max_tokens: 4})});
            return JSON.stringify({status: r.status, body: await r.json()});
        } catch (e) { return JSON.stringify({error: String(e)}); }
    }"""
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox",
                                                                        "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"{ORIGIN}/index.html")
            allowed = json.loads(page.evaluate(script, [base, KEY]))
            page.goto(f"http://localhost:{PAGE_PORT}/index.html")  # another origin: not allowed
            refused = json.loads(page.evaluate(script, [base, KEY]))
            browser.close()
    finally:
        page_server.shutdown()
    assert allowed["status"] == 200 and allowed["body"]["choices"][0]["message"]["content"] is not None
    assert "error" in refused  # the browser blocks the response


def test_responses_api_plain_streamed_and_continued(client):
    first = client.responses.create(model="m", input="Name three fruits.", instructions="Answer briefly.",
                                    max_output_tokens=24, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    with client.responses.stream(model="m", input="Name three fruits.", instructions="Answer briefly.",
                                 max_output_tokens=24, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == first.output_text
    follow = client.responses.create(model="m", input="And three vegetables?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0, include=[])  # as the Agents SDK sends it
    fresh = client.responses.create(model="m", input="And three vegetables?", max_output_tokens=8, temperature=0)
    assert follow.usage.input_tokens > fresh.usage.input_tokens + first.usage.output_tokens - 2
    assert client.responses.retrieve(first.id).output_text == first.output_text


@pytest.fixture(scope="module")
def short_context():
    yield from serving(model_path("smollm2-135m"), "--max-model-len", "384", "--dtype", "float32")


def test_responses_truncation_auto_drops_the_fewest_oldest_turns(short_context):
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"Note {i}: {LONG[:200]}"}, {"role": "assistant", "content": "Noted."}]
    turns.append({"role": "user", "content": "How many notes were there?"})
    ask = {"model": "m", "input": turns, "instructions": "Answer briefly.", "max_output_tokens": 16, "temperature": 0}
    c = openai.OpenAI(base_url=f"{short_context}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.responses.create(**ask)  # truncation "disabled", OpenAI's default: a 400
    r = c.responses.create(**ask, truncation="auto")
    assert r.truncation == "auto" and r.output_text

    def prompt_tokens(first_turn: int) -> int:
        msgs = [{"role": "system", "content": "Answer briefly."}, *turns[2 * first_turn:]]
        return httpx.post(f"{short_context}/tokenize", json={"messages": msgs}).json()["count"]

    kept = next(j for j in range(9) if prompt_tokens(j) + 16 <= 384)
    assert kept > 0 and r.usage.input_tokens == prompt_tokens(kept)  # whole turns, no more than needed dropped
    follow = c.responses.create(model="m", input="And now?", previous_response_id=r.id, max_output_tokens=8,
                                truncation="auto")
    assert follow.usage.input_tokens + 8 <= 384


def test_responses_structured_output_and_bad_requests(base, client):
    schema = {"type": "object", "properties": {"fruit": {"enum": ["apple", "pear", "plum"]}},
              "required": ["fruit"], "additionalProperties": False}
    r = client.responses.create(model="m", input="A fruit as JSON.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "fruit", "schema": schema}})
    assert r.status == "completed" and json.loads(r.output_text)["fruit"] in ("apple", "pear", "plum")
    for body, param in [({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "input.0.content"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
                        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
                        ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include")]:
        resp = httpx.post(f"{base}/v1/responses", json=body, headers=AUTH, timeout=60)
        assert resp.status_code in (400, 404) and resp.json()["error"]["param"] == param, resp.text
