"""The ingress's side: N engine replicas on Ray Serve, seen by the HTTP server as one engine.

`start_replicas` connects to Ray (a local instance, or a cluster's address), deploys the replicas with the prefix
router, and returns a `ReplicaSet`: the server's engine interface (`ServingEngine`) over the deployment's handle.
The HTTP server in front of it is the single-process server, unchanged — same endpoints, errors, auth and drain.

Faults: a request whose replica dies before it produced anything is sent again (the router picks a live replica;
Serve replaces the dead one); one that had already streamed output ends with an error its client sees.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields, replace

from miaotui.config import EngineConfig
from miaotui.engine.engine import EngineStats
from miaotui.engine.sequence import RequestOutput
from miaotui.errors import MiaotuiError, RequestFailed, ShuttingDown
from miaotui.sampling import SamplingParams, StructuredOutput
from miaotui.tokenizer import Tokenizer

log = logging.getLogger("miaotui")

APP = "miaotui"  # the Serve application's name
RETRIES = 2  # times a request that got nothing from a dead replica is sent again
# The transport of Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED, less its HTTP-proxy parts,
# which miaotui does not use): handle calls as direct gRPC to the replica, the replica's code on its main event loop.
# 1 replica behind the ingress served 0.87x the one-process server with them, 0.82x without (medians of 13 rounds).
# Set in the environment to choose otherwise.
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


@dataclass
class ClusterConfig:
    """How many replicas, where, and how they are routed (from `miaotui serve`'s flags)."""

    replicas: int = 1
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or host:port: join a cluster
    routing: str = "prefix"  # prefix (miaotui's router) or pow2 (Ray Serve's default, power of two choices)
    cpus_per_replica: float | None = None  # default: this machine's cores (or the cluster's) split evenly


def start_replicas(engine: EngineConfig, cluster: ClusterConfig) -> ReplicaSet:
    for name, value in SERVE_ENV.items():  # read when Ray Serve is imported: here, and in the replicas' processes
        os.environ.setdefault(name, value)
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig
    except ImportError:
        raise MiaotuiError("--replicas needs Ray Serve: pip install 'miaotui[cluster]'") from None
    from miaotui.cluster.replica import Board, EngineReplica
    from miaotui.cluster.router import PrefixAffinityRouter

    if cluster.replicas < 1:
        raise MiaotuiError(f"--replicas must be at least 1, got {cluster.replicas}")
    if cluster.routing not in ("prefix", "pow2"):
        raise MiaotuiError(f"unknown routing {cluster.routing!r}; use prefix or pow2")
    local = cluster.ray_address is None
    # Ray runs its workers at nice 15, below the ingress and Ray's own daemons: every token would then wait for
    # them on a machine with few cores (a decode step took 40% longer). Engines are the work: normal priority.
    ray.init(address=cluster.ray_address, namespace="miaotui", include_dashboard=False, log_to_driver=False,
             **({"num_cpus": os.cpu_count(), "object_store_memory": 256 << 20,
                 "_system_config": {"worker_niceness": 0}} if local else {}))
    cpus = (cluster.cpus_per_replica or engine.threads
            or max(1, int(ray.cluster_resources().get("CPU", 1)) // cluster.replicas))
    engine = replace(engine, threads=engine.threads or max(1, int(cpus)))
    board = Board.remote()  # lives as long as this process holds it
    serve.start(proxy_location="Disabled")  # this process's server is the ingress: no Serve HTTP proxy
    router = (RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                  request_router_kwargs={"block_size": engine.block_size})
              if cluster.routing == "prefix" else RequestRouterConfig())
    deployment = serve.deployment(EngineReplica, name="engine", num_replicas=cluster.replicas,
                                  ray_actor_options={"num_cpus": cpus, "runtime_env": {
                                      "env_vars": {name: os.environ[name] for name in SERVE_ENV}}},
                                  max_ongoing_requests=2 * engine.max_num_seqs,  # the engine batches; extra waits
                                  health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                                  request_router_config=router)
    log.warning("starting %d replica(s) of %s on Ray (%s, %g CPU and %d thread(s) each, %s routing)",
                cluster.replicas, engine.model, "local" if local else cluster.ray_address, cpus, engine.threads,
                cluster.routing)
    try:
        handle = serve.run(deployment.bind(engine, board), name=APP, route_prefix=None)
        info = handle.describe.remote().result()
    except BaseException:  # a replica that cannot start (bad model file …), or SIGTERM while starting
        if not local:
            serve.delete(APP)
        ray.shutdown()
        raise
    return ReplicaSet(handle, board, info, cluster.replicas)


class ReplicaSet:
    """The server's engine (`ServingEngine`) when the engines are Ray Serve replicas."""

    def __init__(self, handle, board, info: dict, replicas: int):
        self.handle, self.board, self.replicas = handle, board, replicas
        self._requests = None  # the handle requests go through, made on the server's event loop (_handle())
        self.tokenizer: Tokenizer = info["tokenizer"]
        self.model_name: str = info["model_name"]
        self.max_model_len: int = info["max_model_len"]
        self.quantization: str = info["quantization"]
        self.max_num_seqs: int = info["max_num_seqs"] * replicas
        self.vocab_size: int = info["vocab_size"]
        self._ids = itertools.count()
        self._running: dict[str, object] = {}  # request id → its response stream, for fail_all
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing: str | None = None
        self._board: dict[str, dict] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._read_board, name="miaotui-board", daemon=True).start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

        self._loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        for attempt in range(RETRIES + 1):
            stream = self._handle().options(stream=True).generate.remote(prompt_ids, params, request_id, priority)
            self._running[request_id] = stream
            produced = done = False
            try:
                async for out in stream:
                    produced = True
                    yield out
                done = True
                return
            except RayTaskError as e:  # the replica's engine refused or failed the request: the same error here
                raise e.cause if isinstance(e.cause, Exception) else RequestFailed(str(e)) from None
            except RequestCancelledError:
                if self._failing is not None:
                    raise ShuttingDown(self._failing) from None
                raise
            except (RayActorError, ReplicaUnavailableError) as e:
                if produced or attempt == RETRIES:
                    raise RequestFailed(f"its replica died ({type(e).__name__})") from None
                log.warning("%s: its replica died before answering; sending it again", request_id)
            finally:
                self._running.pop(request_id, None)
                if not done:
                    stream.cancel()  # the client left (or the replica failed): the replica aborts the request

    def _handle(self):
        """The deployment's handle with its router on this (the server's) event loop, as Ray Serve's own
        throughput-optimized mode runs it: by default a handle routes on a thread of its own, and every request and
        every streamed output then crosses between the two loops (the ingress spent ~20% more CPU). `_init` is how
        Serve's own proxy makes its handles so; the env switch for it would also bind start_replicas' describe call,
        which runs outside any loop."""
        if self._requests is None:
            from ray.serve.handle import DeploymentHandle

            self._requests = DeploymentHandle(self.handle.deployment_name, self.handle.app_name)
            self._requests._init(_run_router_in_separate_loop=False)
        return self._requests

    async def compile_constraint(self, spec: StructuredOutput) -> None:
        await self._handle().compile_constraint.remote(spec)

    def fail_all(self, reason: str) -> None:
        """End every running request with ShuttingDown (the drain's grace period is running out). Any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel_all, reason)

    def _cancel_all(self, reason: str) -> None:
        self._failing = reason
        for stream in list(self._running.values()):
            stream.cancel()

    # -- state, as the replicas last reported it ------------------------------------------------------
    def _read_board(self) -> None:
        """Off the event loop: the board's snapshot every half second (a scrape never waits on Ray)."""
        import ray

        while not self._stop.wait(0.5):
            try:
                self._board = ray.get(self.board.snapshot.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 — Ray going down, or the board restarting: keep the last one
                log.debug("replica stats unavailable: %s", e)

    def replica_stats(self) -> dict[str, dict]:
        """Each live replica's stats (EngineStats' fields and its pid), as of the last half second."""
        return dict(self._board)

    def stats(self) -> EngineStats:
        """The replicas' stats together: counts summed, cache usage averaged, the hit rate over all lookups."""
        states = list(self.replica_stats().values())
        total = {f.name: sum(s.get(f.name, 0) for s in states) for f in fields(EngineStats)}
        total["kv_cache_usage"] = total["kv_cache_usage"] / len(states) if states else 0.0
        q, h = total["prefix_cache_queries"], total["prefix_cache_hits"]
        total["prefix_cache_hit_rate"] = h / q if q else 0.0
        return EngineStats(**total)

    @property
    def alive(self) -> bool:
        """At least one replica is reporting."""
        return bool(self.replica_stats())

    def shutdown(self) -> None:
        import ray
        from ray import serve

        self._stop.set()
        try:
            serve.delete(APP)
        finally:
            ray.shutdown()
