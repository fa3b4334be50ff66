"""The block manager, exactly: block ids, reference counts, prefix hits and eviction order."""

from __future__ import annotations

from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.sequence import Sequence
from miaotui.sampling import SamplingParams


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), detokenizer=None)  # type: ignore[arg-type]


def run_prefill(kv: KVCacheManager, s: Sequence) -> None:
    kv.allocate(s, s.num_tokens)
    s.num_computed = s.num_tokens
    kv.commit(s)


def test_allocate_and_release_in_order():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)))
    assert kv.blocks_needed(a, 10) == 3
    run_prefill(kv, a)
    assert a.block_table == [0, 1, 2]
    assert kv.num_free_blocks == 5
    kv.release(a)
    assert kv.num_free_blocks == 8
    # The full blocks keep their hashes (cached, tail first); the partial one holds nothing reusable and is the
    # first handed out again, before never-used blocks: the cache's memory is touched only as far as needed.
    assert list(kv.cached) == [1, 0]
    b = seq([50] * 12, "b")
    kv.allocate(b, 12)
    assert b.block_table == [2, 3, 4]
    assert list(kv.cached) == [1, 0] and kv.hash_to_block


def test_prefix_hit_shares_full_blocks_only():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)))
    run_prefill(kv, a)  # blocks 0,1 full and hashed; block 2 partial
    b = seq(list(range(8)) + [99, 98, 97])
    assert kv.match_prefix(b) == 8
    assert b.block_table == [0, 1]
    assert kv.ref_count[:3] == [2, 2, 1]
    kv.allocate(b, b.num_tokens)
    assert b.block_table == [0, 1, 3]


def test_match_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = seq(list(range(8)))
    run_prefill(kv, a)
    b = seq(list(range(8)))
    assert kv.match_prefix(b) == 4  # the whole prompt is cached, but its last token must still be computed
    assert b.block_table == [0]


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    run_prefill(kv, a)  # blocks 0,1 hashed, block 2 partial
    kv.release(a)
    assert kv.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 9])
    assert kv.match_prefix(b) == 4 and b.block_table == [0, 1]
    kv.release(b)
    # Fill the cache with other tokens: blocks with nothing cached go first, then the least recently freed
    # cached blocks are evicted.
    c = seq([7] * 8)
    kv.allocate(c, 8)
    assert c.block_table == [2, 3, 1, 0]
    assert kv.hash_to_block == {}
    kv.release(c)
    d = seq([1, 2, 3, 4, 9])
    assert kv.match_prefix(d) == 0


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))
    run_prefill(kv, a)
    b = seq(list(range(10)))
    assert kv.match_prefix(b) == 0 and kv.hash_to_block == {}


def test_different_parents_do_not_collide():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = seq([1, 2, 3, 4, 0])
    run_prefill(kv, a)
    b = seq([9, 9, 3, 4, 0])  # same second block, different first: must not be reused
    assert kv.match_prefix(b) == 0
