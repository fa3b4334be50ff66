"""Weight-only quantization as a model transformation: each Linear's float weight is replaced, once at load time,
by a packed low-bit weight that torch's own kernels multiply directly (never dequantized per step).

- int8: per-output-channel symmetric scales, `aten._weight_int8pack_mm`.
- int4: asymmetric groups of 32/64/128 along the input dimension, `aten._weight_int4pack_mm_for_cpu`. The kernel
  computes w = (q - 8) * scale + zero, so a group with minimum `lo` and step `scale` stores zero = lo + 8 * scale;
  a GGUF Q4_1 block (w = d * q + m) maps onto this exactly with scale = d, zero = m + 8d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miaotui.errors import MiaotuiError

METHODS = ("none", "int8", "int4", "auto")


@dataclass
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N], activation dtype

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        w = w.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(dtype))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, self.q, scales)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * self.scales.element_size()


@dataclass
class Int4Weight:
    packed: torch.Tensor
    scales_zeros: torch.Tensor  # [K // group, N, 2], bf16
    group: int
    shape: tuple[int, int]

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int) -> Int4Weight:
        n, k = w.shape
        g = w.float().reshape(n, k // group, group)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
        return cls.from_codes(q, scale.reshape(n, -1), (lo + 8 * scale).reshape(n, -1), group)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> Int4Weight:
        """q [N, K] in 0..15, scale and zero [N, K // group]: w = (q - 8) * scale + zero."""
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        return cls(packed, sz, group, tuple(q.shape))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # the common case: skip two no-op casts on the decode hot path
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group,
                                                       self.scales_zeros)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
        return self.matmul(eye).float().t()

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise MiaotuiError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if group_size not in (32, 64, 128):
        raise MiaotuiError(f"int4 group size must be 32, 64 or 128, got {group_size}")


def quantize_weight(w: torch.Tensor, method: str, group_size: int = 32, dtype: torch.dtype = torch.bfloat16):
    if method == "int8":
        return Int8Weight.from_float(w, dtype)
    if w.shape[1] % group_size:
        return Int8Weight.from_float(w, dtype)  # rows that do not split into groups fall back to int8
    return Int4Weight.from_float(w, group_size)


def quantize_model(model: nn.Module, method: str, group_size: int = 32) -> None:
    """Replace every Linear's weight (and a separate copy of a tied output head) by its quantized form."""
    from miaotui.layers.linear import Linear

    check_method(method, group_size)
    if method == "none":
        return
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise MiaotuiError(f"{method} quantization runs on the CPU kernels only for now; use --quantization none "
                           "on CUDA")
    dtype = next(model.parameters()).dtype
    head = model.lm_head
    if not isinstance(head, Linear):  # tied to the embedding table, which lookups still need in float
        model.head_quant = quantize_weight(head.weight.data, method, group_size, dtype)
    for module in list(model.modules()):
        if isinstance(module, Linear) and module.quant is None:
            module.quant = quantize_weight(module.weight.data, method, group_size, dtype)
            module.weight = None
    if isinstance(head, Linear):
        model.head_quant = head.quant
