"""The packed layout of low-bit weights, multiplied by miaotui's integer kernel (qmatmul.cpp, AVX-512 VNNI).

A weight is unsigned codes q (4 or 8 bits) with an affine map per row and group of inputs, w = d * q + m; the
kernel quantizes activations to int8 per block of 32 and multiplies on the integer dot-product unit. On this
machine it runs a decode-sized product 2-3x faster than torch's int4/int8 weight-only kernels (which widen every
weight to float), and both int4 and int8 weights (8-bit codes are the int8 value + 128) share it. From 8 rows on,
where the CPU has AMX, the same layout is widened to bf16 tiles instead (prefill, batched decode). GGUF's K-quants
are held exactly as the file stores them: Q4_K with its own scales (w = D * sc * q - Dmin * mn, bytes per 32
inputs), 4.63 bits a weight where fp16 d and m took 5 and rounded D * sc, by every kernel class; Q6_K (w = D * s *
(q - 32), int8 s per 16 inputs) as 6-bit codes where the VNNI or AVX2 kernel is built, 6.56 bits a weight where
8-bit codes took 9 and requantized it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.kernels import cpu_ops, has_packed, pages
from miaotui.loader.tensors import RawBlocks
from miaotui.quant import pack_cache

BLOCK_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q8_0": 8, "Q6_K": 8}  # what the packer reads


def six_bit_codes() -> bool:
    """Whether Q6_K blocks are held as the file stores them, 6-bit codes: the VNNI and AVX2 kernels multiply them;
    the portable one takes them as 8-bit codes (Q4_K's own scales: every class)."""
    ops = cpu_ops()
    return ops is not None and ops.qmatmul_path in ("vnni", "avx2")


@dataclass
class PackedWeight:
    data: torch.Tensor  # uint8 [N/16, K*bits/32, 16, 4]: one 64-byte line per 16 rows and 4-byte input chunk
    dm: torch.Tensor  # fp16 [N/16, K/group, 2, 16]: d then m of 16 rows; uint8 [N/16, K/256, 288 | 320]: Q6_K's, Q4_K's
    bits: int
    group: int
    shape: tuple[int, int]
    act_bits: int = 16  # the activations' rounding: 16 (two int8 terms, ~15 bits) or 8 (one, llama.cpp's)

    @classmethod
    def pack(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> PackedWeight | None:
        """codes [N, K] (0..2^bits - 1), d and m [N, K/group]; None where the kernel cannot take this weight
        (no VNNI, K not in blocks of 32, scales beyond fp16)."""
        n, k = codes.shape
        group = k // d.shape[1]
        if not has_packed() or k % 32 or group % 32 or k % group or codes.device.type != "cpu":
            return None
        dm = torch.stack([d, m], dim=-1).to(torch.float16)
        if not torch.isfinite(dm).all():
            return None
        rows = -(-n // 16) * 16
        if rows != n:
            codes = torch.cat([codes, codes.new_zeros(rows - n, k)])
            dm = torch.cat([dm, dm.new_zeros(rows - n, *dm.shape[1:])])
        dm = dm.view(rows // 16, 16, k // group, 2).permute(0, 2, 3, 1).contiguous()
        codes = codes.to(torch.uint8)
        if bits == 4:  # chunk of 8 inputs: byte j of a row holds input j (low nibble) and j + 4 (high nibble)
            v = codes.view(rows // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
            data = v[..., 0] | (v[..., 1] << 4)
        else:
            data = codes.view(rows // 16, 16, k // 4, 4).permute(0, 2, 1, 3)
        return cls(pages.copy(data), pages.copy(dm), bits, group, (n, k))

    @classmethod
    def from_blocks(cls, parts: list[RawBlocks] | None, k: int, min_bits: int | None = None) -> PackedWeight | None:
        """Straight from a file's raw blocks (one tensor, or the parts of a fused projection), read by the kernels'
        packer with no float detour: 4-bit types as 4-bit codes, 5- to 8-bit types (and a mix) as 8-bit codes; Q4_K
        alone with its own scales; where `six_bit_codes()`, Q6_K alone as 6-bit codes (else requantized to 8 bits per
        group of 32). `min_bits`: codes of fewer bits go to 8. None where the packer cannot (no kernels, another
        block type, parts not in whole blocks of 16 rows). A large file's packed matrices are kept on disk and read
        back on its later loads (quant/pack_cache.py)."""
        ops = cpu_ops()
        if ops is None or not parts or k % 32 or any(p.type not in BLOCK_BITS for p in parts):
            return None
        if any(p.num_rows % 16 for p in parts[:-1]):
            return None
        six = k % 256 == 0 and six_bit_codes() and all(p.type == "Q6_K" for p in parts)
        bits = 6 if six else max(BLOCK_BITS[p.type] for p in parts)
        if min_bits and bits < min_bits:
            bits = 8
        kscales = k % 256 == 0 and bits == 4 and all(p.type == "Q4_K" for p in parts)
        n = sum(p.num_rows for p in parts)
        blocks = -(-n // 16)
        kept = pack_cache.entry(parts, k, min_bits)
        hit = kept.read() if kept is not None else None
        if hit is not None and hit["bits"] == bits and hit["data"].shape == (blocks, k * bits // 32, 16, 4):
            return cls(hit["data"], hit["dm"], bits, hit["group"], (n, k))
        data = pages.empty(blocks, k * bits // 32, 16, 4, dtype=torch.uint8)
        if six or kscales:  # per super-block of 256 inputs, 16 rows' fp16 D (and -Dmin), then their byte scales
            dm = pages.empty(blocks, k // 256, 288 if six else 320, dtype=torch.uint8)
        else:
            dm = pages.empty(blocks, k // 32, 2, 16, dtype=torch.float16)
        start = 0  # in row blocks: every part but the last holds whole blocks of 16 rows
        for p in parts:
            size = -(-p.num_rows // 16)
            ops.pack_blocks(p.data, p.type, p.num_rows, k, p.rows, bits, data[start:start + size],
                            dm[start:start + size], kscales=kscales)
            start += size
        if kept is not None:
            kept.write(data, dm, bits, 16 if six else 32)
        return cls(data, dm, bits, 16 if six else 32, (n, k))

    def matmul(self, x: torch.Tensor, in_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] (fp32 or bf16, times in_scale [K] first) @ Wᵀ, in x's dtype."""
        return cpu_ops().qmatmul(x, self.data, self.dm, self.bits, self.group, self.shape[0], in_scale,
                                 act_bits=self.act_bits)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The codes [N, K] (or of `rows` only) as uint8, back in row-major order (4 and 8 bits)."""
        n, k = self.shape
        if self.bits == 6:
            raise NotImplementedError("6-bit codes are read through dequantize")
        idx = torch.arange(n) if rows is None else rows
        if self.bits == 4:
            v = self.data.view(-1, k // 8, 16, 4)[idx // 16, :, idx % 16]  # [R, K/8, 4]
            return torch.stack([v & 15, v >> 4], dim=-2).reshape(len(idx), k)
        return self.data.view(-1, k // 4, 16, 4)[idx // 16, :, idx % 16].reshape(len(idx), k)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [N, K] (or `rows` of it) as fp32 (miaotui's kernel where it is built: ~20x torch's ops)."""
        if (ops := cpu_ops()) is not None and self.data.is_cpu:
            rows = torch.arange(self.shape[0]) if rows is None else rows
            return ops.packed_rows(self.data, self.dm, self.bits, self.group, self.shape[1], rows)
        if rows is None:
            dm = self.dm.permute(0, 3, 1, 2).reshape(-1, self.dm.shape[1], 2)[: self.shape[0]]
        else:  # only the rows asked for: an embedding lookup must not copy every row's scales
            dm = self.dm[rows // 16, :, :, rows % 16]
        dm = dm.float()
        q = self.codes(rows)
        q = q.float().view(q.shape[0], -1, self.group)
        return (q * dm[..., 0, None] + dm[..., 1, None]).reshape(q.shape[0], -1)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (any shape) as `dtype`, [*ids.shape, K]: an embedding table read from this layout."""
        return self.dequantize(ids.reshape(-1)).to(dtype).reshape(*ids.shape, -1)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.dm.numel() * self.dm.element_size()
