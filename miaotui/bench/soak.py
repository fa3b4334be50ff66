"""`miaotui loadtest --soak MINUTES`: a mixed workload against a `miaotui serve` this harness starts on loopback,
with faults injected, then the properties a server must keep under it.

The workload: streaming and not, completions and chat, `n = 2`, long prompts that force preemption (the KV cache
is small on purpose), prompts sharing a prefix, clients that disconnect at random points, concurrent `/metrics`
scrapes. The faults: requests whose booking raises inside the engine (the server's MIAOTUI_FAULT_SEED hook fails
them at their third token) and, a quarter of the way in, SIGTERM to the server and a restart.

Checked at the end: every request either completed with exact usage or ended with an error its client saw (none
lost, none hung); zero KV blocks in use; resident memory at the end within 5% of after warm-up; the engine loop
alive (/health answers, a last request completes).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from miaotui.bench.serve_bench import ServerProcess
from miaotui.config import DEFAULT_MODEL

FAULT_SEED = 4242
KINDS = ("stream", "plain", "chat", "n2", "long", "prefix", "disconnect", "fault")
# How a request may end; anything else is a finding. `fault_completed` (an injected fault not seen) fails the soak.
OUTCOMES = ("completed", "disconnected", "fault_seen", "refused_503", "fault_completed", "shutdown_seen")


@dataclass
class SoakConfig:
    minutes: float
    model: str = DEFAULT_MODEL
    concurrency: int = 64
    max_tokens: int = 16
    restart: bool = True  # SIGTERM mid-load, then a new server on the same port
    kv_cache_memory: int = 64 * 2**20  # small, so the batch outgrows it and sequences are preempted
    request_timeout: float = 300.0  # a request without an answer by then counts as hung
    seed: int = 0
    dtype: str = "auto"  # the server's --dtype


@dataclass
class SoakReport:
    counts: Counter = field(default_factory=Counter)  # completed / refused / disconnected / failed_visibly / ...
    lost: list[str] = field(default_factory=list)  # requests that neither completed exactly nor showed an error
    kv_usage_end: float | None = None
    running_end: float | None = None
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    loop_alive: bool = False
    restarts: int = 0
    scrapes: int = 0
    seconds: float = 0.0

    @property
    def rss_drift(self) -> float:
        return (self.rss_end_mb - self.rss_warm_mb) / self.rss_warm_mb if self.rss_warm_mb else 0.0

    @property
    def ok(self) -> bool:
        return (not self.lost and self.kv_usage_end == 0 and self.running_end == 0 and self.loop_alive
                and self.rss_drift <= 0.05 and self.counts["fault_completed"] == 0)  # growth is a leak; memory
        # handed back to the OS after the warm-up reading is not (a CI run saw -8.5%)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (f"soak {self.seconds / 60:.1f} min: {sum(self.counts.values())} requests ({counts}); lost "
                f"{len(self.lost)}; KV in use at the end {self.kv_usage_end}; running {self.running_end}; RSS "
                f"{self.rss_warm_mb:.0f} → {self.rss_end_mb:.0f} MB ({self.rss_drift:+.1%}); restarts "
                f"{self.restarts}; /metrics scrapes {self.scrapes}; engine loop "
                f"{'alive' if self.loop_alive else 'DEAD'} → {'PASS' if self.ok else 'FAIL'}")


class _Workload:
    def __init__(self, cfg: SoakConfig, url: str, report: SoakReport):
        self.cfg, self.url, self.report = cfg, url, report
        self.rng = random.Random(cfg.seed)
        self.prompt_tokens: dict[str, int] = {}
        self.prefix = "You are a careful assistant. " * 12
        self.serving = asyncio.Event()  # cleared while the server restarts
        self.serving.set()

    def body(self, kind: str, i: int) -> tuple[str, dict]:
        mt = self.cfg.max_tokens
        prompt = f"Request {i}: write a short note about the number {i}."
        if kind == "long":
            prompt = " ".join(f"item{i}-{j}" for j in range(80)) + " Summarize."
        elif kind == "prefix":
            prompt = self.prefix + f"Question {i}: name a colour."
        body = {"prompt": prompt, "max_tokens": mt, "temperature": self.rng.choice([0, 0.8]), "ignore_eos": True}
        if kind == "chat":
            stream = self.rng.random() < 0.5
            return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": mt,
                                            "ignore_eos": True, "stream": stream,
                                            **({"stream_options": {"include_usage": True}} if stream else {})}
        if kind == "n2":
            body["n"] = 2
        if kind == "fault":
            body["seed"] = FAULT_SEED
        body["stream"] = kind in ("stream", "disconnect", "long") or (kind == "fault" and self.rng.random() < 0.5)
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        return "/v1/completions", body

    async def expected_prompt_tokens(self, client: httpx.AsyncClient, prompt: str) -> int:
        if prompt not in self.prompt_tokens:
            r = await client.post(f"{self.url}/tokenize", json={"prompt": prompt})
            self.prompt_tokens[prompt] = r.json()["count"]
        return self.prompt_tokens[prompt]

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        kind = self.rng.choice(KINDS)
        path, body = self.body(kind, i)
        counts, name = self.report.counts, f"#{i} {kind}"
        try:
            outcome = await asyncio.wait_for(self._send(client, kind, path, body), self.cfg.request_timeout)
        except asyncio.TimeoutError:
            self.report.lost.append(f"{name}: no answer in {self.cfg.request_timeout:.0f} s (hung)")
            return
        except httpx.TransportError:  # refused or cut while the server restarts: the client saw it
            counts["transport_error"] += 1
            await self.serving.wait()
            return
        except Exception as e:  # the harness's own view of a broken answer (a non-JSON body, …): a finding
            self.report.lost.append(f"{name}: {type(e).__name__}: {e}")
            return
        if outcome in OUTCOMES:
            counts[outcome] += 1
        else:  # a request that neither completed exactly nor showed its client an error
            self.report.lost.append(f"{name}: {outcome}")

    async def _send(self, client, kind: str, path: str, body: dict) -> str:
        if not body["stream"]:
            r = await client.post(f"{self.url}{path}", json=body)
            if r.status_code != 200:
                return self._refused(kind, r.status_code, _json(r.content))
            data = r.json()
            return await self._check(client, kind, body, data["usage"], [c["finish_reason"] for c in data["choices"]])
        async with client.stream("POST", f"{self.url}{path}", json=body) as r:
            if r.status_code != 200:
                return self._refused(kind, r.status_code, _json(await r.aread()))
            chunks, carrying, usage, reasons, stop_after = 0, 0, None, [], self.rng.randint(1, 8)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    if kind == "fault":
                        return "fault_seen"
                    if event["error"].get("code") == "server_shutting_down":  # the restart's grace period ran out
                        return "shutdown_seen"
                    return f"error event {event['error']['message']}"
                chunks += len(event["choices"])
                carrying += sum(bool(c.get("text") or c.get("delta", {}).get("content")
                                     or c.get("delta", {}).get("tool_calls")) for c in event["choices"])
                reasons += [c["finish_reason"] for c in event["choices"] if c["finish_reason"]]
                usage = event.get("usage") or usage
                if kind == "disconnect" and chunks >= stop_after:
                    return "disconnected"  # leaving the `async with` closes the connection mid-stream
            if usage is None:
                return "stream ended without usage"
            if usage["completion_tokens"] < carrying:  # each chunk with output carries one token or more
                return f"usage says {usage['completion_tokens']} tokens, {carrying} chunks carried output"
            return await self._check(client, kind, body, usage, reasons)

    def _refused(self, kind: str, status: int, body: dict) -> str:
        if "error" not in body:
            return f"HTTP {status} without an OpenAI error body: {body}"
        if kind == "fault" and status == 500:
            return "fault_seen"
        if status == 503:
            return "refused_503"
        return f"HTTP {status}: {body['error']['message'][:120]}"

    async def _check(self, client, kind: str, body: dict, usage: dict, reasons: list) -> str:
        if kind == "fault":
            return "fault_completed"
        n = body.get("n", 1)
        if len(reasons) != n or any(r != "length" for r in reasons):
            return f"finish reasons {reasons}, expected {n} × length"
        if usage["completion_tokens"] != n * body["max_tokens"]:
            return f"usage says {usage['completion_tokens']} completion tokens, expected {n * body['max_tokens']}"
        if "prompt" in body and usage["prompt_tokens"] != await self.expected_prompt_tokens(client, body["prompt"]):
            return f"usage says {usage['prompt_tokens']} prompt tokens, /tokenize {self.prompt_tokens[body['prompt']]}"
        return "completed"


def _json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"not_json": raw[:200].decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {"not_json": str(body)[:200]}


async def _metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await client.get(f"{url}/metrics")).text
    return float(re.search(rf"^{name} (\S+)", text, re.MULTILINE).group(1))


async def _settled(server: ServerProcess, least: float, step: float = 5.0) -> None:
    """Wait `least` seconds, then until the server's RSS grew by under 1% over one `step` (at most 4 × `least`
    more): a process still meeting new product shapes (oneDNN keeps state for each, dense/OneDNNWeight) is not yet
    at its working set, and a baseline taken then reads its warming as a leak."""
    await asyncio.sleep(least)
    last, deadline = server.rss_mb(), time.monotonic() + 4 * least
    while time.monotonic() < deadline:
        await asyncio.sleep(step)
        now = server.rss_mb()
        if now < last * 1.01:
            return
        last = now


async def _soak(cfg: SoakConfig, server: ServerProcess, report: SoakReport) -> None:
    work = _Workload(cfg, server.url, report)
    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    warm_seconds = min(60.0, cfg.minutes * 6)  # a tenth of the run, at most a minute

    async def warm_up(first_id: int) -> None:
        """The full mix at full concurrency until the server's memory reaches its working set (largest batch,
        longest prompts, preemption), so the RSS baseline is not a half-warm process."""
        warm = asyncio.Event()
        ids = iter(range(first_id, first_id - 10**6, -1))

        async def worker() -> None:
            while not warm.is_set():
                await work.one(client, next(ids))

        async def settle() -> None:
            await _settled(server, warm_seconds)
            warm.set()

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)), settle())

    async with httpx.AsyncClient(timeout=cfg.request_timeout, limits=limits) as client:
        await warm_up(-1)
        report.counts.clear()
        report.rss_warm_mb = server.rss_mb()
        start = time.monotonic()
        end = start + cfg.minutes * 60
        restart_at = start + cfg.minutes * 15 if cfg.restart else float("inf")
        counter = iter(range(10**9))

        async def worker() -> None:
            while time.monotonic() < end:
                await work.one(client, next(counter))

        async def scraper() -> None:
            while time.monotonic() < end:
                try:
                    await client.get(f"{server.url}/metrics")
                    report.scrapes += 1
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)

        async def restarter() -> None:
            await asyncio.sleep(max(0.0, restart_at - time.monotonic()))
            if time.monotonic() >= end:
                return
            work.serving.clear()
            rc = await asyncio.to_thread(server.stop)
            report.counts[f"server_exit_{rc}"] += 1
            await asyncio.to_thread(server.start)
            report.restarts += 1
            work.serving.set()
            await _settled(server, warm_seconds)  # the soak's own workers warm the new process up
            report.rss_warm_mb = server.rss_mb()  # the process that runs to the end

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)), scraper(), restarter())
        report.seconds = time.monotonic() - start
        await asyncio.sleep(1.0)  # aborts of the last disconnects are applied between steps
        report.kv_usage_end = await _metric(client, server.url, "miaotui_kv_cache_usage")
        report.running_end = await _metric(client, server.url, "miaotui_requests_running")
        report.rss_end_mb = server.rss_mb()
        health = await client.get(f"{server.url}/health")
        last = await client.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        report.loop_alive = health.status_code == 200 and last.status_code == 200


def run_soak(cfg: SoakConfig) -> SoakReport:
    """Start a server, soak it for cfg.minutes, stop it; the report says what held."""
    report = SoakReport()
    # A small KV budget, so the batch outgrows it and sequences are preempted; the fault hook armed.
    server = ServerProcess(cfg.model, ["--max-model-len", "1024", "--kv-cache-memory", str(cfg.kv_cache_memory),
                                       "--grace-period", "20", "--dtype", cfg.dtype],
                           env={"MIAOTUI_FAULT_SEED": str(FAULT_SEED)})
    server.start()
    try:
        asyncio.run(_soak(cfg, server, report))
    finally:
        if server.proc.poll() is None:
            report.counts[f"server_exit_{server.stop()}"] += 1
    return report
