"""Prometheus metrics: the engine's state (read through its stats API when scraped) and per-request latencies
(from the times the engine records on each request)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from miaotui.engine.async_engine import ServingEngine
from miaotui.engine.sequence import RequestOutput


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: ServingEngine):
        self.registry = r = CollectorRegistry()
        Gauge("miaotui_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: engine.stats().num_running)
        Gauge("miaotui_requests_waiting", "Sequences waiting to be scheduled", registry=r).set_function(
            lambda: engine.stats().num_waiting)
        Gauge("miaotui_kv_cache_usage", "Fraction of KV-cache blocks in use", registry=r).set_function(
            lambda: engine.stats().kv_cache_usage)
        Gauge("miaotui_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", registry=r).set_function(
            lambda: engine.stats().prefix_cache_hit_rate)
        r.register(_ReplicaCollector(engine))
        self.prompt_tokens = Counter("miaotui_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("miaotui_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "Time to first token", registry=r)
        self.tpot = Histogram("miaotui_time_per_output_token_seconds", "Time per output token", registry=r,
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.e2e = Histogram("miaotui_e2e_request_latency_seconds", "End-to-end request latency", registry=r)
        # speculative decoding, as vLLM names them
        self.spec_drafts = Counter("miaotui_spec_decode_num_drafts", "Steps that checked proposals", registry=r)
        self.spec_draft_tokens = Counter("miaotui_spec_decode_num_draft_tokens", "Proposed tokens checked",
                                         registry=r)
        self.spec_accepted = Counter("miaotui_spec_decode_num_accepted_tokens", "Proposed tokens accepted",
                                     registry=r)
        self.spec_length = Histogram("miaotui_spec_decode_mean_accepted_length", "Per request: tokens per checking "
                                     "step (accepted proposals + 1)", registry=r,
                                     buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 17))

    def record(self, prompt_tokens: int, finals: list[RequestOutput], seconds: float) -> None:
        """A finished (or aborted) request: its tokens, end-to-end time, and each sample's engine timings."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(sum(o.completion_tokens for o in finals))
        self.e2e.observe(seconds)
        for o in finals:
            if o.metrics.ttft is not None:
                self.ttft.observe(o.metrics.ttft)
            if o.completion_tokens > 1 and o.metrics.decode_time is not None:
                self.tpot.observe(o.metrics.decode_time / (o.completion_tokens - 1))
            m = o.metrics
            if m.verify_steps:
                self.spec_drafts.inc(m.verify_steps)
                self.spec_draft_tokens.inc(m.proposed_tokens)
                self.spec_accepted.inc(m.accepted_tokens)
                self.spec_length.observe(1 + m.accepted_tokens / m.verify_steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector:
    """Per replica (`replica` label) when the engine is replicas on Ray; the unlabelled gauges are their totals."""

    GAUGES = (("requests_running", "num_running", "Sequences in the running batch"),
              ("requests_waiting", "num_waiting", "Sequences waiting to be scheduled"),
              ("kv_cache_usage", "kv_cache_usage", "Fraction of KV-cache blocks in use"),
              ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
              ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"))

    def __init__(self, engine: ServingEngine):
        self.engine = engine

    def describe(self):
        return []  # collected only when scraped: the set of replicas changes

    def collect(self):
        replicas = self.engine.replica_stats()
        if not replicas:
            return
        up = GaugeMetricFamily("miaotui_replica_up", "A replica reporting, with its process id",
                               labels=["replica", "pid"])
        for name, state in sorted(replicas.items()):
            up.add_metric([name, str(state.get("pid", ""))], 1)
        yield up
        for metric, field, doc in self.GAUGES:
            family = GaugeMetricFamily(f"miaotui_replica_{metric}", doc, labels=["replica"])
            for name, state in sorted(replicas.items()):
                family.add_metric([name], float(state.get(field, 0)))
            yield family
