"""Server lifecycle under pressure: a full queue answers 503 with Retry-After and recovers; SIGTERM lets an
in-flight stream finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.server.launch import start_server


def test_full_queue_gets_503_then_recovers(smollm2_path):
    proc, base = start_server(smollm2_path, "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        statuses, retry = [], []
        body = {"prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True}

        def send():
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry.append(r.headers.get("retry-after"))
                assert r.json()["error"]["type"] == "server_error"

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert statuses.count(200) >= 2 and 503 in statuses and retry and all(x == "1" for x in retry)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_sigterm_drains_in_flight_stream_then_exits_0(smollm2_path):
    proc, base = start_server(smollm2_path, "--grace-period", "60")
    body = {"prompt": "Count slowly:", "max_tokens": 60, "stream": True, "ignore_eos": True}
    chunks, done = 0, False
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks += 1
            if chunks == 2:
                proc.send_signal(signal.SIGTERM)  # mid-stream
            last = json.loads(line[6:])
    assert done and chunks == 60 and last["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=60) == 0


def test_requests_past_the_grace_period_get_an_openai_503(smollm2_path):
    """A request that cannot finish before the grace period ends is answered 503 with an OpenAI body (or an error
    event on a stream) instead of being cut off by uvicorn's bare 500; the process still exits 0."""
    proc, base = start_server(smollm2_path, "--grace-period", "3", "--max-model-len", "8192")
    results: dict[str, object] = {}
    long = {"prompt": "Tell me a very long story.", "max_tokens": 6000, "ignore_eos": True}

    def plain():
        results["plain"] = httpx.post(f"{base}/v1/completions", json=long, timeout=120)

    def streamed():
        with httpx.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}, timeout=120) as r:
            results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    r = results["plain"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    events = results["stream"]
    assert events[-1] == "data: [DONE]" and "server_shutting_down" in events[-2], events[-3:]


def test_a_request_uvicorn_cancels_gets_an_openai_503_not_a_bare_500():
    """When the drain timer misses a request (its engine step outlasts the margin on a starved CPU) uvicorn cancels
    it at the end of the grace period: the answer is still the OpenAI 503, not uvicorn's text/plain 500."""
    import asyncio
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Route

    from miaotui.server.app import AnswerWhenCancelled

    async def stuck(_request):
        await asyncio.sleep(3600)

    app = AnswerWhenCancelled(Starlette(routes=[Route("/stuck", stuck, methods=["POST"])]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    result: dict[str, httpx.Response] = {}
    client = threading.Thread(target=lambda: result.setdefault(
        "r", httpx.post(f"http://127.0.0.1:{port}/stuck", json={}, timeout=30)))
    client.start()
    time.sleep(0.5)
    server.should_exit = True
    client.join(timeout=30)
    thread.join(timeout=30)
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "server_shutting_down" and r.headers["retry-after"] == "1"
