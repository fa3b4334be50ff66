"""`miaotui loadtest --scale-out`: the replicas' figures in one run. The same shared-system-prompt load (a few long
system prompts, many short questions after them) against one process, one replica behind the Ray ingress, and two
replicas with prefix routing and with Ray Serve's power-of-two routing: prefix-cache hit rate (over all replicas)
and throughput of each, as ratios to the one-process server."""

from __future__ import annotations

import asyncio
import random
import re
import time

import httpx

from miaotui.bench.serve_bench import ServerProcess, run_load

SETUPS = (("one process", []),
          ("Ray, 1 replica", ["--replicas", "1"]),
          ("Ray, 2 replicas, prefix routing", ["--replicas", "2", "--routing", "prefix"]),
          ("Ray, 2 replicas, power of two", ["--replicas", "2", "--routing", "pow2"]))
WORDS = ("river mountain city harbour garden market winter summer lantern bridge library station orchard "
         "valley meadow island forest desert canyon glacier village castle temple bakery workshop").split()


def shared_prefix_prompts(systems: int = 8, requests: int = 200, words: int = 400, seed: int = 0) -> list[str]:
    """`requests` prompts, each one of `systems` system prompts of `words` words (~500 tokens) and a question."""
    rng = random.Random(seed)
    heads = [f"System prompt {k}. Rules: " + " ".join(rng.choice(WORDS) for _ in range(words)) for k in range(systems)]
    return [f"{rng.choice(heads)}\nQuestion {i}: which word above comes first?" for i in range(requests)]


def _gauge(url: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else float("nan")


def run_scale_out(model: str, requests: int = 200, concurrency: int = 16, max_tokens: int = 8, systems: int = 8,
                  setups=SETUPS, flags: tuple[str, ...] = ()) -> list[dict]:
    prompts = shared_prefix_prompts(systems, requests)
    rows = []
    for name, setup_flags in setups:
        server = ServerProcess(model, ["--served-model-name", "m", "--max-model-len", "2048", *flags, *setup_flags])
        server.start()
        try:
            res = asyncio.run(run_load(server.url, "m", requests, concurrency, max_tokens, prompts=prompts))
            time.sleep(1.5)  # replicas report their counts twice a second
            hit = _gauge(server.url, "miaotui_prefix_cache_hit_rate")
        finally:
            server.stop()
        rows.append({"setup": name, "hit_rate": hit, **res.summary(), "requests_s": res.ok / res.seconds,
                     "first_error": res.errors[0] if res.errors else None})
    return rows


def format_scale_out(rows: list[dict], model: str, requests: int, concurrency: int, systems: int) -> str:
    base = rows[0]
    lines = [f"{model}: {requests} requests, {concurrency} at a time, {systems} shared system prompts (~500 tokens)",
             "", "| setup | prefix-cache hit rate | × one process | requests/s | × one process | errors |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['hit_rate']:.3f} | {r['hit_rate'] / base['hit_rate']:.2f} | "
                     f"{r['requests_s']:.2f} | {r['requests_s'] / base['requests_s']:.2f} | {r['errors']} |")
    return "\n".join(lines)
