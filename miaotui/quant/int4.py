"""int4 weights: asymmetric groups of 32/64/128 along the input dimension, searched for the clip with the least error
and, given calibration statistics, scaled per input channel (activation-aware); or a file's 4-bit codes taken as
they are. Multiplied by miaotui's packed kernel where the CPU has it, else by torch's
`aten._weight_int4pack_mm_for_cpu`, or on CUDA by its `aten._weight_int4pack_mm` (tinygemm). Both take
w = (q - 8) * scale + zero, so a group with minimum `lo` and step `scale` stores zero = lo + 8 * scale; a GGUF Q4_1
block, w = d * q + m, is scale = d, zero = m + 8d."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.errors import MiaotuiError
from miaotui.loader.tensors import BlockCodes
from miaotui.quant.base import StackWeight, add_bias
from miaotui.quant.packed import PackedWeight


@dataclass
class Int4Weight:
    packed: torch.Tensor | None  # torch's int4 layout; None where `fast` holds the weight
    scales_zeros: torch.Tensor | None  # [K // group, N, 2], bf16
    group: int
    shape: tuple[int, int]
    in_scale: torch.Tensor | None = None  # [K]: inputs are multiplied by it first (activation-aware scaling)
    fast: PackedWeight | None = None  # miaotui's VNNI layout (w = d * q + m, fp16 d and m), where the CPU has it

    CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
    ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int, in_power: torch.Tensor | None = None) -> Int4Weight:
        """Each group's grid spans its [min, max] shrunk by the factor (of CLIPS) with the least squared error:
        clipping a few outliers buys a finer step for the rest (as llama.cpp's k-quants search their scales).

        in_power [K], the mean square of each input channel on calibration text, turns on activation-aware
        scaling (AWQ's idea): input channel k of W is multiplied by s_k = power_k^(alpha/2) before quantizing
        (and inputs by 1/s_k at run time), so channels that see large activations get finer steps. alpha (of
        ALPHAS; 0 = no scaling) minimises the output error Σ (ΔW)² · power, then the clip search runs on the
        scaled weight."""
        w = w.float()
        if in_power is None:
            return cls._from_groups(*_int4_search(w, group, cls.CLIPS), group)
        power = in_power.float().clamp(min=1e-12)
        best = None
        for alpha in cls.ALPHAS:
            s = power ** (alpha / 2)
            s = s / (s.max() * s.min()).sqrt()
            q, scale, lo = _int4_search(w * s, group, (1.0,))
            deq = (q * scale + lo).reshape(w.shape) / s
            err = ((deq - w).square() * power).sum().item()
            if best is None or err < best[0]:
                best = (err, alpha, s)
        _, alpha, s = best
        weight = cls._from_groups(*_int4_search(w * s, group, cls.CLIPS), group)
        if alpha > 0:
            weight.in_scale = (1 / s).to(torch.bfloat16)
        return weight

    @classmethod
    def _from_groups(cls, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int) -> Int4Weight:
        n = q.shape[0]
        return cls.from_codes(BlockCodes(q.reshape(n, -1), scale.reshape(n, -1), lo.reshape(n, -1), 4))

    @classmethod
    def from_codes(cls, codes: BlockCodes, device: torch.device | None = None) -> Int4Weight:
        """4-bit codes (q [N, K] in 0..15, w = d * q + m per group) as they are, for `device` (default: the
        codes')."""
        device = codes.q.device if device is None else device
        q, d, m, group = (codes.q.to(device), codes.d.to(device).float(), codes.m.to(device).float(), codes.group)
        fast = PackedWeight.pack(q, d, m, 4)
        if fast is not None:
            return cls(None, None, group, tuple(q.shape), fast=fast)
        sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if q.is_cuda:  # tinygemm: two codes a byte (even column high), k-tiles of 16 codes, N in tiles of 8
            tiles = next((t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0), None)
            if tiles is None or q.shape[0] % 8:
                raise MiaotuiError(f"int4 on CUDA needs rows in multiples of 8 and columns in multiples of 32, got "
                                   f"{tuple(q.shape)}")
            pairs = (q[:, ::2].to(torch.uint8) << 4) | q[:, 1::2].to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        return cls(packed, sz, group, tuple(q.shape))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return add_bias(self._product(x), bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.matmul(x, self.in_scale)
        if self.in_scale is not None:
            x = x * self.in_scale.to(x.dtype)
        op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        if x.dtype == torch.bfloat16:  # the common case: skip two no-op casts on the decode hot path
            return op(x, self.packed, self.group, self.scales_zeros)
        return op(x.to(torch.bfloat16), self.packed, self.group, self.scales_zeros).to(x.dtype)

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernel: the packed weight and the input scale."""
        return None if self.fast is None else StackWeight(self.fast, self.in_scale)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` as `dtype`: an embedding table read from its int4 form (miaotui's layout only)."""
        return self.fast.lookup(ids, dtype)

    def dequantize(self) -> torch.Tensor:
        if self.fast is not None:
            w = self.fast.dequantize()
            return w if self.in_scale is None else w * self.in_scale.float()
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.packed.device)
        return self.matmul(eye).float().t()

    @property
    def nbytes(self) -> int:
        extra = 0 if self.in_scale is None else self.in_scale.numel() * 2
        if self.fast is not None:
            return self.fast.nbytes + extra
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2 + extra


def _int4_search(w: torch.Tensor, group: int, clips: tuple[float, ...]):
    """Codes q [N, K/group, group] in 0..15, step and minimum [N, K/group, 1] of the clip factor with the least
    squared error per group. Groups are independent: searched ~1 MB of rows at a time, so each clip's passes stay
    in cache (a 152k x 896 embedding table: 25 s in one piece)."""
    n, k = w.shape
    rows = max(1, (1 << 18) // k)
    if n > rows:
        parts = [_int4_search(w[i:i + rows], group, clips) for i in range(0, n, rows)]
        return tuple(torch.cat(p) for p in zip(*parts))
    g = w.reshape(n, k // group, group)
    lo0, hi0 = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    best = None
    for clip in clips:
        lo, hi = lo0 * clip, hi0 * clip
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo) / scale).clamp(0, 15)
        err = (q * scale + lo - g).square().sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, q, scale, lo]
        else:
            better = err < best[0]
            for i, new in enumerate((err, q, scale, lo)):
                best[i] = torch.where(better, new, best[i])
    return best[1], best[2], best[3]
