"""The attention layer of a model: its heads, scale, window and views of the KV cache. How it reads and writes the
cache is the step's attention backend's business (attention/), named by the metadata the runner hands it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from miaotui.attention.base import AttentionMetadata


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
        # int8 cache only: [num_blocks, block_size, num_kv_heads, 1] scales in the model's dtype.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the step's flattened tokens → [T, Hq, D]."""
        return meta.backend.forward(self, q, k, v, meta)
