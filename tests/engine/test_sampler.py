"""The sampler's filters and draws: top-k / top-p found among the best candidates keep exactly what a sort of the
whole vocabulary keeps, and draws follow the filtered distribution (chi-square), never a masked token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from miaotui import SamplingParams
from miaotui.engine.sampler import Sampler, _choices
from miaotui.engine.sequence import Sequence

TOP_K = [0, 5, 100, 2000, 0, 0]
TOP_P = [1.0, 0.9, 0.5, 0.99, 0.1, 0.95]


def reference(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens by a float64 sort of the whole row, and each token's distance to its row's top-p edge (the
    mass of strictly better tokens minus top_p): float32 sums may decide a token within ~1e-6 of it either way."""
    vocab = logits.shape[-1]
    ordered, order = logits.double().sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    keep = (torch.arange(vocab)[None, :] < k[:, None]) & ((before <= top_p.double()[:, None]) | (top_p[:, None] >= 1))
    keep[:, 0] = True
    edge = torch.where(top_p[:, None] < 1, (before - top_p.double()[:, None]).abs(), math.inf)
    return (torch.zeros_like(keep).scatter_(1, order, keep),
            torch.zeros_like(edge).scatter_(1, order, edge))


def batch_of(params: list[SamplingParams], seeds: list[int] | None = None):
    seqs = [Sequence(f"s{i}", [0], 1, p, None, generator=torch.Generator().manual_seed(seeds[i]) if seeds else None)
            for i, p in enumerate(params)]
    return Sampler().prepare(seqs, torch.device("cpu"))


def kept(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The tokens each row may draw, by the sampler's own path for a batch of these settings."""
    choices = _choices(logits, batch_of([SamplingParams(temperature=1.0, top_k=int(k), top_p=float(p))
                                         for k, p in zip(top_k, top_p)]))
    out = torch.zeros(logits.shape, dtype=torch.bool)
    for g in choices.groups:
        out[g.rows] = g.probs > 0 if g.ids is None else torch.zeros_like(out[g.rows]).scatter_(1, g.ids, g.probs > 0)
    return out


def test_top_k_top_p_keep_what_a_full_sort_keeps():
    """Peaked and flat rows (a nucleus of 1 token to thousands: the candidates must widen), vocabularies smaller and
    larger than the first candidates, rows that filter mixed with rows that do not."""
    gen = torch.Generator().manual_seed(0)
    decided = 0
    for trial in range(120):
        vocab = [40, 1000, 49152][trial % 3]
        rows = 1 + trial % 6
        scale = torch.tensor([[0.05, 0.5, 2.0, 8.0][(trial + r) % 4] for r in range(rows)])[:, None]
        logits = torch.randn(rows, vocab, generator=gen) * scale
        top_k = torch.tensor([TOP_K[(trial + r) % 6] for r in range(rows)])
        top_p = torch.tensor([TOP_P[(trial * 5 + r) % 6] for r in range(rows)])
        want, edge = reference(logits, top_k, top_p)
        differ = kept(logits, top_k, top_p) != want
        assert (edge[differ] < 1e-5).all(), (trial, top_k.tolist(), top_p.tolist())
        decided += int((~differ).all())
    assert decided >= 110  # a difference is a float32 tie at the edge, rare


def test_a_seeded_row_draws_the_same_whatever_else_is_in_the_batch():
    """A top-p row alone, beside a row that does not filter (the vocabulary's path), and beside a row that makes the
    candidates widen: the same tokens for the same seeds."""
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 5000, generator=gen) * 3
    flat = torch.randn(1, 5000, generator=gen) * 0.1  # its top-p 0.99 nucleus: most of the vocabulary
    mine = SamplingParams(temperature=0.8, top_p=0.9)
    for other, other_logits in [(None, None), (SamplingParams(temperature=1.0), row),
                                (SamplingParams(temperature=1.0, top_p=0.99), flat)]:
        tokens = []
        for seed in range(200):
            params, logits = [mine], row
            if other is not None:
                params, logits = [mine, other], torch.cat([row, other_logits])
            batch = batch_of(params, [seed, 10_000 + seed])
            tokens.append(_choices(logits / batch.temperatures[:, None], batch).draw(0, batch.generators[:1])[0])
        if other is None:
            alone = tokens
        assert tokens == alone, other
    assert len(set(map(int, alone))) > 5


def draw_counts(params: SamplingParams, logits: torch.Tensor, rows: int, rounds: int) -> np.ndarray:
    """How often each token is drawn by `rows` seeded requests over `rounds` steps of the same logits."""
    batch = batch_of([params] * rows, list(range(rows)))
    counts = np.zeros(logits.shape[-1])
    for _ in range(rounds):
        for (token,) in Sampler().sample(logits.expand(rows, -1).clone(), batch)[0]:
            counts[token] += 1
    return counts


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at a normal z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("vocab", [1000, 1024])  # drawn over the vocabulary in blocks: padded, and not
def test_draws_follow_the_filtered_distribution(vocab):
    """~1,000 tokens whose top-p 0.9 nucleus holds ~150 of them (past the first candidates), then top-k 3 and
    min-p (alone and after top-p): 20,000 draws each, against the renormalized kept probabilities."""
    logits = -torch.arange(vocab, dtype=torch.float32) * 0.02 + torch.linspace(0, 0.3, vocab).sin()
    logits = logits[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]  # ids out of rank order
    for params in [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.5, top_k=3),
                   SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0, top_p=0.95, min_p=0.3),
                   SamplingParams(temperature=1.0)]:
        scaled = (logits / params.temperature).double()
        p = scaled.softmax(dim=-1)
        order = p.argsort(descending=True)
        keep = torch.ones(vocab, dtype=torch.bool)
        if params.top_p < 1:
            before = p[order].cumsum(0) - p[order]
            keep[order[before > params.top_p]] = False
        if params.top_k:
            keep[order[params.top_k:]] = False
        if params.min_p:
            keep &= p >= params.min_p * p.max()
        expected = torch.where(keep, p, 0.0)
        expected = (expected / expected.sum()).numpy()
        counts = draw_counts(params, logits[None], rows=500, rounds=40)
        assert counts[~keep.numpy()].sum() == 0, params  # a masked token is never drawn
        seen = keep.numpy()
        n = counts.sum()
        chi2 = float((((counts[seen] - n * expected[seen]) ** 2) / (n * expected[seen])).sum())
        assert chi2 < chi2_critical(int(seen.sum()) - 1), (params, chi2, int(seen.sum()))
