"""One engine replica: an AsyncEngine in a Ray Serve replica's own process, answering the ingress's calls.

Serve restarts a replica whose process dies (its health check is the engine loop being alive). Each replica
reports its state to the board every half second, so the ingress's /metrics shows every replica, even an idle one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import ray

from miaotui.config import EngineConfig
from miaotui.engine.async_engine import AsyncEngine
from miaotui.engine.engine import Engine
from miaotui.engine.sequence import RequestOutput
from miaotui.sampling import SamplingParams, StructuredOutput

STALE_S = 5.0  # a replica silent this long is gone (killed, or replaced)


@ray.remote(num_cpus=0)
class Board:
    """The latest state of every replica, as each last reported it."""

    def __init__(self):
        self.latest: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, state: dict) -> None:
        self.latest[replica] = (time.time(), state)

    def snapshot(self) -> dict[str, dict]:
        now = time.time()
        self.latest = {k: v for k, v in self.latest.items() if now - v[0] < STALE_S}
        return {k: v[1] for k, v in self.latest.items()}


class EngineReplica:
    """The deployment's class: Serve builds one per replica and calls its methods through the ingress's handle."""

    def __init__(self, config: EngineConfig, board):
        from ray import serve

        self.engine = AsyncEngine(Engine(config))
        self.engine.engine.grammars.warm_up()
        self.name = serve.get_replica_context().replica_id.unique_id
        self.board = board
        threading.Thread(target=self._report, name="miaotui-report", daemon=True).start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them; Serve cancels this generator when the ingress's client
        goes away, and the engine then aborts the request (its KV blocks are freed)."""
        async for out in self.engine.generate(prompt_ids, params, request_id, priority):
            yield out

    async def compile_constraint(self, spec: StructuredOutput) -> None:
        await self.engine.compile_constraint(spec)

    def describe(self) -> dict:
        """What the ingress needs to know once: the tokenizer (it applies chat templates and counts tokens) and the
        limits admission checks against."""
        e = self.engine
        return {"tokenizer": e.tokenizer, "model_name": e.model_name, "max_model_len": e.max_model_len,
                "quantization": e.quantization, "max_num_seqs": e.max_num_seqs, "vocab_size": e.vocab_size}

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine loop died is replaced."""
        if not self.engine.alive:
            raise RuntimeError("the engine loop is not running")

    def _report(self) -> None:
        while self.engine.alive:
            with contextlib.suppress(Exception):  # the board restarting: report again next time
                self.board.report.remote(self.name, {**asdict(self.engine.stats()), "pid": os.getpid()})
            time.sleep(0.5)

    def __del__(self):
        self.engine.shutdown()
