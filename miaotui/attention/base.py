"""Attention over the paged KV cache: the per-step metadata and the interface every backend keeps.

The runner builds one `AttentionMetadata` per step (`backend.prepare`), before the forward pass, and hands it to
the model explicitly; each attention layer then calls `backend.forward` with it. A backend writes this step's
keys and values into their cache slots and attends: decode rows (one query token per sequence) in its own way,
prompt chunks through `prefill` (shared here: miaotui's bf16 kernel where the CPU has bf16 units, else torch's
SDPA). A new backend (CUDA, another CPU class) is one new file.

With an int8 cache (`kv_cache_dtype="int8"`) every cached token keeps one scale per head (its absolute maximum
/ 127): keys and values are quantized as they are written and dequantized blockwise as they are read, which
halves the cache of a bf16 model (a quarter of an fp32 one) at a small, measured cost in perplexity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from miaotui.kernels import use_cpu_ops

if TYPE_CHECKING:
    from miaotui.layers.attention import Attention


@dataclass(slots=True)
class AttentionMetadata:
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
    prefill_seqs: list[int]  # the rest
    backend: AttentionBackend
    decode: Any = None  # what the backend prepared for the decode rows (the same for every layer)
    rows: Any = None  # what a backend that attends to all of a mixed step's rows in one call prepared for them

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def all_decode(self) -> bool:
        return len(self.decode_seqs) == self.num_seqs


class AttentionBackend(ABC):
    name: str
    capturable = False  # whether `prepare_graph` builds decode metadata a CUDA graph can capture

    def prepare_graph(self, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, block_size: int,
                      windows: set[int | None]) -> AttentionMetadata:
        """A pure decode step's metadata from tensors alone (no host lists, no synchronisation), for a captured
        step whose inputs change between replays; rows of length 0 are padding."""
        raise NotImplementedError(f"the {self.name} backend cannot be captured in a CUDA graph")

    def prepare(self, query_start: list[int], context_lens: list[int], slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, windows: set[int | None],
                dtype: torch.dtype) -> AttentionMetadata:
        """The step's metadata, with what every layer's decode rows need computed once (`windows`: the sliding
        windows the model's layers use, None for full attention)."""
        num_tokens = [e - s for s, e in zip(query_start, query_start[1:])]
        meta = AttentionMetadata(
            query_start=query_start, context_lens=context_lens, slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens_t=torch.tensor(context_lens, dtype=torch.long, device=block_tables.device),
            decode_seqs=[i for i, n in enumerate(num_tokens) if n == 1],
            prefill_seqs=[i for i, n in enumerate(num_tokens) if n > 1], backend=self)
        if meta.decode_seqs:
            meta.decode = self.prepare_decode(meta, block_size, windows, dtype)
        return meta

    @abstractmethod
    def prepare_decode(self, meta: AttentionMetadata, block_size: int, windows: set[int | None],
                       dtype: torch.dtype) -> Any:
        """What `decode` needs for the step's decode rows, shared by every layer."""

    @abstractmethod
    def decode(self, layer: Attention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [B, Hq, D]: one query token for each of meta.decode_seqs, against its cached keys."""

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's flattened tokens → [T, Hq, D]."""
        if layer.k_cache is None:
            raise RuntimeError("attention has no KV cache; the model runner allocates it")
        write_kv(layer, meta.slot_mapping, k, layer.k_cache, layer.k_scale)
        write_kv(layer, meta.slot_mapping, v, layer.v_cache, layer.v_scale)
        if meta.all_decode:  # a pure decode step (the common case): no scatter needed
            return self.decode(layer, q, meta)
        return self.mixed(layer, q, k, v, meta)

    def mixed(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
        """A step with prompt chunks (its keys and values already cached): decode rows as `decode` does them, the
        chunks through `prefill`."""
        if meta.num_seqs == 1:
            return prefill(layer, meta, 0, q, k, v)
        out = torch.empty_like(q)
        if meta.decode_seqs:
            rows = torch.tensor([meta.query_start[s] for s in meta.decode_seqs], device=q.device)
            out[rows] = self.decode(layer, q[rows], meta)
        seqs, i = meta.prefill_seqs, 0
        while i < len(seqs):  # runs of fresh prompts of one length go through attention as one batch
            n, j = _fresh(layer, meta, seqs[i]), i + 1
            while n and j < len(seqs) and seqs[j] == seqs[j - 1] + 1 and _fresh(layer, meta, seqs[j]) == n:
                j += 1
            start, end = meta.query_start[seqs[i]], meta.query_start[seqs[j - 1] + 1]
            out[start:end] = prefill(layer, meta, seqs[i], q, k, v) if j == i + 1 else _prefill_fresh(
                layer, q[start:end], k[start:end], v[start:end], j - i)
            i = j
        return out


def write_kv(layer: Attention, slots: torch.Tensor, x: torch.Tensor, cache: torch.Tensor,
             scale: torch.Tensor | None) -> None:
    """This step's keys (or values) into their cache slots; an int8 cache quantizes them per token and head."""
    cache = cache.view(-1, layer.num_kv_heads, layer.head_dim)
    if scale is None:
        cache.index_copy_(0, slots, x.to(cache.dtype))
        return
    # Quantize against the scale as stored (rounded to the model's dtype), clamped: a rounded-down scale
    # would otherwise push the largest element to 128, which wraps around in int8.
    s = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=1e-8).to(scale.dtype)
    scale.view(-1, layer.num_kv_heads, 1).index_copy_(0, slots, s)
    cache.index_copy_(0, slots, torch.round(x.float() / s.float()).clamp(-127, 127).to(torch.int8))


def read_kv(layer: Attention, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the listed blocks, [len(blocks) * block_size, Hkv, D] each, in `dtype`."""
    out = []
    for cache, scale in ((layer.k_cache, layer.k_scale), (layer.v_cache, layer.v_scale)):
        x = cache.index_select(0, blocks)
        if scale is not None:
            x = x.to(dtype) * scale.index_select(0, blocks)
        out.append(x.view(-1, layer.num_kv_heads, layer.head_dim).to(dtype))
    return out[0], out[1]


def _fresh(layer: Attention, meta: AttentionMetadata, s: int) -> int:
    """Sequence s's token count if this step computes all its tokens (nothing cached before, no int8 cache to read
    back) and no window cuts into them; else 0."""
    n = meta.query_start[s + 1] - meta.query_start[s]
    fresh = n == meta.context_lens[s] and layer.k_scale is None
    return n if fresh and (layer.sliding_window is None or n <= layer.sliding_window) else 0


def _own_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scale: float) -> torch.Tensor | None:
    """Prompts' causal attention on miaotui's bf16 kernel (kernels/attention.cpp) where it runs: bf16 on a CPU with
    bf16 units. A Qwen2.5-1.5B 512-token prompt's heads there 3.7x torch's flash attention (Zen 4). q holds
    q.shape[0] / length prompts of `length` queries, k and v their keys (the queries' own last); None elsewhere."""
    ops = use_cpu_ops(q)
    if ops is None or not ops.prefill_attention_available or q.dtype != torch.bfloat16 or q.shape[-1] % 32:
        return None

    def rows(x: torch.Tensor) -> torch.Tensor:  # each token's heads contiguous, as the kernel reads them
        return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.stride(0) % 2 == 0 else x.contiguous()

    return ops.prefill_attention(rows(q), rows(k), rows(v), length, scale)


def _prefill_fresh(layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int) -> torch.Tensor:
    """`count` fresh prompts of one length, side by side in q/k/v: one call over all of them (a wave of 32 prompts
    of 64 tokens made 32 SDPA calls a layer, ~75 us each): miaotui's kernel, else torch's causal SDPA."""
    if (res := _own_kernel(q, k, v, q.shape[0] // count, layer.scale)) is not None:
        return res

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(count, -1, x.shape[1], x.shape[2]).transpose(1, 2)

    res = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=layer.scale,
                                         enable_gqa=True)
    return res.transpose(1, 2).reshape(q.shape)


def prefill(layer: Attention, meta: AttentionMetadata, s: int, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
    """The queries of sequence s (a prompt chunk) against its cached prefix and themselves."""
    start, end = meta.query_start[s], meta.query_start[s + 1]
    n_q, n_kv = end - start, meta.context_lens[s]
    window = layer.sliding_window
    if n_kv == n_q and layer.k_scale is None:  # nothing cached before: attend to the step's own keys
        # (an int8 cache is always read back, so a prompt sees the same keys however it was chunked)
        keys, values = k[start:end], v[start:end]
    else:
        bs = layer.k_cache.shape[1]
        table = meta.block_tables[s, : (n_kv + bs - 1) // bs]
        keys, values = read_kv(layer, table, q.dtype)
        keys, values = keys[:n_kv], values[:n_kv]
    if window is None or n_kv <= window:  # no window cuts into the keys: miaotui's kernel where it runs
        if (res := _own_kernel(q[start:end], keys, values, n_q, layer.scale)) is not None:
            return res
    # 4-D inputs take torch's fused CPU kernel (3-D ones fall back to a ~10x slower path).
    qt = q[start:end].transpose(0, 1)[None]  # [1, Hq, n_q, D]
    kt = keys.transpose(0, 1)[None]
    vt = values.transpose(0, 1)[None]
    if n_kv == n_q and (window is None or n_kv <= window):
        res = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=layer.scale, enable_gqa=True)
    else:
        q_pos = torch.arange(n_kv - n_q, n_kv, device=q.device)
        k_pos = torch.arange(n_kv, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        res = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=layer.scale, enable_gqa=True)
    return res[0].transpose(0, 1)


def decode_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables and context lengths of the step's decoding sequences."""
    if meta.all_decode:
        return meta.block_tables, meta.context_lens_t
    sel = torch.tensor(meta.decode_seqs, device=meta.block_tables.device)
    return meta.block_tables[sel], meta.context_lens_t[sel]
