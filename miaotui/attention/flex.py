"""Attention through torch's FlexAttention, reading the paged cache in place: the CUDA backend (and, compiled by
torch's C++ backend or run eagerly, a checkable one on the CPU).

Each layer's cache is one long key sequence, [1, Hkv, blocks * block_size, D] — a view, nothing gathered. A block
mask built from the block tables lists, for each tile of queries, the cache blocks it visits; a mask function
finds a visited key's position in its sequence from the block it lies in. Decode rows (one query each) are a
batch whose row b visits exactly its table's blocks; a step with prompt rows is one flattened query sequence in
tiles of Q_TILE, each visiting the blocks of the sequences it holds.

Where a physical block sits in a sequence: prefix reuse shares whole leading blocks, so every block a step touches
has one logical index in every table that holds it, and one vector `logical[block]`, scattered from the step's
tables, serves all sequences. A tile that mixes sequences also checks `tables[seq, logical[block]] == block`.
Decode metadata is built from tensors only, so a CUDA graph (engine/cuda_graphs.py) captures it with the step.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from miaotui.attention.base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from miaotui.layers.attention import Attention

Q_TILE = 128  # queries per tile of a step with prompt rows (FlexAttention's default tile)
# Older torch builds (2.5) always derive the backward pass's tables; inference never needs them.
_NO_Q_BLOCKS = ({"compute_q_blocks": False}
                if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {})
Mask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FlexBackend(AttentionBackend):
    name = "flex"
    capturable = True

    def __init__(self, num_blocks: int, device: torch.device, compiled: bool | None = None):
        # logical[block]: the block's index in the tables holding it; entry num_blocks takes padding writes
        self.logical = torch.zeros(num_blocks + 1, dtype=torch.int32, device=device)
        self.pad = num_blocks
        self.compiled = device.type == "cuda" if compiled is None else compiled
        # Compiled, FlexAttention is one fused kernel; eager, it materialises every query's scores over the whole
        # cache (correct, for checks on small caches only).
        self._attend = flex_attention
        if self.compiled:
            # One compiled kernel per (dtype, heads, window, decode or mixed) of each model an engine runs: more
            # than dynamo's default of 8 entries (past which it falls back to the eager, materialising path).
            cfg = torch._dynamo.config
            limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, limit, max(getattr(cfg, limit), 64))
            self._attend = torch.compile(flex_attention, dynamic=device.type == "cuda")

    def prepare(self, query_start: list[int], context_lens: list[int], slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, windows: set[int | None],
                dtype: torch.dtype) -> AttentionMetadata:
        meta = super().prepare(query_start, context_lens, slot_mapping, block_tables, block_size, windows, dtype)
        if not meta.all_decode:
            meta.rows = self.mixed_masks(meta, block_size, windows)
        return meta

    def prepare_decode(self, meta: AttentionMetadata, block_size: int, windows: set[int | None],
                       dtype: torch.dtype) -> dict[int | None, BlockMask] | None:
        if not meta.all_decode:
            return None  # a mixed step attends to every row in one call (mixed_masks)
        return self.decode_masks(meta.block_tables, meta.context_lens_t, block_size, windows)

    def prepare_graph(self, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                      windows: set[int | None]) -> AttentionMetadata:
        rows = list(range(len(slots)))  # the host-side fields only say "every row decodes"
        return AttentionMetadata(
            query_start=[*rows, len(rows)], context_lens=[1] * len(rows), slot_mapping=slots, block_tables=tables,
            context_lens_t=lens, decode_seqs=rows, prefill_seqs=[], backend=self,
            decode=self.decode_masks(tables, lens, block_size, windows))

    # -- block masks ------------------------------------------------------------------------------------------
    def _scatter_logical(self, tables: torch.Tensor, nblocks: torch.Tensor) -> None:
        """logical[tables[s, i]] = i for every block a sequence uses (padding entries go to the spare entry)."""
        col = torch.arange(tables.shape[1], device=tables.device)
        used = col[None, :] < nblocks[:, None]
        index = torch.where(used, tables, self.pad).reshape(-1)
        self.logical.scatter_(0, index, col.to(torch.int32).expand(tables.shape).reshape(-1))

    def decode_masks(self, tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                     windows: set[int | None]) -> dict[int | None, BlockMask]:
        """Per window, the block mask of a batch of decode rows: row b visits its table's blocks from the first
        its window reaches; tensor operations only (capturable). A row with length 0 (graph padding) visits none."""
        bs, kv_len = block_size, self.pad * block_size
        nblocks = (lens + bs - 1) // bs
        self._scatter_logical(tables, nblocks)
        col = torch.arange(tables.shape[1], device=tables.device)
        masks = {}
        for window in windows:
            first = torch.zeros_like(lens) if window is None else (lens - window).clamp(min=0) // bs
            visit = tables.gather(1, (first[:, None] + col[None, :]).clamp(max=tables.shape[1] - 1))
            masks[window] = BlockMask.from_kv_blocks(
                (nblocks - first).to(torch.int32)[:, None, None], self._wide(visit.to(torch.int32))[:, None, None],
                BLOCK_SIZE=(Q_TILE, bs),
                mask_mod=_decode_mask(self.logical, lens, bs, window, None if self.compiled else tables),
                seq_lengths=(1, kv_len), **_NO_Q_BLOCKS)
        return masks

    def mixed_masks(self, meta: AttentionMetadata, block_size: int,
                    windows: set[int | None]) -> dict[int | None, BlockMask]:
        """Per window, the block mask of a step's flattened query rows: each tile of Q_TILE queries visits the
        blocks its sequences reach (built on the host: such steps are never captured)."""
        bs, dev = block_size, meta.block_tables.device
        qs, lens = meta.query_start, meta.context_lens
        tables = meta.block_tables.tolist()
        seq_of: list[int] = []
        qpos: list[int] = []
        for s, (a, b) in enumerate(itertools.pairwise(qs)):
            seq_of += [s] * (b - a)
            qpos += range(lens[s] - (b - a), lens[s])
        seq_t = torch.tensor(seq_of, dtype=torch.long, device=dev)
        qpos_t = torch.tensor(qpos, dtype=torch.long, device=dev)
        self._scatter_logical(meta.block_tables, (meta.context_lens_t + bs - 1) // bs)
        total, tiles = qs[-1], -(-qs[-1] // Q_TILE)
        masks = {}
        for window in windows:
            visits: list[list[int]] = []
            s = 0
            for t in range(tiles):
                lo, hi = t * Q_TILE, min(total, (t + 1) * Q_TILE)
                blocks: set[int] = set()
                while qs[s + 1] <= lo:
                    s += 1
                r = s
                while r < len(lens) and qs[r] < hi:
                    a, b = max(lo, qs[r]), min(hi, qs[r + 1])
                    first_pos = qpos[a]
                    start = 0 if window is None else max(0, first_pos - window + 1) // bs
                    blocks.update(tables[r][start : qpos[b - 1] // bs + 1])
                    r += 1
                visits.append(sorted(blocks))
            width = max(len(v) for v in visits)
            index = torch.tensor([v + [0] * (width - len(v)) for v in visits], dtype=torch.int32, device=dev)
            count = torch.tensor([len(v) for v in visits], dtype=torch.int32, device=dev)
            masks[window] = BlockMask.from_kv_blocks(
                count[None, None], self._wide(index)[None, None], BLOCK_SIZE=(Q_TILE, bs),
                mask_mod=_mixed_mask(self.logical, meta.block_tables, seq_t, qpos_t, bs, window),
                seq_lengths=(total, self.pad * bs), **_NO_Q_BLOCKS)
        return masks

    def _wide(self, index: torch.Tensor) -> torch.Tensor:
        """Block lists padded to the whole cache's width off CUDA: torch's C++ kernel wants a mask as wide as the
        key sequence (Triton's reads only the listed count; there the lists stay as wide as the tables)."""
        if index.is_cuda or index.shape[-1] >= self.pad:
            return index
        return torch.nn.functional.pad(index, (0, self.pad - index.shape[-1]))

    # -- attention --------------------------------------------------------------------------------------------
    def mixed(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
        """Every row of the step in one call, each query against the cache up to its own position."""
        keys, values = _cache_sequence(layer)
        out = self._flex(q.transpose(0, 1)[None], keys, values, meta.rows[layer.sliding_window], layer.scale)
        return out[0].transpose(0, 1)

    def decode(self, layer: Attention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A row's query heads that share a key head are that head's query rows (what FlexAttention's own decode
        kernel does): one program per row and key head reads its keys once, for the whole group, instead of one
        program per query head each reading them again."""
        keys, values = _cache_sequence(layer)
        b, hq, d = q.shape
        hkv = keys.shape[1]
        group = hq // hkv
        out = self._flex(q.view(b, hkv, group, d), keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1),
                         self._group_mask(meta, layer.sliding_window, group), layer.scale)
        return out.reshape(b, hq, d)

    @staticmethod
    def _group_mask(meta: AttentionMetadata, window: int | None, group: int) -> BlockMask:
        """The step's decode mask for `group` query rows a batch entry (the mask function reads only the row's
        batch index, so the lists serve any number of query rows); made once a step and kept for its layers."""
        mask = meta.decode[window]
        if group == 1:
            return mask
        key = (window, group)
        if key not in meta.decode:
            meta.decode[key] = BlockMask.from_kv_blocks(
                mask.kv_num_blocks, mask.kv_indices, BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask.mask_mod,
                seq_lengths=(group, mask.seq_lengths[1]), **_NO_Q_BLOCKS)
        return meta.decode[key]

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
              scale: float) -> torch.Tensor:
        # Triton's key tile must divide the cache block. Decode rows take the main kernel too (its decode kernel
        # wants a static batch and a power-of-two head group), which picks its tile from the head size alone.
        options = {"BLOCK_N": math.gcd(64, mask.BLOCK_SIZE[1])} if q.is_cuda else None
        return self._attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                            kernel_options=options)


def _cache_sequence(layer: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's whole cache as one key (value) sequence, [1, Hkv, blocks * block_size, D]: a view."""
    hkv, d = layer.num_kv_heads, layer.head_dim
    return (layer.k_cache.view(1, -1, hkv, d).transpose(1, 2), layer.v_cache.view(1, -1, hkv, d).transpose(1, 2))


def _decode_mask(logical: torch.Tensor, lens: torch.Tensor, bs: int, window: int | None,
                 tables: torch.Tensor | None) -> Mask:
    """Row b sees positions below lens[b] (and within the window). Compiled, the kernel visits only row b's
    blocks; eager FlexAttention scores every key of the cache, so there (`tables` given) the block's owner is
    checked too."""
    width = 0 if tables is None else tables.shape[1]

    def mask(b, h, q, kv):
        block = kv // bs
        pos = logical[block] * bs + kv % bs
        seen = pos < lens[b]
        if tables is not None:
            seen = seen & (tables[b, logical[block].clamp(0, width - 1)] == block)
        return seen if window is None else seen & (pos >= lens[b] - window)
    return mask


def _mixed_mask(logical: torch.Tensor, tables: torch.Tensor, seq_of: torch.Tensor, qpos: torch.Tensor, bs: int,
                window: int | None) -> Mask:
    """Query q (of sequence seq_of[q], at position qpos[q]) sees a cached key when the key's block is in its
    sequence's table and the key is not after it (and within the window)."""
    width = tables.shape[1]

    def mask(b, h, q, kv):
        block = kv // bs
        index = logical[block]
        own = tables[seq_of[q], index.clamp(0, width - 1)] == block
        pos = index * bs + kv % bs
        seen = own & (pos <= qpos[q])
        return seen if window is None else seen & (pos > qpos[q] - window)
    return mask
