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
        # Normalise in fp32 as the reference implementations do; low-precision sums drift on long rows.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, built on the meta device like the rest of the model."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
