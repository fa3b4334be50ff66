"""Attention over the paged KV cache, in plain torch (CPU and CUDA alike).

Each layer writes this step's keys and values into its cache slots, then attends: sequences decoding one token are
batched into one padded SDPA call over their gathered blocks; prefill chunks are computed one sequence at a time with
`scaled_dot_product_attention`. The model code only calls `Attention.forward(q, k, v)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.context import ForwardContext, get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # [num_blocks, block_size, num_kv_heads, head_dim] each; handed over by the model runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's flattened tokens → [T, Hq, D]."""
        ctx = get_context()
        if self.k_cache is None:
            raise RuntimeError("attention has no KV cache; the model runner allocates it")
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        kc.index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        if len(ctx.decode_seqs) == ctx.num_seqs:  # a pure decode step (the common case): no scatter needed
            return self._decode(ctx, q)
        if len(ctx.prefill_seqs) == 1 and ctx.num_seqs == 1:
            return self._prefill(ctx, 0, q, k, v)
        out = torch.empty_like(q)
        if ctx.decode_seqs:
            rows = torch.tensor([ctx.query_start[s] for s in ctx.decode_seqs], device=q.device)
            out[rows] = self._decode(ctx, q[rows])
        for s in ctx.prefill_seqs:
            out[ctx.query_start[s] : ctx.query_start[s + 1]] = self._prefill(ctx, s, q, k, v)
        return out

    def _decode(self, ctx: ForwardContext, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D]: one query token for each of ctx.decode_seqs."""
        seqs = ctx.decode_seqs
        if len(seqs) == ctx.num_seqs:
            tables, lens = ctx.block_tables, ctx.context_lens_t
        else:
            sel = torch.tensor(seqs, device=q.device)
            tables, lens = ctx.block_tables[sel], ctx.context_lens_t[sel]
        bs = self.k_cache.shape[1]
        tables = tables[:, : (max(ctx.context_lens[s] for s in seqs) + bs - 1) // bs]
        b = tables.shape[0]
        # Gather each sequence's blocks into [B, Hkv, L, D] views; SDPA reads them strided, no copy.
        flat = tables.reshape(-1)
        keys = self.k_cache.index_select(0, flat).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self.v_cache.index_select(0, flat).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(keys.shape[2], device=q.device)
        allowed = pos[None, :] < lens[:, None]
        if self.sliding_window is not None:
            allowed &= pos[None, :] > lens[:, None] - 1 - self.sliding_window
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        res = F.scaled_dot_product_attention(q.view(b, self.num_heads, 1, self.head_dim), keys, values,
                                             attn_mask=allowed[:, None, None, :], scale=self.scale, enable_gqa=True)
        return res.view(b, self.num_heads, self.head_dim)

    def _prefill(self, ctx: ForwardContext, s: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The queries of sequence s (a prompt chunk) against its cached prefix and themselves."""
        start, end = ctx.query_start[s], ctx.query_start[s + 1]
        n_q, n_kv = end - start, ctx.context_lens[s]
        if n_kv == n_q:  # nothing cached before this chunk: attend to the step's own keys
            keys, values = k[start:end], v[start:end]
        else:
            bs = self.k_cache.shape[1]
            table = ctx.block_tables[s, : (n_kv + bs - 1) // bs]
            keys = self.k_cache.index_select(0, table).view(-1, self.num_kv_heads, self.head_dim)[:n_kv]
            values = self.v_cache.index_select(0, table).view(-1, self.num_kv_heads, self.head_dim)[:n_kv]
        # 4-D inputs take torch's fused CPU kernel (3-D ones fall back to a ~10x slower path).
        qt = q[start:end].transpose(0, 1)[None]  # [1, Hq, n_q, D]
        kt = keys.transpose(0, 1)[None].to(q.dtype)
        vt = values.transpose(0, 1)[None].to(q.dtype)
        if n_kv == n_q and (self.sliding_window is None or n_kv <= self.sliding_window):
            res = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            q_pos = torch.arange(n_kv - n_q, n_kv, device=q.device)
            k_pos = torch.arange(n_kv, device=q.device)
            allowed = k_pos[None, :] <= q_pos[:, None]
            if self.sliding_window is not None:
                allowed &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
            res = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=self.scale, enable_gqa=True)
        return res[0].transpose(0, 1)
