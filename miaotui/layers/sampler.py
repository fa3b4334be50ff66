"""Sampling, vectorised over the batch: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

A request with a seed draws its noise from its own generator, so its tokens do not depend on what else is in
the batch. Sampling uses the exponential-race trick (argmax of p / E, E ~ Exp(1)), equivalent to a categorical
draw and free of a per-row multinomial call.
"""

from __future__ import annotations

import torch

from miaotui.engine.sequence import Sequence, TokenLogprob
from miaotui.kernels import argmax


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (on prompt and output, as in transformers/vLLM), presence and frequency (on output only)."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty or s.params.frequency_penalty]
    for i in rows:
        p = seqs[i].params
        out = torch.tensor(seqs[i].output_ids, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (float32) for the last position of each sequence → one token id per sequence."""
    raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
    logits = apply_penalties(logits, seqs)
    greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
    chosen = argmax(logits)
    if not bool(greedy.all()):
        temps = torch.tensor([s.params.temperature if not s.params.greedy else 1.0 for s in seqs],
                             device=logits.device)
        probs = _filter(logits / temps[:, None], seqs).softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, s in enumerate(seqs):
            noise[i].exponential_(generator=s.generator)
        sampled = argmax(probs / noise)
        chosen = torch.where(greedy, chosen, sampled)
    ids = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        for i, s in enumerate(seqs):
            if s.params.logprobs is None:
                continue
            row = raw_logprobs[i]
            top = {}
            if s.params.logprobs > 0:
                vals, idx = row.topk(s.params.logprobs)
                top = dict(zip(idx.tolist(), vals.tolist()))
            top[ids[i]] = float(row[ids[i]])
            logprobs[i] = TokenLogprob(ids[i], float(row[ids[i]]), top)
    return ids, logprobs


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, top-p nucleus and min-p floor with -inf."""
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    vocab = logits.shape[-1]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop |= before > torch.tensor(top_p, device=logits.device)[:, None]
        drop[:, 0] = False  # always keep the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits
