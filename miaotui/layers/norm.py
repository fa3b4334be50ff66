"""Normalisation layers. Weights are the multiplier itself (Gemma's `1 + w` is folded in at load time)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel accumulates in fp32 for bf16/fp16 inputs, as the reference implementations do.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, built on the meta device like the rest of the model."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
