"""Linear and embedding layers whose weights are allocated, not initialised: the loader fills them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x Wᵀ + b. `output_sizes` names the parts of a fused projection (q|k|v, gate|up) for loading."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.quant = None  # a packed low-bit weight (compress/quantize.py) that replaces `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant.matmul(x)
        return y if self.bias is None else y + self.bias

    def load(self, name: str, w: torch.Tensor, shard: int = 0) -> None:
        """Copy a checkpoint tensor (weight or bias) into part `shard` of this projection."""
        start = sum(self.output_sizes[:shard])
        target = self.weight if name == "weight" else self.bias
        target.data[start : start + self.output_sizes[shard]].copy_(w)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
