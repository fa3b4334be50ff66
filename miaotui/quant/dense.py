"""Dense weights: torch's own product, oneDNN's blocked layout, and AMX tile order — `dense_weight` picks the fastest
this device has for a weight of this dtype."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from miaotui.kernels import cpu_ops, has_amx, pages, use_cpu_ops
from miaotui.quant.base import StackWeight, add_bias

SMALL_ROWS = 16  # fp32 products of up to this many rows run on miaotui's kernel on CPU


class DenseWeight:
    """A float weight multiplied by torch (any device, any dtype): the reference every other format is held to.
    On CPU an fp32 product of a few rows (decode) runs on miaotui's kernel (ops.cpp `dense_matmul`): torch's (MKL)
    reads the weight at a fraction of memory bandwidth on AMD CPUs from 2 rows on (2-8x slower at 1-16 rows)."""

    def __init__(self, w: torch.Tensor):
        self.weight = w
        self.shape = tuple(w.shape)
        self.streams = w.dtype == torch.float32 and w.is_cpu and w.is_contiguous()  # dense_matmul reads it in place

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (self.streams and x.dtype == torch.float32 and x.numel() <= SMALL_ROWS * x.shape[-1]
                and (ops := use_cpu_ops(x))):
            y = ops.dense_matmul(x.reshape(-1, x.shape[-1]), self.weight)
            return add_bias(y.view(*x.shape[:-1], y.shape[-1]), bias)
        return F.linear(x, self.weight, bias)  # the bias inside torch's product, as torch's own Linear adds it

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def kernel(self) -> None:
        return None

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def onednn_rows(rows: int) -> int:
    """The row count a oneDNN product of `rows` rows runs at: exact up to 16 (decode), above that rounded up to one
    of 8 sizes per octave (at most 12.5% padding). oneDNN keeps state for every product shape it meets (0.3-2 MB
    each, kept after its primitive cache is emptied), so a server whose steps take every length grew by hundreds of
    MB (the soak: +13% in 30 s); rounded, a weight meets at most 72 shapes up to 2048 rows (~45 MB for all of them,
    measured on AVX-512 bf16)."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class OneDNNWeight:
    """A bf16/fp32 weight reordered once into oneDNN's blocked layout: 2x faster at decode-sized inputs on CPU."""

    def __init__(self, w: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.shape = tuple(w.shape)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat, padded = x.reshape(rows, x.shape[-1]), onednn_rows(rows)
        if padded != rows:
            flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")[:rows]
        return add_bias(y.view(*x.shape[:-1], self.shape[0]), bias)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError("a oneDNN-packed weight is not an embedding table")

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.shape[1], dtype=self.packed.dtype)
        return self.matmul(eye).float().t()

    def kernel(self) -> None:
        return None  # oneDNN's own

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.packed.element_size()


class TiledWeight:
    """A bf16 weight kept in the AMX tile unit's order, multiplied by miaotui's kernel (qmatmul.cpp `tile_matmul`):
    [N/16 strips][K/32 blocks][16 lines][16 rows x 2 inputs]. Nothing is reordered or widened per call and the strips
    are prefetched as they stream, so a 32-row product (a batch-32 decode step) takes about half of oneDNN's time;
    at prefill sizes the two are level."""

    def __init__(self, w: torch.Tensor):
        n, k = w.shape
        rows = -(-n // 16) * 16
        w = w.to(torch.bfloat16)
        if rows != n:
            w = torch.cat([w, w.new_zeros(rows - n, k)])
        self.tiles = pages.copy(w.view(rows // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4))  # streamed: 2 MB pages
        self.shape = (n, k)

    @staticmethod
    def fits(w: torch.Tensor) -> bool:
        return w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.shape[1] % 32 == 0 and has_amx()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return add_bias(cpu_ops().tile_matmul(x, self.tiles, self.shape[0]), bias)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError("a tiled weight is not an embedding table")

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        return self.tiles.permute(0, 3, 1, 2, 4).reshape(-1, k)[:n].float()

    def kernel(self) -> StackWeight:
        return StackWeight(tiles=self.tiles)

    @property
    def nbytes(self) -> int:
        return self.tiles.numel() * 2


@functools.cache
def onednn_bf16() -> bool:
    """oneDNN reorders bf16 weights only on CPUs with native bf16 conversions (AVX-512 BW/VL/DQ or AVX-NE-CONVERT);
    elsewhere `_reorder_linear_weight` raises, and torch's own bf16 product is the fallback."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 32, dtype=torch.bfloat16), 1)
        return True
    except RuntimeError:
        return False


def dense_weight(w: torch.Tensor) -> DenseWeight | OneDNNWeight | TiledWeight:
    """A float weight in the layout of the fastest product this device has for it: miaotui's tiles where there is
    AMX, oneDNN's blocked bf16 layout where it works, else torch's own product."""
    if TiledWeight.fits(w):
        return TiledWeight(w)
    if w.device.type == "cpu" and w.dtype == torch.bfloat16 and onednn_bf16():
        return OneDNNWeight(w)
    return DenseWeight(w)
