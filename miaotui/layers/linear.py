"""Linear and embedding layers whose weights are allocated, not initialised: the loader fills them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels import cpu_ops
from miaotui.kernels.packed import StackWeight, amx

if TYPE_CHECKING:
    from miaotui.loader.dequant import BlockCodes


class Linear(nn.Module):
    """y = x Wᵀ + b. `output_sizes` names the parts of a fused projection (q|k|v, gate|up) for loading."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        out = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        self.quant = None  # a packed weight (dense_weight, or low-bit from compress/quantize.py) replacing `weight`
        self.codes: dict[int, BlockCodes] | None = None  # per part: the file's integer codes, for quantization
        self.file_bits = 0  # bits per weight the file stored this projection with (16 for float files)
        self.activation_aware = True  # int4 may scale input channels by calibration statistics (quantize.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant.matmul(x)
        return y if self.bias is None else y + self.bias

    def kernel(self) -> StackWeight | None:
        """What `forward` hands miaotui's own kernels, if it runs on them: the C++ decode stack takes the same."""
        return None if self.quant is None else self.quant.kernel()

    def load(self, name: str, w: torch.Tensor, shard: int = 0) -> None:
        """Copy a checkpoint tensor (weight or bias) into part `shard` of this projection."""
        start = sum(self.output_sizes[:shard])
        target = self.weight if name == "weight" else self.bias
        target.data[start : start + self.output_sizes[shard]].copy_(w)
        if name != "weight":
            return  # a bias is float in every file: it says nothing about the weight's precision
        self.file_bits = max(self.file_bits, getattr(w, "file_bits", 16))
        codes = getattr(w, "codes", None)
        if codes is not None:
            self.codes = {**(self.codes or {}), shard: codes}


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.quant = None  # an int8 table (compress/quantize.py) replacing `weight`
        self.dtype = self.weight.dtype  # of the rows it gives, also once `quant` replaces `weight`
        self.codes: BlockCodes | None = None  # the file's integer codes, for quantization

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) if self.quant is None else self.quant.lookup(ids, self.dtype)


class OneDNNWeight:
    """A bf16/fp32 weight reordered once into oneDNN's blocked layout: 2x faster at decode-sized inputs on CPU."""

    def __init__(self, w: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.shape = tuple(w.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def kernel(self) -> None:
        return None  # oneDNN's own


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
        self.tiles = w.view(rows // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()
        self.shape = (n, k)

    @staticmethod
    def fits(w: torch.Tensor) -> bool:
        return w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.shape[1] % 32 == 0 and amx()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_ops().tile_matmul(x, self.tiles, self.shape[0])

    def kernel(self) -> StackWeight:
        return StackWeight(tiles=self.tiles)


def dense_weight(w: torch.Tensor) -> TiledWeight | OneDNNWeight:
    """A bf16 weight in the layout of the fastest product this CPU has for it: miaotui's tiles where there is AMX."""
    return TiledWeight(w) if TiledWeight.fits(w) else OneDNNWeight(w)


def prepack_for_cpu(model: nn.Module) -> bool:
    """Reorder every bf16 Linear weight (and the output head) for the CPU's fastest product (`dense_weight`);
    False where neither kernel is available."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    for module in list(model.modules()):
        if isinstance(module, Linear) and module.quant is None:
            module.quant = dense_weight(module.weight.data)
            module.weight = None
    if getattr(model, "head_quant", None) is None:
        head = model.lm_head
        model.head_quant = head.quant if isinstance(head, Linear) else dense_weight(head.weight.data)
    return True
