"""`hybrid`, what `auto` picks on a CPU with AMX for a small model's 4-bit file in bf16 (with activations in 16
bits; with 8 it picks `native`, recipe.resolve): the file's codes for the few-row products of decoding
(bandwidth-bound: 4x fewer bytes per token) beside a dense bf16 copy made from those codes for prefill and batches
(compute-bound). On CPUs with bf16 units and no AMX the codes' own bf16 product (kernels/qmatmul.cpp) prefills as
fast as a oneDNN copy, so `auto` keeps them alone there; the class takes either copy."""

from __future__ import annotations

import sys

import torch

from miaotui.kernels import use_cpu_ops
from miaotui.quant.base import StackWeight
from miaotui.quant.dense import DenseWeight, OneDNNWeight, TiledWeight
from miaotui.quant.int4 import Int4Weight
from miaotui.quant.int8 import Int8Weight


class HybridWeight:
    """int4 for the few-row products of decoding (bandwidth-bound: 4x fewer bytes per token), a
    dense bf16 copy (`dense_weight`) for prefill and batches, which are compute-bound. Where the CPU has AMX the copy
    is miaotui's tile-order one; all 120 projections of SmolLM2 took here, at 1 / 4 / 8 / 16 / 32 rows, 3.7 / 5.0 /
    8.1 / 9.3 / 14.2 ms on int4 (VNNI below 8 rows, widened to bf16 tiles from 8) and 8.6 / 8.9 / 8.5 / 9.3 / 12.2
    ms on the bf16 tiles (streaming 214 MB at the machine's read bandwidth), so the switch sits at 8 rows.
    Elsewhere the copy is oneDNN's, and 4-bit codes serve up to SMALL_BATCH rows: a batch's decode step then runs in
    the fused stack (engine/fused.py) on VNNI, where the copy's products run module by module (AVX-512 Zen 4, SmolLM2,
    32 x (64 in, 128 out) alternating in one process: 937 tok/s at 32 rows against 864 at 12). 8-bit codes (the
    output head) cost what the 4-bit ones do per row, but the copy's product needs no widening: it wins from ~20 rows
    (SmolLM2's head at 8 / 16 / 24 / 32 rows: 2.2 / 3.3 / 4.8 / 6.8 ms on its codes, 2.8 / 3.4 / 4.6 / 6.1 ms on the
    copy), so they serve up to SMALL_BATCH_8BIT. With activations in one int8 term (`--activation-bits 8`) the codes'
    products take ~0.65 the time and beat oneDNN's copy at every size (AVX-512 Zen 4, SmolLM2 at 32 / 64 / 512 rows:
    head 3.9 / 7.6 / 69 ms against 5.9 / 10.0 / 80, gate|up 0.24 / 0.48 / 3.3 against 0.33 / 0.60 / 4.2), so there
    they serve every batch, prefill included. A step that scores speculative proposals (`kernels.row_exact`)
    stays on the codes at any size, so its rows give what one-row steps give."""

    SMALL_BATCH = 32
    SMALL_BATCH_8BIT = 16
    SMALL_BATCH_TILES = 7

    def __init__(self, small: Int4Weight | Int8Weight, dense: DenseWeight | OneDNNWeight | TiledWeight):
        self.small, self.dense = small, dense
        self.shape = dense.shape

    @property
    def small_batch(self) -> int:
        """The most rows the codes serve (read per product: `recipe.round_activations` may change the rounding)."""
        fast = self.small.fast
        if isinstance(self.dense, TiledWeight) and fast is not None:
            return self.SMALL_BATCH_TILES
        if fast is not None and fast.act_bits == 8:
            return sys.maxsize
        return self.SMALL_BATCH_8BIT if isinstance(self.small, Int8Weight) else self.SMALL_BATCH

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        small = x.shape[0] <= self.small_batch or ((ops := use_cpu_ops(x)) is not None and ops.row_exact())
        return (self.small if small else self.dense).matmul(x, bias)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.small.lookup(ids, dtype)

    def dequantize(self) -> torch.Tensor:
        return self.dense.dequantize()

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernels: the packed weight (and the tiles past `small_batch` rows)."""
        k = self.small.kernel()
        if k is None:
            return None
        if (tiles := self.dense.kernel()) is None:
            return StackWeight(k.packed, k.in_scale, max_rows=self.small_batch)
        return StackWeight(k.packed, k.in_scale, tiles.tiles, self.small_batch + 1)

    @property
    def nbytes(self) -> int:
        return self.small.nbytes + self.dense.nbytes
