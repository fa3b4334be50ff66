"""miaotui's own measurements: load time, single-stream decode (greedy, and sampled as a chat client asks),
prefill, batched throughput, serving latency at a given concurrency, and prefix reuse. Every figure is a median over
repeats; prompts are fixed and seeded."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.engine.sequence import RequestOutput
from miaotui.sampling import SamplingParams

SCENARIOS = ("decode", "sampled", "prefill", "long", "throughput", "latency", "prefix", "speculative")
# The sampled decode's settings, every engine alike: a chat client's usual temperature and nucleus, no top-k.
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


@dataclass
class BenchConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)  # miaotui's settings; the peers take its model
    decode_tokens: int = 128
    prefill_tokens: int = 512
    context_tokens: int = 2048  # `long`: single-stream decode after a prompt this long (attention over its cache)
    num_prompts: int = 32
    input_len: int = 64
    output_len: int = 128
    concurrency: int = 8
    serve_requests: int = 32
    repeats: int = 3
    scenarios: tuple[str, ...] = ("decode", "sampled", "prefill", "throughput", "latency", "prefix")

    @property
    def model(self) -> str:
        return self.engine.model

    @property
    def seed(self) -> int:
        return self.engine.seed


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
        self.engine = Engine(cfg.engine)
        self.load_seconds = self.engine.load_seconds
        self.cfg = cfg

    def _drain(self) -> list[RequestOutput]:
        """Step until idle; the final output of every request (with the times the engine recorded)."""
        finals = []
        while self.engine.has_unfinished():
            finals += [out for out in self.engine.step() if out.finished]
        return finals

    def decode(self, prompt: list[int], n: int, sampled: bool = False) -> float:
        """Single-stream decode tok/s: tokens after the first over the time after the first; greedy, or drawn
        with `SAMPLED`'s settings."""
        how = {**SAMPLED, "seed": self.cfg.seed} if sampled else {"temperature": 0}
        self.engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True, **how))
        out = self._drain()[0]
        return (out.completion_tokens - 1) / out.metrics.decode_time

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
        finals = self._drain()
        return sum(o.completion_tokens for o in finals) / (time.perf_counter() - start)

    def latency(self, prompts: list[list[int]], n: int, concurrency: int) -> dict[str, dict[str, float]]:
        """Serving-style: keep `concurrency` requests in flight; TTFT, time per output token, end-to-end."""
        self.engine.kv.reset_prefix_cache()
        queue = list(prompts)
        submitted = 0
        ttft, tpot, e2e = [], [], []
        while queue or self.engine.has_unfinished():
            while queue and submitted - len(e2e) < concurrency:
                self.engine.add_request(queue.pop(0), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                submitted += 1
            for out in self.engine.step():
                if out.finished:
                    m = out.metrics
                    ttft.append(m.ttft)
                    e2e.append(m.finished_time - m.arrival_time)
                    if out.completion_tokens > 1:
                        tpot.append(m.decode_time / (out.completion_tokens - 1))
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
