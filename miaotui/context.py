"""The per-step attention metadata, set by the model runner for the span of one forward pass.

Model code never sees the batch's bookkeeping: attention layers read it from here, so one model `forward`
serves prefill, decode and mixed steps alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class ForwardContext:
    """How the flattened tokens of one step split into sequences, and where their keys and values live.

    Token i of the step belongs to sequence s when query_start[s] <= i < query_start[s + 1]; sequence s then
    sees context_lens[s] keys in all (its cached prefix plus this step's tokens), stored in the KV-cache blocks
    listed in block_tables[s]. slot_mapping[i] is the cache slot (block * block_size + offset) for token i.
    """

    query_start: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    context_lens_t: torch.Tensor  # context_lens as an int64 tensor on the model's device
    decode_seqs: list[int]  # sequences with exactly one query token (batched together)
    prefill_seqs: list[int]  # the rest, computed one by one
    # distinct for every forward pass in the process (models may outlive their runner): per-step caches key on it
    step: int = field(default_factory=lambda: next(_steps))
    derived: dict = field(default_factory=dict)  # what every layer of the step would recompute (decode masks)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


_steps = itertools.count()
_current: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the step's context; nesting is a bug, so it is refused."""
    global _current
    if _current is not None:
        raise RuntimeError("a forward context is already active; forward passes do not nest")
    _current = ctx
    try:
        yield ctx
    finally:
        _current = None


def get_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention was called outside a forward context; run the model through ModelRunner")
    return _current
