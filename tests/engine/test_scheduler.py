"""The scheduler's one rule, without a model: budgets, chunked prefill, preemption by recompute."""

from __future__ import annotations

from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.scheduler import Scheduler
from miaotui.engine.sequence import Sequence, Status
from miaotui.sampling import SamplingParams


def seq(n: int, rid: str, priority: int = 0) -> Sequence:
    base = 100 * (sum(map(ord, rid)) % 50)  # distinct prompts, so the prefix cache stays out of the way
    return Sequence(rid, list(range(base + 1, base + n + 1)), n, SamplingParams(), detokenizer=None,  # type: ignore[arg-type]
                    priority=priority)


def advance(sched: Scheduler, batch) -> None:
    """What the engine does after a forward pass: count computed tokens, sample one token when caught up."""
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed += n
        sched.kv.commit(s)
        if s.num_computed == s.num_tokens:
            s.token_ids.append(7)


def test_chunked_prefill_shares_the_budget_with_decodes():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq(3, "a")
    sched.add(a)
    b1 = sched.schedule()
    assert b1.num_tokens == [3]
    advance(sched, b1)
    long = seq(25, "long")
    sched.add(long)
    b2 = sched.schedule()
    assert [s.request_id for s in b2.seqs] == ["a", "long"] and b2.num_tokens == [1, 9]
    advance(sched, b2)
    b3 = sched.schedule()
    assert b3.num_tokens == [1, 9]  # the decode keeps going while the long prompt is chunked
    advance(sched, b3)
    b4 = sched.schedule()
    assert b4.num_tokens == [1, 7]


def test_max_num_seqs():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(4, f"s{i}"))
    batch = sched.schedule()
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_preempts_newest_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    old, new = seq(4, "old"), seq(3, "new")
    sched.add(old)
    sched.add(new)
    batch = sched.schedule()  # old: 2 blocks, new: 2 blocks — the cache is full
    assert kv.num_free_blocks == 0
    advance(sched, batch)
    batch = sched.schedule()  # old needs a 3rd block for its 5th token: new is preempted
    assert [s.request_id for s in batch.seqs] == ["old"]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.block_table == []
    assert new.token_ids[3:] == [7]  # its sampled token is kept and will be recomputed
    assert sched.num_preemptions == 1


def test_priority_goes_first():
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    sched.add(seq(4, "low"))
    sched.add(seq(4, "high", priority=5))
    assert sched.schedule().seqs[0].request_id == "high"


def test_finish_frees_blocks():
    kv = KVCacheManager(16, 4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    s = seq(9, "s")
    sched.add(s)
    sched.schedule()
    sched.finish(s, "abort")
    assert kv.num_free_blocks == 16 and not sched.has_work()
    assert s.finish_reason == "abort" and s.metrics.finished_time is not None


def test_update_books_a_step(smollm2_path):
    """After a forward pass: tokens computed, the sampled token appended and detokenized, the request's times, and
    each way a sequence finishes (a stop token, a stop string, max_tokens), its blocks freed."""
    from miaotui.loader.gguf_file import GGUFFile
    from miaotui.tokenizer import IncrementalDetokenizer, Tokenizer

    f = GGUFFile(smollm2_path)
    tok = Tokenizer.from_gguf(f.metadata, f.path)
    kv = KVCacheManager(64, 16)  # blocks longer than the prompt: the three start together, none shares a block
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64, stop_ids=tok.stop_ids)

    def make(rid: str, **params) -> Sequence:
        ids = tok.encode("The capital of France is")
        s = Sequence(rid, list(ids), len(ids), SamplingParams(**params), IncrementalDetokenizer(tok, ids))
        sched.add(s)
        return s

    eos, length, stop = make("eos"), make("length", max_tokens=2), make("stop", stop=["Par"])
    batch = sched.schedule()
    assert batch.sampled == [0, 1, 2]
    paris, dot = tok.encode(" Paris"), tok.encode(".")
    took = sched.update(batch, [[paris[0]]] * 3, [[None]] * 3)
    assert took == [eos, length, stop] and all(s.num_computed == s.num_prompt for s in took)
    assert stop.finished and stop.finish_reason == "stop" and stop.stop_reason == "Par" and stop.text == " "
    assert eos.text == length.text == " Paris" and eos.metrics.first_token_time is not None
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["eos", "length"] and batch.num_tokens == [1, 1]
    sched.update(batch, [[next(iter(tok.stop_ids))], [dot[0]]], [[None], [None]])
    assert eos.finish_reason == "stop" and eos.text == " Paris"  # the stop token itself is not text
    assert length.finish_reason == "length" and length.text == " Paris."
    assert not sched.has_work() and kv.num_free_blocks == kv.num_blocks


def test_a_prompt_waits_for_the_blocks_another_is_computing():
    """Three requests after one 10-block system prompt arrive together: the first computes it (in chunks), the
    others start once it is in the cache — from it — and a request with another prompt is not held up meanwhile."""
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=30)
    system = list(range(1000, 1040))
    same = [Sequence(f"s{i}", system + [i, i], 42, SamplingParams(), detokenizer=None)  # type: ignore[arg-type]
            for i in range(3)]
    other = seq(6, "other")
    for s in [other, *same]:
        sched.add(s)
    b1 = sched.schedule()
    assert [s.request_id for s in b1.seqs] == ["other", "s0"] and b1.num_tokens == [6, 24]
    advance(sched, b1)
    b2 = sched.schedule()  # s0's last chunk; s1, s2 would take its first 6 blocks, and wait for the 4 it computes
    assert sorted(zip([s.request_id for s in b2.seqs], b2.num_tokens)) == [("other", 1), ("s0", 18)]
    assert [s.request_id for s in sched.waiting] == ["s1", "s2"] and not same[1].block_table
    advance(sched, b2)
    b3 = sched.schedule()
    assert sorted(zip([s.request_id for s in b3.seqs], b3.num_tokens)) == [("other", 1), ("s0", 1), ("s1", 2),
                                                                              ("s2", 2)]
    assert same[1].num_cached_prompt == same[2].num_cached_prompt == 40
    assert kv.prefix_queries == 42 * 3 + 6 and kv.prefix_hits == 80  # each admitted prompt counted once
