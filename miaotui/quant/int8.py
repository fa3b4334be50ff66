"""int8 weights: per-output-channel symmetric scales (torch's `aten._weight_int8pack_mm`), or a file's integer
blocks of up to 8 bits held exactly as 8-bit codes (Q6_K as 6-bit ones) — in miaotui's packed layout
(quant/packed.py) wherever the CPU has its kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.loader.tensors import BlockCodes
from miaotui.quant.base import StackWeight, add_bias
from miaotui.quant.packed import PackedWeight


@dataclass
class Int8Weight:
    q: torch.Tensor | None  # [N, K] int8 for torch's kernel; None where `fast` holds the codes
    scales: torch.Tensor | None  # [N], activation dtype (per-row weights; None for a file's blocks)
    fast: PackedWeight | None = None  # miaotui's VNNI layout (codes + 128), where the CPU has it

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        w = w.float()
        # The kernel takes scales in the activation dtype: round them (up) first, then quantize against the
        # rounded value, so the error stays within half a step of the scale actually used.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        scales = (scales * (1 + 2**-7)).to(dtype).float()
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        fast = PackedWeight.pack(codes, scales[:, None], -128 * scales[:, None], 8)
        return cls(None if fast else q.contiguous(), scales.to(dtype), fast)

    @classmethod
    def from_codes(cls, codes: BlockCodes | None) -> Int8Weight | None:
        """A file's integer blocks of up to 8 bits (Q8_0, Q5_0, Q4_1, a stored int8 folder ...) held exactly as 8-bit
        codes with their per-block d and m; None where that layout has no kernel here (then `from_float`
        requantizes per row)."""
        fast = PackedWeight.pack(codes.q, codes.d, codes.m, 8) if codes is not None and codes.bits <= 8 else None
        return None if fast is None else cls(None, None, fast)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return add_bias(self._product(x), bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.matmul(x)
        if x.dtype == self.scales.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)
        # The CPU kernel's fp32 path is unvectorised (~13x slower): compute in bf16, as the int4 kernel does.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales.to(torch.bfloat16))
        return y.to(x.dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return self.fast.shape if self.fast is not None else tuple(self.q.shape)

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernel: the packed weight."""
        return None if self.fast is None else StackWeight(self.fast)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 values [N, K] (or of `rows` only) of a per-row weight (`from_float`)."""
        if self.fast is None:
            return self.q if rows is None else self.q[rows]
        return (self.fast.codes(rows).to(torch.int16) - 128).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.dequantize()
        return self.q.float() * self.scales.float()[:, None]

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` as `dtype`: the embedding table read from its int8 form."""
        if self.fast is not None:
            return self.fast.lookup(ids, dtype)
        flat = ids.reshape(-1)
        rows = self.q[flat].to(dtype) * self.scales[flat, None].to(dtype)
        return rows.reshape(*ids.shape, -1)

    @property
    def nbytes(self) -> int:
        if self.fast is not None:
            return self.fast.nbytes
        return self.q.numel() + self.scales.numel() * self.scales.element_size()
