"""The one contract every weight format keeps, and what a format hands a fused kernel.

A weight format is how one matrix is held and multiplied: dense (torch's own product, oneDNN's packed layout, AMX
tile order), or low-bit codes (int8, int4, a hybrid of int4 and dense). Layers hold a format and call `matmul`
(or `lookup`, for an embedding table); the recipe (quant/recipe.py) decides which tensor gets which format, once,
at load time; the fused decode stack (engine/fused.py) takes what `kernel()` hands it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from miaotui.quant.packed import PackedWeight


@runtime_checkable
class WeightFormat(Protocol):
    """A weight matrix W [N, K] in some layout."""

    shape: tuple[int, int]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ Wᵀ (+ bias) → [..., N], in x's dtype."""

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W as `dtype` (an embedding table read row by row)."""

    def dequantize(self) -> torch.Tensor:
        """W as fp32 (for export, tests and calibration)."""

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's own kernels, if it runs on them; None for torch's products."""

    @property
    def nbytes(self) -> int:
        """Bytes held."""


def add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


@dataclass
class StackWeight:
    """What a projection hands the C++ decode stack (cpu_ops `Proj`): low-bit codes (`packed`, the input times
    `in_scale` first) and/or the bf16 weight in tile order (`tiles`, taking over from `tile_rows` rows), and up to
    how many rows the pair serves."""

    packed: PackedWeight | None = None
    in_scale: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    tile_rows: int = 0
    max_rows: int = sys.maxsize
