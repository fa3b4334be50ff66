"""Prefix-aware routing, as a Ray Serve request router: a request goes to a replica that was sent a prompt sharing
its longest prefix — the replicas most likely to hold that prefix in their KV cache; the least busy of them —
unless that one has `imbalance` more requests in flight than the least busy replica; then (and for a prefix no
replica has seen) to the least busy, which then holds it too. Prefixes are named block by block with the prefix cache's own hash, so "shares a prefix" means "shares
cached blocks". The router runs in the ingress process, inside the deployment handle."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from miaotui.engine.kv_cache import prefix_hashes


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, block_size: int = 16, max_blocks: int = 64, imbalance: int = 8,
                         capacity: int = 1 << 16) -> None:
        self.block_size, self.max_blocks, self.imbalance, self.capacity = block_size, max_blocks, imbalance, capacity
        self.holders: OrderedDict[int, set[ReplicaID]] = OrderedDict()  # block hash → replicas sent it (LRU)
        self.in_flight: Counter[ReplicaID] = Counter()  # requests this ingress has running on each replica

    def _hashes(self, request: PendingRequest | None) -> list[int]:
        if request is None or not request.args or not isinstance(request.args[0], list):
            return []
        return prefix_hashes(request.args[0], self.block_size, self.max_blocks)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        load = {r.replica_id: self.in_flight[r.replica_id] for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: (load[r.replica_id], random.random()))
        least = load[by_load[0].replica_id]
        for h in reversed(self._hashes(pending_request)):  # the longest prefix a live replica was sent
            held = [r for r in by_load if r.replica_id in self.holders.get(h, ())]
            if held:
                if load[held[0].replica_id] - least <= self.imbalance:
                    rest = [r for r in by_load if r not in held]
                    return [held, rest] if rest else [held]
                break
        return [by_load]  # Serve takes the one with the shortest queue among them

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight[replica_id] += 1
        for h in self._hashes(pending_request):
            self.holders.setdefault(h, set()).add(replica_id)
            self.holders.move_to_end(h)
        while len(self.holders) > self.capacity:
            self.holders.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.in_flight[replica_id] > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)  # its prefixes stay in `holders`: a dead replica is never a candidate
