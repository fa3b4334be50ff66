"""The engine for serving: one background thread runs the step loop; each request gets an async stream.

Calls from the event loop never touch the engine directly: they post commands (add, abort) that the engine thread
applies between steps, so the engine's state has one owner. Cancelling a stream (a client that disconnects)
aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from miaotui.engine.engine import Engine, EngineStats
from miaotui.engine.sequence import RequestOutput
from miaotui.errors import RequestFailed, ShuttingDown
from miaotui.sampling import SamplingParams, StructuredOutput
from miaotui.tokenizer import Tokenizer

log = logging.getLogger("miaotui")


class ServingEngine(Protocol):
    """What the HTTP server needs of an engine: this process's `AsyncEngine`, or replicas on Ray
    (`miaotui.cluster.replicas.ReplicaSet`) — the server is the same for both."""

    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    quantization: str
    max_num_seqs: int
    vocab_size: int

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 priority: int = 0) -> AsyncIterator[RequestOutput]: ...

    async def compile_constraint(self, spec: StructuredOutput) -> None: ...

    def fail_all(self, reason: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def replica_stats(self) -> dict[str, dict]:
        """Per replica, its stats' fields and pid; empty for one engine in this process."""
        ...

    @property
    def alive(self) -> bool: ...

    def shutdown(self) -> None: ...


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # samples (n) not finished yet


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    # -- the caller's side (event loop) -----------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until every sample of the request has finished."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._streams[request_id] = stream
        done = asyncio.get_running_loop().create_future()
        self._post(("add", request_id, prompt_ids, params, priority, done))
        finished = False
        try:
            await done  # raises the engine's ValueError (prompt too long …) in the caller
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    stream.remaining -= 1
                    if stream.remaining == 0:
                        finished = True
                        return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def fail_all(self, reason: str) -> None:
        """End every request now with ShuttingDown (a draining server whose grace period is running out), so each
        client gets an answer it can act on rather than a connection cut mid-request. Safe from any thread."""
        self._post(("fail_all", reason))

    async def compile_constraint(self, spec: StructuredOutput) -> None:
        """Compile an output constraint off the engine loop (GrammarError if it does not compile in time); the
        engine then finds it cached when the request arrives."""
        await self.engine.grammars.compile_async(spec)

    @property
    def alive(self) -> bool:
        """Whether the engine loop is running (the server's /health reads it)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.close()

    # -- what callers may read (fixed after start, or plain counts) ----------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.loaded.files.name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def quantization(self) -> str:
        return self.engine.quantization

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def replica_stats(self) -> dict[str, dict]:
        return {}  # one engine, no replicas

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the engine's side (background thread) ----------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, priority, done = cmd
                try:
                    self.engine.add_request(ids, params, rid, priority)
                    result: BaseException | None = None
                except Exception as e:  # bad prompt: the caller gets the error, the loop goes on
                    result = e
                loop = done.get_loop()
                loop.call_soon_threadsafe(_resolve, done, result)
            elif cmd[0] == "fail_all":
                for rid in list(self.engine.sequences):
                    self.engine.abort(rid)
                    self._deliver(rid, ShuttingDown(cmd[1]))
            else:
                self.engine.abort(cmd[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # never let one bad step kill serving: fail what was running, keep going
                log.exception("engine step failed; aborting the running requests")
                for rid in list(self.engine.sequences):
                    self.engine.abort(rid)
                    self._deliver(rid, RequestFailed(f"engine error: {type(e).__name__}: {e}"))
                continue
            for out in outputs:
                if out.error is not None:
                    self._deliver(out.request_id, RequestFailed(out.error))
                else:
                    self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
