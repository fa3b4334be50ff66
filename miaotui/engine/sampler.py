"""Sampling, vectorised over the batch: logits processors (penalties first; grammar masks plug in the same way),
temperature, top-k, top-p, min-p, seeded draws, logprobs, and the check of speculative proposals.

The runner prepares a step's arguments as tensors once (`prepare`); the sampler itself sees tensors only. A request
with a seed draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
Sampling uses the exponential-race trick (argmax of p / E, E ~ Exp(1)), equivalent to a categorical draw and free
of a per-row multinomial call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from miaotui.engine.sequence import Sequence, TokenLogprob
from miaotui.kernels import argmax


class LogitsProcessor(Protocol):
    """Changes a step's logits before tokens are drawn. `prepare` turns the sampled requests' state into this
    step's arguments (tensors), or None where no row needs it; `__call__` applies them to logits [B, V]."""

    def prepare(self, seqs: list[Sequence], device: torch.device) -> Any | None: ...

    def __call__(self, logits: torch.Tensor, args: Any) -> torch.Tensor: ...


@dataclass(slots=True)
class SamplingBatch:
    """One step's sampling arguments, one row per sequence that gets a token."""

    greedy: torch.Tensor  # bool [B]
    all_greedy: bool
    temperatures: torch.Tensor | None  # [B], 1 on greedy rows; None when every row is greedy
    top_k: torch.Tensor | None  # [B], the vocabulary size where off; None when no row filters
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    generators: list[torch.Generator | None]
    logprobs: list[int | None]  # top alternatives to return per row (None: no logprobs)
    processors: list[tuple[LogitsProcessor, Any]] = field(default_factory=list)
    drafts: list[list[int]] | None = None  # per sequence, its proposed tokens; its rows are len(draft) + 1


@dataclass(slots=True)
class _PenaltyArgs:
    rows: list[int]
    repetition: list[float]
    presence: list[float]
    frequency: list[float]
    seen: list[torch.Tensor]  # per row: the distinct ids of prompt and output (repetition)
    output: list[torch.Tensor]  # per row: the output ids (presence, frequency)


class Penalties:
    """Repetition (on prompt and output, as in transformers/vLLM), presence and frequency (on output only)."""

    def prepare(self, seqs: list[Sequence], device: torch.device) -> _PenaltyArgs | None:
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
                or s.params.presence_penalty or s.params.frequency_penalty]
        if not rows:
            return None
        ps = [seqs[i].params for i in rows]
        return _PenaltyArgs(
            rows, [p.repetition_penalty for p in ps], [p.presence_penalty for p in ps],
            [p.frequency_penalty for p in ps],
            [torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long, device=device)
             if seqs[i].params.repetition_penalty != 1.0 else None for i in rows],
            [torch.tensor(seqs[i].output_ids, dtype=torch.long, device=device) for i in rows])

    def __call__(self, logits: torch.Tensor, a: _PenaltyArgs) -> torch.Tensor:
        for j, i in enumerate(a.rows):
            if a.seen[j] is not None:
                vals = logits[i, a.seen[j]]
                logits[i, a.seen[j]] = torch.where(vals > 0, vals / a.repetition[j], vals * a.repetition[j])
            if a.output[j].numel() and (a.presence[j] or a.frequency[j]):
                counts = torch.bincount(a.output[j], minlength=logits.shape[1]).to(logits.dtype)
                logits[i] -= a.frequency[j] * counts + a.presence[j] * (counts > 0).to(logits.dtype)
        return logits


@dataclass(slots=True)
class _BiasArgs:
    rows: torch.Tensor
    ids: torch.Tensor
    biases: torch.Tensor


class LogitBias:
    """OpenAI's logit_bias: a per-request amount added to chosen tokens' logits (-100 bans, +100 forces)."""

    def prepare(self, seqs: list[Sequence], device: torch.device) -> _BiasArgs | None:
        entries = [(i, t, b) for i, s in enumerate(seqs) if s.params.logit_bias for t, b in s.params.logit_bias.items()]
        if not entries:
            return None
        rows, ids, biases = zip(*entries)
        return _BiasArgs(torch.tensor(rows, device=device), torch.tensor(ids, device=device),
                         torch.tensor(biases, dtype=torch.float32, device=device))

    def __call__(self, logits: torch.Tensor, a: _BiasArgs) -> torch.Tensor:
        logits[a.rows, a.ids] += a.biases.to(logits.dtype)
        return logits


