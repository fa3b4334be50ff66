"""miaotui's own measurements: load time, single-stream decode, prefill, batched throughput, serving latency at a
given concurrency, and prefix reuse. Every figure is a median over repeats; prompts are fixed and seeded."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.sampling import SamplingParams


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    decode_tokens: int = 128
    prefill_tokens: int = 512
    num_prompts: int = 32
    input_len: int = 64
    output_len: int = 128
    concurrency: int = 8
    serve_requests: int = 32
    repeats: int = 3
    seed: int = 0
    scenarios: tuple[str, ...] = ("decode", "prefill", "throughput", "latency", "prefix")
    engine_args: dict = field(default_factory=dict)


def random_prompts(vocab: int, n: int, length: int, seed: int, avoid: set[int]) -> list[list[int]]:
    """Token-id prompts drawn from ordinary vocabulary ids (no special tokens), the same for every engine."""
    rng = random.Random(seed)
    pool = [t for t in range(256, min(vocab, 30000)) if t not in avoid]
    return [[rng.choice(pool) for _ in range(length)] for _ in range(n)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(s)}


class MiaotuiBench:
    name = "miaotui"

    def __init__(self, cfg: BenchConfig):
        start = time.perf_counter()
        self.engine = Engine(EngineConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed,
                                          **cfg.engine_args))
        self.load_seconds = time.perf_counter() - start
        self.cfg = cfg

    def _drain(self) -> dict[str, dict]:
        """Step until idle; per request: submit, first-token and finish times (monotonic) and token count."""
        times: dict[str, dict] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                now = time.perf_counter()
                t = times.setdefault(out.request_id, {"first": now})
                if out.finished:
                    t["end"], t["tokens"] = now, out.completion_tokens
        return times

    def decode(self, prompt: list[int], n: int) -> float:
        """Single-stream decode tok/s: tokens after the first over the time after the first."""
        self.engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        t = next(iter(self._drain().values()))
        return (t["tokens"] - 1) / (t["end"] - t["first"])

    def prefill(self, prompt: list[int]) -> float:
        """Prefill tok/s of one prompt (time to its first token), with the prefix cache out of the way."""
        self.engine.kv.reset_prefix_cache()
        start = time.perf_counter()
        self.engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        self._drain()
        return len(prompt) / (time.perf_counter() - start)

    def throughput(self, prompts: list[list[int]], n: int) -> float:
        """All prompts at once, n tokens each: total output tok/s."""
        self.engine.kv.reset_prefix_cache()
        start = time.perf_counter()
        for p in prompts:
            self.engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        times = self._drain()
        return sum(t["tokens"] for t in times.values()) / (time.perf_counter() - start)

    def latency(self, prompts: list[list[int]], n: int, concurrency: int) -> dict[str, dict[str, float]]:
        """Serving-style: keep `concurrency` requests in flight; TTFT, time per output token, end-to-end."""
        self.engine.kv.reset_prefix_cache()
        queue = list(prompts)
        submitted: dict[str, float] = {}
        ttft, tpot, e2e = [], [], []
        first: dict[str, float] = {}
        while queue or self.engine.has_unfinished():
            while queue and len(submitted) - len(e2e) < concurrency:
                rid = self.engine.add_request(queue.pop(0), SamplingParams(max_tokens=n, temperature=0,
                                                                           ignore_eos=True))
                submitted[rid] = time.perf_counter()
            for out in self.engine.step():
                now = time.perf_counter()
                if out.request_id not in first:
                    first[out.request_id] = now
                    ttft.append(now - submitted[out.request_id])
                if out.finished:
                    e2e.append(now - submitted[out.request_id])
                    if out.completion_tokens > 1:
                        tpot.append((now - first[out.request_id]) / (out.completion_tokens - 1))
        ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
        return {"ttft_ms": percentiles(ms(ttft)), "tpot_ms": percentiles(ms(tpot)), "e2e_ms": percentiles(ms(e2e))}

    def prefix_reuse(self, prefix: list[int], suffixes: list[list[int]]) -> dict[str, float]:
        """TTFT of a request, then of a second one sharing its prefix (served from the prefix cache)."""
        self.engine.kv.reset_prefix_cache()
        out = {}
        for label, suffix in zip(("cold_ttft_ms", "warm_ttft_ms"), suffixes):
            start = time.perf_counter()
            self.engine.add_request(prefix + suffix, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            self._drain()
            out[label] = (time.perf_counter() - start) * 1000
        return out
