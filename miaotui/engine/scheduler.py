"""The scheduler: one rule, no phases. Each sequence has tokens computed and tokens it should have; every step
hands out tokens (a prefill chunk or one decode token) within the step's token budget and the free KV blocks.
When blocks run out, the newest running sequence is preempted and will be recomputed later.

It also books each step's results (`update`, as nano-vllm's postprocess): tokens computed, blocks offered to the
prefix cache, the sampled token appended and detokenized, the request's times, and whether it has finished."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.sequence import Sequence, Status, TokenLogprob

log = logging.getLogger("miaotui")


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens to compute for each sequence in this step (its proposals included)
    fresh_blocks: list[int] = field(default_factory=list)  # never written before: zeroed before the pass

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def sampled(self) -> list[int]:
        """Rows whose sequence catches up this step: each gets one new token (or more, with proposals)."""
        return [i for i, (s, n) in enumerate(zip(self.seqs, self.num_tokens))
                if s.num_computed + n - len(s.draft) == s.num_tokens]


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int = sys.maxsize, stop_ids: Collection[int] = ()):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.stop_ids = frozenset(stop_ids)  # end-of-sequence / end-of-turn tokens of the model
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Called with each sequence and its new token before booking; the soak test injects faults here.
        self.on_token: Callable[[Sequence, int], None] | None = None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if seq.priority:
            self.waiting = deque(sorted(self.waiting, key=_order))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- handing out a step's tokens ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        self.running.sort(key=_order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_tokens - seq.num_computed
            if seq.draft and (n + len(seq.draft) > budget or not self.kv.can_allocate(
                    seq, seq.num_computed + n + len(seq.draft))):
                seq.draft = []  # proposals go first when the step is short of room
            n = min(n + len(seq.draft), budget)
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
        deferred, computing = [], self._prefixes_in_flight()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                seq.num_computed = seq.num_cached_prompt = self.kv.match_prefix(seq)
            if self._waits_for_prefix(seq, computing):
                self.kv.release(seq)
                seq.num_computed = 0
                deferred.append(self.waiting.popleft())
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.can_allocate(seq, seq.num_computed + n):
                if not self.running and not batch.seqs and self.kv.num_free_blocks == self.kv.num_blocks:
                    raise RuntimeError("the KV cache cannot hold even one sequence's chunk; raise kv_cache_memory")
                self.kv.release(seq)  # give back the prefix blocks it borrowed; retry next step
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.kv.allocate(seq, seq.num_computed + n)
            self.kv.count_lookup(seq)
            seq.status = Status.RUNNING
            seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            self._mark_in_flight(seq, computing)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        batch.fresh_blocks, self.kv.fresh = self.kv.fresh, []
        return batch

    # -- prompts that share blocks being computed -----------------------------------------------
    # A request whose next prompt block another running request is computing right now waits for it to land in
    # the prefix cache rather than computing it a second time: the n samples of one request, and a burst of
    # requests after the same system prompt (every one of them after the first starts from the cache).
    def _prefixes_in_flight(self) -> set[int]:
        computing: set[int] = set()
        if self.waiting and self.kv.enable_prefix_caching:
            for seq in self.running:
                self._mark_in_flight(seq, computing)
        return computing

    def _mark_in_flight(self, seq: Sequence, computing: set[int]) -> None:
        """Add the hashes of seq's full prompt blocks not yet offered to the prefix cache (match_prefix hashed them)."""
        start = max(seq.num_committed, seq.num_cached_prompt // self.kv.block_size)
        computing.update(h for h, _ in seq.block_hashes[start : (seq.num_prompt - 1) // self.kv.block_size])

    def _waits_for_prefix(self, seq: Sequence, computing: set[int]) -> bool:
        i = len(seq.block_table)  # its first block the cache did not have
        return i < len(seq.block_hashes) and seq.block_hashes[i][0] in computing

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free its blocks, keep its tokens (prompt and output so far)."""
        self.running.remove(seq)
        self.kv.release(seq)
        seq.num_computed = 0
        seq.draft = []
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- booking a step's results ---------------------------------------------------------------
    def update(self, batch: ScheduledBatch, tokens: list[list[int]],
               logprobs: list[list[TokenLogprob | None]]) -> list[Sequence]:
        """After the forward pass: every scheduled sequence has its tokens computed (and its full blocks offered
        to the prefix cache); those in `batch.sampled` take their new tokens (in that order), which may finish
        them. A sequence with proposals took the ones the model agreed with and one more: the cache holds the
        agreed ones; the others' entries lie past `num_computed` and are overwritten later. Returns the sequences
        that took tokens."""
        rows = batch.sampled
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed += n - len(seq.draft)
            self.kv.commit(seq)
        now = time.monotonic()
        took = []
        for i, new, lps in zip(rows, tokens, logprobs):
            seq = batch.seqs[i]
            seq.metrics.first_token_time = seq.metrics.first_token_time or now
            if seq.draft:
                seq.metrics.proposed_tokens += len(seq.draft)
                seq.metrics.accepted_tokens += len(new) - 1
                seq.metrics.verify_steps += 1
            seq.draft = []
            try:
                for j, (token, lp) in enumerate(zip(new, lps)):
                    if j:  # a proposal the model agreed with: computed in this pass
                        seq.num_computed += 1
                    if self.on_token is not None:
                        self.on_token(seq, token)
                    self._append(seq, token, lp)
                    if seq.finished:
                        break
            except Exception as e:  # this request's data broke its booking (detokenizer, stop check): fail it alone
                self.fail(seq, e)
            if not seq.finished and len(new) > 1:
                self.kv.commit(seq)
            took.append(seq)
        return took

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """End a sequence because processing it raised; its blocks come back, the other sequences go on."""
        log.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error)
        seq.error = f"{type(error).__name__}: {error}"
        self.finish(seq, "error")

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        p = seq.params
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the output constraint: {seq.matcher.get_error()}")
        early = len(seq.token_ids) - seq.num_prompt < p.min_tokens  # nothing stops a request before min_tokens
        if not early and ((not p.ignore_eos and token in self.stop_ids) or token in p.stop_token_ids):
            if p.include_stop_str_in_output:
                seq.detokenizer.add(token)
                seq.text = seq.detokenizer.text
            return self.finish(seq, "stop", token)
        before = len(seq.text)
        seq.detokenizer.add(token)
        seq.text = seq.detokenizer.text
        for s in () if early else p.stop:  # only where the new text could complete a match
            cut = seq.text.find(s, max(0, before - len(s) + 1))
            if cut != -1:
                seq.text = seq.text[:cut + len(s) if p.include_stop_str_in_output else cut]
                return self.finish(seq, "stop", s)
        if seq.matcher is not None and seq.matcher.is_stopped():  # the constraint is complete and allows no more
            return self.finish(seq, "stop")
        if (p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End a sequence now (stopped, out of room, aborted) and free its KV blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.metrics.finished_time = time.monotonic()


def _order(seq: Sequence) -> tuple[int, float]:
    return -seq.priority, seq.metrics.arrival_time
