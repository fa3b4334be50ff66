"""Decode on the CPU through miaotui's paged-attention kernel (kernels/ops.cpp): the cache rows are read in
place, block by block, with no gather and no mask; the query heads of a kv head share every row they read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from miaotui.attention.base import AttentionBackend, AttentionMetadata, decode_rows
from miaotui.kernels import cpu_ops

if TYPE_CHECKING:
    from miaotui.layers.attention import Attention


class CPUPagedBackend(AttentionBackend):
    name = "cpu-paged"

    def prepare_decode(self, meta: AttentionMetadata, block_size: int, windows: set[int | None],
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_rows(meta)

    def decode(self, layer: Attention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tables, lens = meta.decode
        return cpu_ops().paged_attention(q.contiguous(), layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale,
                                         tables, lens, layer.scale, layer.sliding_window or 0)
