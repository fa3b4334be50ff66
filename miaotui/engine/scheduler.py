"""The scheduler: one rule, no phases. Each sequence has tokens computed and tokens it should have; every step
hands out tokens (a prefill chunk or one decode token) within the step's token budget and the free KV blocks.
When blocks run out, the newest running sequence is preempted and will be recomputed later."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens to compute for each sequence in this step

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if seq.priority:
            self.waiting = deque(sorted(self.waiting, key=lambda s: (-s.priority, s.arrival)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        self.running.sort(key=lambda s: (-s.priority, s.arrival))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.kv.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq, seq.num_computed + n)
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_parent(seq):
                deferred.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                seq.num_cached_prompt = self.kv.match_prefix(seq)
            n = seq.num_tokens - seq.num_computed
            if n > budget:
                if not self.chunked_prefill and batch.seqs:
                    break
                n = budget
            if not self.kv.can_allocate(seq, seq.num_computed + n):
                if not self.running and not batch.seqs and self.kv.num_free_blocks == self.kv.num_blocks:
                    raise RuntimeError("the KV cache cannot hold even one sequence's chunk; raise kv_cache_memory")
                self.kv.release(seq)  # give back the prefix blocks it borrowed; retry next step
                break
            self.waiting.popleft()
            self.kv.allocate(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return batch

    def _waits_for_parent(self, seq: Sequence) -> bool:
        """Samples 1..n-1 of a request start once sample 0 has its prompt in the cache, then share its blocks."""
        p = seq.parent
        return (p is not None and not seq.block_table and self.kv.enable_prefix_caching
                and p.status is not Status.FINISHED and p.num_computed < p.num_prompt)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free its blocks, keep its tokens (prompt and output so far)."""
        self.running.remove(seq)
        self.kv.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.release(seq)
        seq.status = Status.FINISHED
