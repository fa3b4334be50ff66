"""Linear and embedding layers. Each holds its matrix in a weight format (quant/) that the recipe picks once at load
time; until then it holds the checkpoint tensors it was loaded from, unread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from miaotui.errors import ModelFileError

if TYPE_CHECKING:
    from miaotui.loader.tensors import FileTensor
    from miaotui.quant.base import WeightFormat


class Linear(nn.Module):
    """y = x Wᵀ + b. `output_sizes` names the parts of a fused projection (q|k|v, gate|up), loaded one by one."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes)), requires_grad=False) if bias else None
        self.format: WeightFormat | None = None
        self.parts: dict[int, FileTensor] = {}  # the checkpoint's tensors for each part, until the recipe runs
        self.activation_aware = True  # int4 may scale input channels by calibration statistics (quant/recipe.py)
        self.all_reduce: Callable[[torch.Tensor], object] | None = None  # tensor parallel: sum the ranks' outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.format.matmul(x, self.bias)
        if self.all_reduce is not None:
            self.all_reduce(y)
        return y

    def load(self, kind: str, w: FileTensor, shard: int = 0) -> None:
        """Take part `shard` of this projection's weight (kept unread for the recipe) or bias (copied now)."""
        want = (self.output_sizes[shard], self.in_features) if kind == "weight" else (self.output_sizes[shard],)
        if kind not in ("weight", "bias") or (kind == "bias" and self.bias is None):
            raise ModelFileError(f"a {kind} tensor has no place in this projection")
        if tuple(w.shape) != want:
            raise ModelFileError(f"{kind} part {shard} has shape {tuple(w.shape)}, the model expects {want}")
        if kind == "weight":
            self.parts[shard] = w
            return
        start = sum(self.output_sizes[:shard])
        self.bias.data[start : start + self.output_sizes[shard]].copy_(w.values())


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.shape = (num_embeddings, dim)
        self.dtype = torch.get_default_dtype()  # of the rows it gives (the model's dtype)
        self.format: WeightFormat | None = None  # a dense table, or int8/int4 codes read row by row
        self.source: FileTensor | None = None  # the checkpoint's table, until the recipe runs

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.format.lookup(ids, self.dtype)

    def load(self, w: FileTensor) -> None:
        if tuple(w.shape) != self.shape:
            raise ModelFileError(f"embedding table has shape {tuple(w.shape)}, the model expects {self.shape}")
        self.source = w
