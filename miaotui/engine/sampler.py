"""Sampling, vectorised over the batch: logits processors (penalties first; grammar masks plug in the same way),
temperature, top-k, top-p, min-p, seeded draws, logprobs, and the check of speculative proposals.

The runner prepares a step's arguments as tensors once (`prepare`); the sampler itself sees tensors only. A request
with a seed draws its noise from its own generator, so its tokens do not depend on what else is in the batch.
A draw is one uniform a row against the running sum of p (inverse CDF): on a CPU the exponential race (argmax of
p / E, E ~ Exp(1)) costs one logarithm per vocabulary entry, 3.5 ms a token for Qwen's 152k, a tenth of its decode
step. Top-k / top-p look at the best candidates only (miaotui's `topk` kernel, equal logits in id order), widened
until each row's set is closed: a full sort of the vocabulary took 13 ms a token there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from miaotui.engine.sequence import Sequence, TokenLogprob
from miaotui.kernels import argmax, topk


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


@dataclass(slots=True)
class _BanArgs:
    rows: torch.Tensor
    ids: torch.Tensor


class MinTokens:
    """vLLM's min_tokens: a row whose output is shorter than its request's minimum cannot end it — the model's
    end-of-sequence tokens (unless ignore_eos) and the request's stop tokens get -inf."""

    def __init__(self, stop_ids: frozenset[int] | set[int]):
        self.stop_ids = sorted(stop_ids)

    def prepare(self, seqs: list[Sequence], device: torch.device) -> _BanArgs | None:
        entries = [(i, t) for i, s in enumerate(seqs) if len(s.token_ids) - s.num_prompt < s.params.min_tokens
                   for t in {*s.params.stop_token_ids, *(() if s.params.ignore_eos else self.stop_ids)}]
        if not entries:
            return None
        rows, ids = zip(*entries)
        return _BanArgs(torch.tensor(rows, device=device), torch.tensor(ids, device=device))

    def __call__(self, logits: torch.Tensor, a: _BanArgs) -> torch.Tensor:
        logits[a.rows, a.ids] = float("-inf")
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
        choices = None
        if not batch.all_greedy:
            choices = _choices(logits / batch.temperatures[:, None], batch)
        if batch.drafts is None:
            if choices is not None:
                chosen = torch.where(batch.greedy, chosen, choices.draw(0, batch.generators))
            groups = [[t] for t in chosen.tolist()]
            rows = [[i] for i in range(len(groups))]
        else:
            groups, rows = self._verify(chosen.tolist(), choices, batch)
        logprobs = [[self._logprob(raw_logprobs, batch, r, t) for r, t in zip(rs, ts)]
                    for rs, ts in zip(rows, groups)]
        return groups, logprobs

    @staticmethod
    def _verify(greedy_ids: list[int], choices: _Choices | None,
                batch: SamplingBatch) -> tuple[list[list[int]], list[list[int]]]:
        """Per sequence: draw position by position until a draw differs from the proposal."""
        greedy = batch.greedy.tolist()
        groups, rows, r = [], [], 0
        for draft in batch.drafts or ():
            taken, used = [], []
            for j in range(len(draft) + 1):
                t = greedy_ids[r + j]
                if not greedy[r + j]:
                    t = int(choices.draw(r + j, batch.generators[r + j:r + j + 1])[0])
                taken.append(t)
                used.append(r + j)
                if j == len(draft) or t != draft[j]:
                    break
            groups.append(taken)
            rows.append(used)
            r += len(draft) + 1
        return groups, rows

    @staticmethod
    def score(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
        """Each row's logprob of its target token under the model's own distribution (no temperature or
        penalties, as sampled tokens' logprobs), with the row's k most likely tokens beside it."""
        raw = logits.log_softmax(dim=-1)
        own = raw.gather(1, torch.tensor(targets, device=raw.device)[:, None])[:, 0].tolist()
        if k == 0:
            return [_entry(t, v, [], []) for t, v in zip(targets, own)]
        vals, idx = raw.topk(k)
        return [_entry(t, v, i, w) for t, v, i, w in zip(targets, own, idx.tolist(), vals.tolist())]

    @staticmethod
    def _logprob(raw: torch.Tensor | None, batch: SamplingBatch, r: int, token: int) -> TokenLogprob | None:
        n = batch.logprobs[r]
        if raw is None or n is None:
            return None
        row = raw[r]
        if n == 0:
            return _entry(token, float(row[token]), [], [])
        vals, idx = row.topk(n)
        return _entry(token, float(row[token]), idx.tolist(), vals.tolist())


def _entry(token: int, logprob: float, top_ids: list[int], top_values: list[float]) -> TokenLogprob:
    """A token's logprob with the most likely tokens beside it, the token itself among them."""
    top = dict(zip(top_ids, top_values))
    top[token] = logprob
    return TokenLogprob(token, logprob, top)


@dataclass(slots=True)
class _Group:
    rows: list[int]  # the batch rows it holds, in order
    probs: torch.Tensor  # [len(rows), n], unnormalized; a masked token 0
    ids: torch.Tensor | None  # the token id of each column (candidates, in id order); None: column = token id


@dataclass(slots=True)
class _Choices:
    """What a step draws from: rows that filter by top-k / top-p over their best candidates, the others over the
    vocabulary. A row is always drawn the same way, whatever the rest of the batch, so a seeded request's tokens
    are its own."""

    groups: list[_Group]

    def draw(self, first: int, generators: list[torch.Generator | None]) -> torch.Tensor:
        """A token for each of rows first, first + 1, ..., one per generator."""
        out = torch.empty(len(generators), dtype=torch.long, device=self.groups[0].probs.device)
        for g in self.groups:
            mine = [i for i, r in enumerate(g.rows) if first <= r < first + len(generators)]
            if not mine:
                continue
            at = [g.rows[i] - first for i in mine]
            pick = slice(None) if len(mine) == len(g.rows) else mine
            if g.ids is None:
                out[at] = _draw_vocabulary(g.probs[pick], [generators[a] for a in at])
            else:
                picks = _draw(g.probs[pick], [generators[a] for a in at])
                out[at] = g.ids[pick].gather(1, picks[:, None])[:, 0]
        return out


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One float64 uniform a row, from the row's generator."""
    if all(g is generators[0] for g in generators):  # unseeded requests share the engine's generator
        return torch.rand(len(generators), dtype=torch.float64, generator=generators[0], device=device)
    return torch.stack([torch.rand((), dtype=torch.float64, generator=g, device=device) for g in generators])


def _pick(cdf: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Per row, the first column whose running sum `cdf` passes fraction * total (fraction in [0, 1)): a column of
    zero mass never passes, the sum does not grow there (nor change: zeros between the same columns pick the same)."""
    total = cdf[:, -1:]
    target = torch.minimum(fraction[:, None] * total, total.nextafter(torch.zeros_like(total)))  # below the total
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One column a row of probs [B, n] by inverse CDF, the running sum in float64 (tokens of tiny mass keep it)."""
    return _pick(probs.cumsum(dim=-1, dtype=torch.float64), _uniforms(generators, probs.device))


def _draw_vocabulary(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """`_draw` over a whole vocabulary in two steps: a block by the blocks' sums, then a token in it by its running
    sum. A float64 running sum over 32 x 49k tokens took 9 ms a step; the blocks' float32 sums (relative error ~1e-7,
    the float32 probabilities' own) and one block's float64 sum take a tenth of that."""
    rows, n = probs.shape
    size = 256  # tokens a block: a power of two that divides the vocabulary where one does (no padded copy)
    while n % size and size > 32:
        size //= 2
    blocks = (probs if n % size == 0 else torch.nn.functional.pad(probs, (0, -n % size))).view(rows, -1, size)
    sums = blocks.sum(dim=-1)
    u = _uniforms(generators, probs.device)
    cdf = sums.cumsum(dim=-1, dtype=torch.float64)
    b = _pick(cdf, u)
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    within = ((u * cdf[:, -1] - before) / sums.gather(1, b[:, None])[:, 0].double()).clamp(0.0, 1.0)
    block = blocks[torch.arange(rows, device=probs.device), b]
    return b * size + _pick(block.cumsum(dim=-1, dtype=torch.float64), within)


CANDIDATES = 64  # tokens looked at first for top-k / top-p; a row whose set is still open then looks at 8x more


def _choices(logits: torch.Tensor, batch: SamplingBatch) -> _Choices:
    """The step's distribution: each row's tokens outside its top-k, top-p nucleus and min-p floor get probability
    0, the rest their share. A row that filters by top-k / top-p is worked out among its best candidates (in
    float64, in id order), a row that does not over the vocabulary."""
    rows, vocab = logits.shape
    active = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    if batch.top_k is not None:
        k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), vocab)
        active = (k < vocab) | (batch.top_p < 1)
    flags = active.tolist()
    groups = []
    if not all(flags):
        plain = [r for r in range(rows) if not flags[r]]
        pick = slice(None) if len(plain) == rows else plain
        sub = logits[pick]
        if batch.min_p is not None:
            sub = _min_p(sub, batch.min_p[pick])
        groups.append(_Group(plain, sub.softmax(dim=-1), None))
    if any(flags):
        some = [r for r in range(rows) if flags[r]]
        pick = slice(None) if len(some) == rows else some  # (an index list copies)
        for at, values, ids in _top_k_top_p(logits[pick], k[pick], batch.top_p[pick]):
            if batch.min_p is not None:
                values = _min_p(values, batch.min_p[pick][at])
            ids, order = ids.sort(dim=-1)
            probs = (values.gather(1, order).double() - values[:, :1].double()).exp()
            groups.append(_Group([some[i] for i in at], probs, ids))
    return _Choices(groups)


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens below min_p times the best token's probability: p / p_max = exp(logit - best logit)."""
    best = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - best < min_p[:, None].log(), float("-inf"))


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor,
                 top_p: torch.Tensor) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Each row's best `k` tokens and, of those, the ones whose strictly better tokens hold at most `top_p` of the
    mass (the best always). Both sets are prefixes of the sorted row, so its best c candidates decide a row once c
    reaches its k, or once a candidate falls outside its nucleus; the rows not yet decided look at 8x more (a sort
    of Qwen's 152k vocabulary took 13 ms). Returns, per number of candidates looked at: those rows, their
    candidates' logits, best first (the dropped at -inf), and their ids."""
    vocab = logits.shape[-1]
    at = list(range(logits.shape[0]))
    c = min(vocab, CANDIDATES)
    shares, out = logits.softmax(dim=-1), []  # one fused pass (an exp, sub and sum of their own took 4x as long)
    while True:
        values, ids = topk(logits, c)  # sorted, best first
        probs = shares.gather(1, ids)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        keep = (torch.arange(c, device=logits.device)[None, :] < k[:, None]) & (
            (before <= top_p[:, None]) | (top_p[:, None] >= 1))  # (a sum of all may round past 1)
        keep[:, 0] = True
        values = values.masked_fill(~keep, float("-inf"))
        decided = ((k <= c) | (before[:, -1] > top_p)).tolist()
        if c == vocab or all(decided):
            return out + [(at, values, ids)]
        done = [i for i, d in enumerate(decided) if d]
        if done:
            out.append(([at[i] for i in done], values[done], ids[done]))
        rest = [i for i, d in enumerate(decided) if not d]
        at, logits, k, top_p, shares = [at[i] for i in rest], logits[rest], k[rest], top_p[rest], shares[rest]
        c = min(vocab, max(c * 8, int(torch.where(top_p >= 1, k, 0).max())))  # rows of top-k alone: k at once
