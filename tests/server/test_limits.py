"""Requests a server must refuse with a 4xx and an OpenAI error body, on a real `miaotui serve` (a small context, so
over-long prompts are cheap): chunked bodies past the limit, prompts past the context, unbounded stop lists,
unknown or unsupported parameters, unknown routes, slow senders, too many connections; the API key from a file; a
good request right after each."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.launch import free_port, wait_healthy

KEY = "file-key-456"


@pytest.fixture(scope="module")
def base(smollm2_path, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    env = {**os.environ, "MIAOTUI_API_KEY": "not-this-one"}  # the file wins over the environment
    proc = subprocess.Popen(
        [sys.executable, "-m", "miaotui.cli", "serve", "--model", str(smollm2_path), "--port", str(port),
         "--api-key-file", str(key_file), "--max-model-len", "128", "--max-body-bytes", "100000",
         "--max-request-tokens", "200", "--kv-cache-memory", str(16 * 2**20), "--dtype", "float32",
         "--read-timeout", "2", "--max-num-seqs", "4", "--max-waiting", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def post(base: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{base}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    return body["error"]


def still_serves(base: str) -> None:
    r = post(base, "/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_chunked_body_over_the_limit_gets_413(base):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 100_000
        yield b'"}'

    r = post(base, "/v1/completions", content=chunks())  # no Content-Length: sent chunked
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "request_too_large"
    still_serves(base)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_past_the_context_without_max_tokens_gets_400(base, path):
    text = "word " * 400
    body = {"prompt": text} if "chat" not in path else {"messages": [{"role": "user", "content": text}]}
    r = post(base, path, json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "context_length_exceeded"
    still_serves(base)


def test_stop_lists_are_bounded(base):
    r = post(base, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(500)]})
    assert r.status_code == 400 and "stop" in error_of(r)["message"]
    r = post(base, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stop": ""})
    assert r.status_code == 400
    r = post(base, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 200


@pytest.mark.parametrize("field,value", [
    ("frobnicate", 1),
    ("guided_decoding_backend", "xgrammar"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("store", True),  # false, OpenAI's default, is what the server does (below)
    ("modalities", ["text", "audio"]),  # text alone is (below)
])
def test_unsupported_parameters_are_refused_not_dropped(base, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
    r = post(base, "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert field in error_of(r)["message"]


@pytest.mark.parametrize("field,value", [("store", False), ("modalities", ["text"])])
def test_openai_defaults_are_what_the_server_does(base, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
    assert post(base, "/v1/chat/completions", json=body).status_code == 200


def test_image_parts_are_refused(base):
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    r = post(base, "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400 and "image_url" in error_of(r)["message"]


def test_n_times_max_tokens_is_bounded(base):
    r = post(base, "/v1/completions", json={"prompt": "Hi", "max_tokens": 60, "n": 4})
    assert r.status_code == 400 and "n × max_tokens" in error_of(r)["message"]
    r = post(base, "/v1/completions", json={"prompt": ["Hi", "Ho", "Ha", "He"], "max_tokens": 60, "n": 1})
    assert r.status_code == 400 and "4 prompts × n × max_tokens = 240" in error_of(r)["message"]
    still_serves(base)


def test_out_of_range_values_get_400(base):
    for body in ({"prompt": "Hi", "seed": 2**70}, {"prompt": [10**12]}, {"prompt": "Hi", "top_k": 2**80},
                 {"prompt": "Hi", "max_tokens": 2**70}):
        r = post(base, "/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)


def test_unknown_routes_and_methods_get_openai_errors(base):
    r = httpx.get(f"{base}/chat/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "/v1" in error_of(r)["message"]
    r = httpx.get(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and error_of(r)


def test_the_key_file_guards_every_route_but_the_page_and_health(base):
    for path in ("/v1/models", "/tokenize"):
        assert httpx.post(f"{base}{path}", json={}).status_code in (401, 405)
        r = httpx.get(f"{base}{path}", headers={"Authorization": "Bearer not-this-one"})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_slow_sender_is_cut_off_with_408(base, part):
    """Slowloris: a byte every half second keeps resetting a keep-alive timer, but not the request's deadline."""
    sock = _connect(base)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
    sock.sendall(head + (b"\r\n{" if part == "body" else b""))
    start = time.monotonic()
    try:
        for _ in range(20):
            time.sleep(0.5)
            sock.sendall(b" " if part == "body" else b"X-Slow: 1\r\n")
    except OSError:  # the server closed the connection under us
        pass
    reply = _read_all(sock)
    assert time.monotonic() - start < 6, "the slow client held the connection past its deadline"
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), reply[:200]
    assert "did not arrive" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["message"]
    still_serves(base)


def test_connections_past_the_cap_get_an_openai_503(base):
    idle = [_connect(base) for _ in range(4 + 8 + 64)]  # the cap: max_num_seqs + max_waiting + 64
    try:
        time.sleep(0.3)
        extra = _connect(base)
        reply = _read_all(extra)
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["type"] == "server_error"
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    still_serves(base)


def test_the_operators_default_max_tokens_applies_only_when_a_request_sets_none():
    from miaotui.server.admission import Admission

    plain, capped = Admission(4, 8, 128), Admission(4, 8, 128, default_max_tokens=7)
    assert plain.max_tokens(20, None, 16) == 16 and plain.max_tokens(20, None, None) == 108
    assert capped.max_tokens(20, None, 16) == 7 and capped.max_tokens(20, None, None) == 7
    assert capped.max_tokens(20, 30, None) == 30  # a request's own max_tokens wins
    assert capped.max_tokens(125, None, None) == 3  # never past the context
