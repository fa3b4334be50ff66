"""The prefix router's policy on its own (no Ray cluster): a prompt goes where its longest known prefix went, unless
that replica is too busy; a new prefix, a short prompt or a dead owner go to the least busy replica."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from miaotui.cluster.router import PrefixAffinityRouter  # noqa: E402
from miaotui.engine.kv_cache import KVCacheManager, prefix_hashes  # noqa: E402

A, B = SimpleNamespace(replica_id="a"), SimpleNamespace(replica_id="b")


def router(imbalance: int = 2) -> PrefixAffinityRouter:
    r = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the policy only: no handle, no event loop
    r.initialize_state(block_size=4, imbalance=imbalance)
    return r


def choose(r: PrefixAffinityRouter, ids: list[int], candidates=(A, B)) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(list(candidates), SimpleNamespace(args=[ids, None, "rid", 0])))
    return [[x.replica_id for x in rank] for rank in ranks]


def route(r: PrefixAffinityRouter, ids: list[int], replica) -> None:
    r.on_request_routed(SimpleNamespace(args=[ids, None, "rid", 0]), replica.replica_id, None)


SYSTEM = list(range(100, 116))  # four full blocks


def test_a_shared_prefix_goes_to_a_replica_that_was_sent_it():
    r = router()
    assert sorted(choose(r, SYSTEM + [1, 2])[0]) == ["a", "b"]  # new prefix: both, least busy first
    route(r, SYSTEM + [1, 2], B)
    assert choose(r, SYSTEM + [7, 8, 9]) == [["b"], ["a"]]
    assert choose(r, SYSTEM[:8] + [5] * 8) == [["b"], ["a"]]  # two blocks in common: still b's
    route(r, SYSTEM[:8] + [5] * 8, A)  # a was sent the first two blocks last, and two of its own
    assert choose(r, SYSTEM[:8] + [5] * 8 + [6]) == [["a"], ["b"]]
    assert choose(r, SYSTEM + [3]) == [["b"], ["a"]]  # the longest match (all four blocks) is still b's
    route(r, SYSTEM + [4], A)  # now both hold SYSTEM; a has 2 in flight, b 1: the less busy holder first
    assert choose(r, SYSTEM + [5]) == [["b", "a"]]


def test_a_busy_owner_or_a_dead_one_loses_the_request_to_the_least_busy():
    r = router(imbalance=2)
    route(r, SYSTEM, A)  # a: 1 in flight
    route(r, [1, 2, 3, 4, 5], A)
    route(r, [9, 9, 9, 9, 9], A)  # a: 3 in flight, b: 0 — more than 2 apart
    assert choose(r, SYSTEM + [1]) == [["b", "a"]]
    r.on_request_completed("a", "x")  # a: 2 in flight
    assert choose(r, SYSTEM + [1]) == [["a"], ["b"]]
    assert choose(r, SYSTEM + [1], candidates=(B,)) == [["b"]]  # a died: it is no candidate
    assert sorted(choose(r, [1, 2])[0]) == ["a", "b"] and choose(r, [1, 2])[0][0] == "b"  # no full block: by load


def test_the_router_names_blocks_as_the_prefix_cache_does():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = SimpleNamespace(token_ids=SYSTEM + [1, 2], block_hashes=[])  # what _hashes reads of a Sequence
    kv._hashes(seq, 4)
    assert [h for h, _ in seq.block_hashes] == prefix_hashes(SYSTEM + [1, 2], 4, 64)
