"""Speculative decoding: a proposer guesses each request's next tokens; the next step scores them all in one pass
of the model (each proposal a decode row of its own, runner.py) and keeps those the request's own draws agree with,
plus one more (sampler.py), so the output is the one plain decoding gives, several tokens per pass of the weights.

Proposers behind one interface: prompt lookup ("ngram": the latest earlier occurrence of the text's last n
tokens, continued), suffix decoding ("suffix": the most frequent continuation of the longest matching context in
this request and in recent outputs of others), and a small draft model of the same vocabulary ("draft_model",
draft_model.py). The `Speculator` decides per step and per request how many to ask for: the k that gives the most
tokens per unit of step time, from the request's recent acceptance and what a proposed token costs on this
machine (`StepPrice`: measured at start, then learned from the engine's steps); none, for a while, where no k pays.
A step with more running requests than `disable_by_batch_size` speculates not at all, since a full batch already
reads each weight for many tokens.
"""

from __future__ import annotations

import itertools
import statistics
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np

from miaotui.config import SpeculativeConfig
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.runner import ModelRunner
from miaotui.engine.scheduler import ScheduledBatch
from miaotui.engine.sequence import Sequence
from miaotui.sampling import SamplingParams

MAX_BACKOFF = 64  # steps a request whose proposals keep failing waits, at most, before it tries again
TRIALS = 8  # proposals a request makes, paying or not, before a proposer that does not retry gives it up


class Proposer(ABC):
    """Guesses the tokens that follow each sequence's text (up to its k); may return fewer, or none."""

    @abstractmethod
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]: ...

    def release(self, seq: Sequence) -> None:
        """The sequence has finished, or stopped proposing for good: drop what was kept for it (and learn from
        its output, if it finished)."""

    def seconds(self) -> float:
        """What proposing one token takes, measured at start (lookups: nothing)."""
        return 0.0

    def stop_dear(self, seq: Sequence) -> bool:
        """The request's proposals stopped paying for what they cost: drop the dear kind and what was kept for it,
        keeping the free kind (a draft model's lookups) — False where all cost alike."""
        return False

    # Seconds of the last `propose` that were a one-off for a request (a draft model reading its prompt), not the
    # price of proposing: the Speculator leaves them out of what a proposal costs.
    overhead: float = 0.0

    # Whether a request that stopped proposing may try again later. A lookup's try costs nothing; a draft model's
    # costs its catch-up over every token since the last (~7% of a step per token on a 1.5B/0.5B pair).
    retries: bool = True


