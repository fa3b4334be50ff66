"""Sampling, vectorised over the batch: logits processors (penalties first; grammar masks or a speculative verifier
plug in the same way), temperature, top-k, top-p, min-p, seeded draws, logprobs.

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

    def prepare(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        """The step's arguments as tensors, from the requests it samples for."""
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
                        if (args := proc.prepare(seqs, device)) is not None])

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] (float32), one row per sequence → one token id per sequence (and its logprobs)."""
        want_logprobs = any(n is not None for n in batch.logprobs)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        for proc, args in batch.processors:
            logits = proc(logits, args)
        chosen = argmax(logits)
        if not batch.all_greedy:
            probs = _filter(logits / batch.temperatures[:, None], batch).softmax(dim=-1)
            noise = torch.empty_like(probs)
            for i, gen in enumerate(batch.generators):
                noise[i].exponential_(generator=gen)
            chosen = torch.where(batch.greedy, chosen, argmax(probs / noise))
        ids = chosen.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(ids)
        if raw_logprobs is not None:
            for i, n in enumerate(batch.logprobs):
                if n is None:
                    continue
                row = raw_logprobs[i]
                top = {}
                if n > 0:
                    vals, idx = row.topk(n)
                    top = dict(zip(idx.tolist(), vals.tolist()))
                top[ids[i]] = float(row[ids[i]])
                logprobs[i] = TokenLogprob(ids[i], float(row[ids[i]]), top)
        return ids, logprobs


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
