"""`miaotui bench serve`: a bounded load test of a running OpenAI-compatible server (loopback only).

N streaming completions at a fixed concurrency; checks every request completes with the right usage, then
reports throughput and TTFT / time-per-output-token percentiles. Point it at miaotui's server or at
llama-cpp-python's (`python -m llama_cpp.server`) to compare the two on the same model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import psutil

from miaotui.bench.engine_bench import percentiles
from miaotui.errors import MiaotuiError


def wait_healthy(proc: subprocess.Popen, url: str, seconds: float = 120, log=None) -> None:
    """Until the server at `url` answers /health with 200. If it exits or takes longer, it is stopped (SIGTERM
    first: a server that started replicas stops its Ray processes too) and the error carries its log's tail."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    exited = proc.poll() is not None
    if not exited:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    tail = ""
    if log is not None:
        log.seek(0)
        tail = f": {log.read()[-2000:]}"
    raise MiaotuiError(("the server exited while starting" if exited else
                        f"the server did not start within {seconds:.0f} s") + tail)


class ServerProcess:
    """A `miaotui serve` child process on a free loopback port; start() again after stop() reuses the port."""

    def __init__(self, model: str, flags: list[str], env: dict[str, str] | None = None, start_timeout: float = 300):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.model, self.flags, self.env, self.start_timeout = model, flags, env or {}, start_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "miaotui.cli", "serve", "--model", self.model, "--port", str(self.port),
               *self.flags]
        # The server's log goes to a file: a pipe nobody drains fills after ~64 KiB of request lines and then
        # blocks the server's event loop on its next log write (the 30-minute soak found this).
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=self.log,
                                     text=True)
        wait_healthy(self.proc, self.url, self.start_timeout, self.log)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


@dataclass
class LoadResult:
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
        return {"requests_ok": self.ok, "errors": len(self.errors), "output_tokens": self.tokens,
                "seconds": self.seconds, "output_tok_s": self.tokens / self.seconds if self.seconds else 0.0,
                "ttft_ms": percentiles(ms(self.ttft)), "tpot_ms": percentiles(ms(self.tpot))}


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers: dict,
               res: LoadResult, require_usage: bool) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    first = None
    usage = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    chunks += 1
                    first = first or time.perf_counter()
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        res.errors.append(f"{type(e).__name__}: {e}")
        return
    done = time.perf_counter()
    n = (usage or {}).get("completion_tokens")
    if n is None and not require_usage:  # a peer without stream usage: one chunk per token
        n = chunks
    elif n != max_tokens:
        res.errors.append(f"usage reported {n} completion tokens, expected {max_tokens}")
        return
    res.ok += 1
    res.tokens += n
    res.ttft.append((first or done) - start)
    if n > 1 and first is not None:
        res.tpot.append((done - first) / (n - 1))


async def run_load(base_url: str, model: str, requests: int = 200, concurrency: int = 64, max_tokens: int = 32,
                   api_key: str | None = None, timeout: float = 600, require_usage: bool = True,
                   prompts: list[str] | None = None) -> LoadResult:
    """`requests` short distinct prompts (or these `prompts`), `concurrency` at a time."""
    host = urlparse(base_url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise MiaotuiError(f"the load test only targets loopback addresses, not {host!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = LoadResult()
    sem = asyncio.Semaphore(concurrency)
    prompts = prompts or [f"Request {i}: write a short note about the number {i}." for i in range(requests)]

    async def guarded(client, prompt):
        async with sem:
            await _one(client, f"{base_url}/v1/completions", model, prompt, max_tokens, headers, res,
                       require_usage)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(guarded(client, p) for p in prompts)), timeout)
    res.seconds = time.perf_counter() - start
    return res


def format_load(name: str, summary: dict) -> str:
    t, p = summary["ttft_ms"], summary["tpot_ms"]
    return (f"{name}: {summary['requests_ok']} ok, {summary['errors']} errors, {summary['output_tok_s']:.1f} output "
            f"tok/s; TTFT p50 {t.get('p50', 0):.0f} / p99 {t.get('p99', 0):.0f} ms; per token p50 "
            f"{p.get('p50', 0):.1f} / p99 {p.get('p99', 0):.1f} ms")