class NgramIndex:
    """Prompt lookup over one growing text: where each of its n-grams (min_n..max_n tokens) last occurred with a
    token after it, kept up to date as tokens arrive, so a step's lookup is a few dictionary reads. Scanning the
    whole text each step (numpy over every window) cost 0.2-0.8 ms at 100-3,000 tokens, found or not: 4-5% of a
    SmolLM2 step, paid on every step of a chat where nothing is found."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> where the token after its latest occurrence is
        self.size = 0  # tokens seen: every n-gram that ends before the last of them is indexed

    def lookup(self, tokens: list[int], k: int, min_n: int | None = None) -> list[int]:
        """The k tokens after the latest earlier occurrence of the text's last n tokens, longest n first, n down to
        `min_n` (at least the index's; `tokens`: the text, of which the index has seen a prefix, or all)."""
        for p in range(max(self.size, 1), len(tokens)):  # the n-grams that gained their next token
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self.after[tuple(tokens[p - n : p])] = p
        self.size = len(tokens)
        for n in range(min(self.max_n, self.size - 1), max(self.min_n, min_n or 0) - 1, -1):
            start = self.after.get(tuple(tokens[self.size - n :]))
            if start is not None:
                return list(tokens[start : start + k])
        return []


class NgramProposer(Proposer):
    """Prompt lookup: answers that copy spans of their prompt (summaries, QA over a passage, code edits)."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.indexes: dict[int, NgramIndex] = {}  # id(seq) -> its text's index

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [self.indexes.setdefault(id(s), NgramIndex(self.min_n, self.max_n)).lookup(s.token_ids, k)
                for s, k in zip(seqs, ks)]

    def release(self, seq: Sequence) -> None:
        self.indexes.pop(id(seq), None)


class ContextIndex:
    """Counts of the token that followed each context of `min_n`..`max_n` tokens."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.next: dict[tuple[int, ...], dict[int, int]] = {}

    def add(self, tokens: list[int], start: int, sign: int = 1) -> None:
        """Count (or with sign -1 forget) the continuations at positions start.. of `tokens`."""
        for p in range(max(start, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                counts = self.next.setdefault(tuple(tokens[p - n : p]), {})
                counts[tokens[p]] = counts.get(tokens[p], 0) + sign
                if counts[tokens[p]] <= 0:
                    del counts[tokens[p]]
                    if not counts:
                        del self.next[tuple(tokens[p - n : p])]

    def best(self, context: list[int]) -> tuple[int, int] | None:
        """(length of the longest known context, its most frequent continuation)."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            counts = self.next.get(tuple(context[-n:]))
            if counts:
                return n, max(counts.items(), key=lambda kv: kv[1])[0]
        return None


class SuffixProposer(Proposer):
    """Suffix decoding's idea over bounded contexts: an index of this request's tokens and one of the last
    `HISTORY` finished outputs; each guessed token is the most frequent continuation of the longest matching
    context in either (the request's own on a tie), so repeated structure across requests (agents' JSON, code) is
    found. (Until 2026-12-07 the request's own match came first, however short: SmolLM2 given the benchmark's prompts
    twice, its summaries 1.38x faster than plain decoding that way against 1.60x with the longer match, chats 1.48x
    against 1.53x; the same where nothing repeats. AVX-512 Zen 5, one process, alternated.)"""

    HISTORY = 256

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.shared = ContextIndex(self.min_n, self.max_n)
        self.outputs: deque[list[int]] = deque()
        self.own: dict[int, tuple[ContextIndex, list[int]]] = {}  # id(seq) -> its index, [tokens indexed so far]

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, ks):
            index, seen = self.own.setdefault(id(seq), (ContextIndex(self.min_n, self.max_n), [0]))
            index.add(seq.token_ids, seen[0])
            seen[0] = len(seq.token_ids)
            context, guess = list(seq.token_ids), []
            for _ in range(k):
                own, shared = index.best(context), self.shared.best(context)
                found = shared if own is None or (shared is not None and shared[0] > own[0]) else own
                if found is None:
                    break
                guess.append(found[1])
                context.append(found[1])
            out.append(guess)
        return out

    def release(self, seq: Sequence) -> None:
        self.own.pop(id(seq), None)
        if seq.finish_reason in ("stop", "length") and seq.output_ids:
            output = list(seq.output_ids)
            self.shared.add(output, 0)
            self.outputs.append(output)
            if len(self.outputs) > self.HISTORY:
                self.shared.add(self.outputs.popleft(), 0, sign=-1)


@dataclass(slots=True)
class _Adaptive:
    """A request's recent acceptance: decayed counts of accepted proposals and of rejections."""

    accepted: float = 3.0  # a prior of 60% per proposal
    rejected: float = 2.0
    seen: tuple[int, int] = (0, 0)  # proposed, accepted as of the last look
    wait: int = 0  # steps left before it proposes again
    backoff: int = 1
    off: bool = False  # no k paid and the proposer does not retry: plain decoding to the end
    free: bool = False  # no k paid for the proposer's dear proposals: only its free ones from now on


def best_k(rate: float, row_cost: float, top: int, shape: list[float] | None = None, extra: float = 0.0) -> int:
    """The k with the most tokens per unit of step time: a step taking k proposals yields 1 + a + ... + a^k tokens
    (each proposal holds with probability a, given the ones before it held) and costs 1 + k * (row_cost * shape[k]
    + extra) plain steps: `shape[k]`, where given, how much dearer than the average row (`row_cost`) each of k rows is
    (`StepPrice.shape`), `extra` a proposal's own price. 0 where no k beats a plain step."""
    a = min(rate, 0.99)
    best, value = 0, 1.0
    for k in range(1, top + 1):
        v = (1 - a ** (k + 1)) / (1 - a) / (1 + k * (row_cost * (shape[k] if shape else 1.0) + extra))
        if v > value * 1.05:  # a clear gain, not noise
            best, value = k, v
    return best


class StepPrice:
    """What a proposed token costs, as a fraction of a plain step, learned from the engine's own steps: each decode
    step's seconds against its rows (a weighted line: a one-row step, plus so much a row; recent steps weigh most)
    and the proposer's seconds per proposed token. The measurement at start-up is the first guess; the price then
    follows this machine, whose speed drifts, and the proposer's mix (a lookup proposes for nothing, a draft pass
    costs a third of a step). Priced once at start-up, the same command got 0.31 to 0.65 of a step in different
    processes (AVX-512 Zen 4, Qwen2.5-Coder-1.5B and its 0.5B draft), and its k and speed-up with it.

    Steps of one stream mostly have the same number of rows (k stays at its top while proposals hold), which tell
    the line's height but not its slope; so the start-up ratio of a row to a step stays in the fit as one more
    observation, scale-free: a machine that slows down as a whole keeps its price.

    A step's price is no line, though, where the kernels take the rows in passes: VNNI's 4-bit products take 4 rows a
    pass over each block, so a fifth row costs a second pass (Qwen2.5-Coder-1.5B's products, Ice Lake: 2 rows 1.14x a
    row's time, 4 rows 1.41x, 5 rows 2.04x, 8 rows 2.57x). `shape[k]`, from the start-up's step at each number of
    rows, is how much each of k proposals' rows costs against the line's average: the line learns the level, the
    shape says where the steps are, and a well-accepted request stops at 3 proposals rather than 4 there."""

    DECAY = 0.97  # per step: the last ~30 weigh most
    START = 4.0  # the start-up line counts as this many steps at first (at one row and at one plus k), then fades
    START_DECAY = 0.8  # per step, so that the start-up's seconds (not its ratio) are forgotten within ~20 steps

    def __init__(self, one: float, per_row: float, per_proposal: float = 0.0, rows: int = 4, learn: bool = True,
                 shape: list[float] | None = None):
        self.learn, self.shape_k = learn, shape
        ratio = per_row / one
        self.prior = np.array([[ratio * ratio, -ratio], [-ratio, 1.0]])  # "a row costs `ratio` of a step", once
        self.start = self.START * (_line_sums(0, one) + _line_sums(rows, one + rows * per_row))
        self.steps = np.zeros(5)  # decayed sums over the steps: weight, x, y, x*x, x*y (x: rows beyond one)
        self.proposals = self.START * rows * np.array([per_proposal, 1.0])  # decayed proposer seconds, tokens

    @classmethod
    def measured(cls, seconds: list[float], per_proposal: float = 0.0) -> StepPrice:
        """From the start-up's steps with 0, 1, ... k extra rows (`pass_seconds`; more rows never cost less)."""
        curve = list(itertools.accumulate(seconds, max))
        one, rows = curve[0], len(curve) - 1
        per_row = (curve[-1] - one) / rows
        shape = [1.0] + [(c - one) / k / per_row if per_row > 0 else 1.0 for k, c in enumerate(curve[1:], 1)]
        return cls(one, per_row, per_proposal, rows, shape=shape)

    @classmethod
    def fixed(cls, row_cost: float) -> StepPrice:
        """A price that does not learn: a proposed token costs `row_cost` of a one-row step."""
        return cls(1.0, row_cost, learn=False)

    def shape(self, seqs: int = 1) -> list[float] | None:
        """How much dearer than the average each of k rows is, for a request decoding alone (None: as the line says;
        a batch's rows fall into passes as they come)."""
        return self.shape_k if seqs == 1 else None

    def step(self, rows: int, seconds: float) -> None:
        if self.learn:
            self.start *= self.START_DECAY
            self.steps = self.DECAY * self.steps + _line_sums(rows - 1, seconds)

    def proposed(self, tokens: int, seconds: float) -> None:
        if self.learn and tokens:
            self.proposals = self.DECAY * self.proposals + (seconds, tokens)

    def line(self) -> tuple[float, float]:
        """Seconds of a one-row step, and of each row more (weighted least squares over (rows beyond one,
        seconds), with the start-up's ratio as one more observation)."""
        w, x, y, xx, xy = (self.start + self.steps).tolist()
        (a, b), (c, d) = self.prior.tolist()
        a, b, c, d = a + w, b + x, c + x, d + xx  # the 2 x 2 normal equations, by hand: np.linalg.solve took
        det = a * d - b * c  # ~35 us, twice a step (2% of a SmolLM2 speculative step)
        return max((d * y - b * xy) / det, 1e-9), max((a * xy - c * y) / det, 0.0)

    def __call__(self, seqs: int = 1, proposing: bool = True) -> float:
        """The price of one proposed token in a step of `seqs` decoding requests: its row and (unless not
        `proposing`: a lookup's price) its proposing, over a request's share of a plain step (a batch already reads
        the weights once for all its rows, so a proposal weighs more there)."""
        one, per_row = self.line()
        seconds, tokens = self.proposals
        return (per_row + proposing * seconds / tokens) * seqs / (one + per_row * (seqs - 1))


def _line_sums(x: float, y: float) -> np.ndarray:
    """The terms one observation adds to a line fit: weight, x, y, x * x, x * y."""
    return np.array([1.0, x, y, x * x, x * y])


class Speculator:
    """Sets each running request's proposals (`seq.draft`) before a step is scheduled, and learns what they cost
    (`StepPrice`, from the steps the engine reports to `observe`): on a CPU whose products are compute-bound at a
    few rows (AVX2) a proposal is dear and only well-accepted ones pay; where extra rows ride along with the weight
    reads (VNNI, AMX, GPUs) it is cheap."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int, price: StepPrice):
        self.config, self.proposer, self.max_model_len = config, proposer, max_model_len
        self.price = price

    def pays(self, seqs: int = 1) -> bool:
        """Whether the cheapest proposals (looked up: only their rows cost), always holding, would pay at today's
        price: where a scored row costs about a step, no speculation does. (Not the full price: a spell of dear
        proposals would turn speculation off for good, with nothing proposed to learn that it got cheaper.)"""
        return best_k(0.99, self.price(seqs, proposing=False), self.config.num_speculative_tokens,
                      self.price.shape(seqs)) > 0

    def propose(self, running: list[Sequence], waiting: int = 0) -> None:
        """`waiting`: requests not yet admitted, which join the batch within a few steps; they count, so that a
        batch's first request does not start a draft model only for the batch to stop it."""
        batch = len(running) + waiting
        if batch > self.config.disable_by_batch_size or not self.pays(batch):
            return
        row = self.price(batch, proposing=False)
        proposal, shape = self.price(batch) - row, self.price.shape(batch)
        ready, ks = [], []
        for seq in running:
            if seq.num_computed != seq.num_tokens - 1 or seq.finished:  # still in its prompt
                continue
            k = self._k(seq, row, 0.0 if seq.spec and seq.spec.free else proposal, shape)
            p = seq.params
            if p.max_tokens is not None:
                k = min(k, p.max_tokens - len(seq.output_ids) - 1)
            k = min(k, self.max_model_len - seq.num_tokens - 1)
            if k > 0:
                ready.append(seq)
                ks.append(k)
        if not ready:
            return
        start = time.perf_counter()
        drafts = self.proposer.propose(ready, ks)
        self.price.proposed(sum(map(len, drafts)), time.perf_counter() - start - self.proposer.overhead)
        for seq, draft in zip(ready, drafts):
            if draft and seq.matcher is not None:  # only what the output constraint allows
                draft = draft[: seq.matcher.validate_tokens(draft)]
            seq.draft = draft

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        """A step's pass took `seconds`: where every row decoded (no prompt chunk) and speculation could have run,
        it is a point of the price's line."""
        rows = zip(batch.seqs, batch.num_tokens)
        if len(batch.seqs) <= self.config.disable_by_batch_size and all(
                s.num_computed == s.num_tokens - 1 and n == 1 + len(s.draft) for s, n in rows):
            self.price.step(sum(batch.num_tokens), seconds)

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def _k(self, seq: Sequence, row: float, proposal: float, shape: list[float] | None) -> int:
        """k from the request's acceptance and the price of a proposal, its row's and its own (`best_k`); a request
        for which no k pays waits (1, 2, 4 ... steps) and then tries one proposal, to learn whether its text has
        become predictable — or, where the proposer's tries are not free (`retries`), stops its dear proposals and
        goes on with the free ones (a draft model's lookups: a summary whose draft guesses fail still copies spans of
        its article), or where there are none stops speculating and gives back what it held."""
        state = seq.spec = seq.spec or _Adaptive()
        if state.off:
            return 0
        m = seq.metrics
        proposed, accepted = m.proposed_tokens - state.seen[0], m.accepted_tokens - state.seen[1]
        state.seen = (m.proposed_tokens, m.accepted_tokens)
        if proposed:
            state.accepted = 0.7 * state.accepted + accepted
            state.rejected = 0.7 * state.rejected + (accepted < proposed)
        if state.wait:
            state.wait -= 1
            return 0
        k = best_k(state.accepted / (state.accepted + state.rejected), row, self.config.num_speculative_tokens, shape,
                   proposal)
        if k == 0:
            if not self.proposer.retries and not state.free:
                if m.proposed_tokens < TRIALS:  # learn the request's own rate first, one proposal a step
                    return 1
                if self.proposer.stop_dear(seq):  # the free ones start afresh, at the free price
                    seq.spec = _Adaptive(seen=state.seen, free=True)
                else:
                    state.off = True
                    self.proposer.release(seq)
                return 0
            state.wait, state.backoff = state.backoff, min(2 * state.backoff, MAX_BACKOFF)
            return 1
        state.backoff = 1
        return k


def pass_seconds(runner: ModelRunner, kv: KVCacheManager, extra: list[int]) -> list[float]:
    """Medians of a few steps (forward pass and sampling) over a scratch sequence in free blocks of the cache, one
    decode row and each of `extra` more (the counts taken in turn, so that the machine's drift falls on all alike);
    zeros where the cache has no room."""
    top = max(extra)
    seq = Sequence("timing", [1] * 64, 64, SamplingParams(max_tokens=1), None)  # type: ignore[arg-type]
    if not kv.can_allocate(seq, 64 + top):
        return [0.0] * len(extra)
    kv.allocate(seq, 64 + top)
    runner.zero_blocks(kv.fresh)
    kv.fresh = []
    try:
        runner.forward([seq], [63])
        seq.num_computed = 63
        times: list[list[float]] = [[] for _ in extra]
        for _ in range(5 if len(extra) <= 2 else 3):
            for i, n in enumerate(extra):
                seq.draft = [1] * n
                start = time.perf_counter()
                runner.run(ScheduledBatch([seq], [1 + n]))
                times[i].append(time.perf_counter() - start)
        return [statistics.median(t) for t in times]
    finally:
        seq.draft = []
        kv.release(seq)


def build_proposer(config: SpeculativeConfig, engine) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config)
    if config.method == "suffix":
        return SuffixProposer(config)
    from miaotui.engine.draft_model import DraftModelProposer

    return DraftModelProposer(config, engine)