class Sampler:
    def __init__(self, processors: list[LogitsProcessor] | None = None):
        # Penalties and biases first; a grammar mask (appended by the engine) last, so nothing revives a banned token.
        self.processors: list[LogitsProcessor] = [Penalties(), LogitBias(), *(processors or [])]

    def prepare(self, seqs: list[Sequence], device: torch.device,
                drafts: list[list[int]] | None = None) -> SamplingBatch:
        """The step's arguments as tensors, from the requests it samples for: one row each, or with `drafts`
        (speculative decoding) one row per scored position (`Position.of`)."""
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        vocab_filter = not all_greedy and any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        min_p = not all_greedy and any(p.min_p > 0 for p in params)

        def col(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return SamplingBatch(
            greedy=col(greedy, torch.bool), all_greedy=all_greedy,
            temperatures=None if all_greedy else col([1.0 if p.greedy else p.temperature for p in params]),
            top_k=col([p.top_k if p.top_k > 0 else -1 for p in params], torch.long) if vocab_filter else None,
            top_p=col([p.top_p for p in params]) if vocab_filter else None,
            min_p=col([p.min_p for p in params]) if min_p else None,
            generators=[s.generator for s in seqs], logprobs=[p.logprobs for p in params],
            processors=[(proc, args) for proc in self.processors
                        if (args := proc.prepare(seqs, device)) is not None],
            drafts=drafts if drafts and any(drafts) else None)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[list[int]],
                                                                           list[list[TokenLogprob | None]]]:
        """logits [rows, V] (float32) → each sequence's new tokens (and their logprobs): one token, or where it
        has proposals, the proposals its own draws agree with and the first draw that differs (or one more).

        Checking a proposal by drawing the token as plain decoding would and comparing is exact rejection
        sampling for a proposer that names one token (Leviathan et al. with a one-hot draft): the proposal is
        kept with probability p(proposal), and a rejection leaves p without it. Draws are made position by
        position and stop at the first rejection, so a seeded request consumes its generator exactly as plain
        decoding does and its tokens are the same."""
        want_logprobs = any(n is not None for n in batch.logprobs)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        for proc, args in batch.processors:
            logits = proc(logits, args)
        chosen = argmax(logits)
        probs = None
        if not batch.all_greedy:
            probs = _filter(logits / batch.temperatures[:, None], batch).softmax(dim=-1)
        if batch.drafts is None:
            if probs is not None:
                noise = torch.empty_like(probs)
                for i, gen in enumerate(batch.generators):
                    noise[i].exponential_(generator=gen)
                chosen = torch.where(batch.greedy, chosen, argmax(probs / noise))
            groups = [[t] for t in chosen.tolist()]
            rows = [[i] for i in range(len(groups))]
        else:
            groups, rows = self._verify(chosen.tolist(), probs, batch)
        logprobs = [[self._logprob(raw_logprobs, batch, r, t) for r, t in zip(rs, ts)]
                    for rs, ts in zip(rows, groups)]
        return groups, logprobs

    @staticmethod
    def _verify(greedy_ids: list[int], probs: torch.Tensor | None,
                batch: SamplingBatch) -> tuple[list[list[int]], list[list[int]]]:
        """Per sequence: draw position by position until a draw differs from the proposal."""
        greedy = batch.greedy.tolist()
        groups, rows, r = [], [], 0
        for draft in batch.drafts or ():
            taken, used = [], []
            for j in range(len(draft) + 1):
                t = greedy_ids[r + j]
                if not greedy[r + j]:
                    noise = torch.empty_like(probs[r + j]).exponential_(generator=batch.generators[r + j])
                    t = int(argmax((probs[r + j] / noise)[None])[0])
                taken.append(t)
                used.append(r + j)
                if j == len(draft) or t != draft[j]:
                    break
            groups.append(taken)
            rows.append(used)
            r += len(draft) + 1
        return groups, rows

    @staticmethod
    def _logprob(raw: torch.Tensor | None, batch: SamplingBatch, r: int, token: int) -> TokenLogprob | None:
        n = batch.logprobs[r]
        if raw is None or n is None:
            return None
        row = raw[r]
        top = {}
        if n > 0:
            vals, idx = row.topk(n)
            top = dict(zip(idx.tolist(), vals.tolist()))
        top[token] = float(row[token])
        return TokenLogprob(token, float(row[token]), top)


def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside each row's top-k, top-p nucleus and min-p floor with -inf."""
    vocab = logits.shape[-1]
    if batch.top_k is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(batch.top_k > 0, batch.top_k, vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop |= before > batch.top_p[:, None]
        drop[:, 0] = False  # always keep the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits
