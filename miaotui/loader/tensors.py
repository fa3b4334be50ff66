"""What the loader hands the model: each checkpoint tensor as a typed value, its float values read only when asked
for, and — where the file stores it as integer blocks — those codes exactly, for a low-bit weight format to take
as they are (no round trip through float)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class BlockCodes:
    """Integer codes exactly as a file stores them: w = d * q + m per row and group of inputs, q unsigned of `bits`
    bits (uint8 [N, K]), d and m float32 [N, K / group]. GGUF blocks have groups of 32; a stored miaotui folder
    has its own group size (int4) or one group per row (int8)."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    bits: int

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.d.shape[1]

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockCodes:
        return BlockCodes(fn(self.q), fn(self.d), fn(self.m), self.bits)

    @staticmethod
    def cat(parts: list[BlockCodes]) -> BlockCodes | None:
        """The parts of a fused projection stacked along rows (at the widest code); None where their groups differ."""
        if len({p.group for p in parts}) != 1:
            return None
        return BlockCodes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "d", "m")),
                          max(p.bits for p in parts))


@dataclass(frozen=True, slots=True)
class RawBlocks:
    """A tensor's bytes as the file stores them (GGUF block type `type`, e.g. "Q4_K"), for a packer that reads
    them directly; output row r is file row rows[r] where the rows were rearranged. `source` (the file and the
    tensor's name in it) lets the packed form be kept on disk for later loads (quant/pack_cache.py)."""

    data: torch.Tensor  # uint8, the file's bytes (a view of the memory map)
    type: str
    num_rows: int
    rows: torch.Tensor | None = None
    source: tuple[Path, str] | None = None


class FileTensor:
    """One tensor of a checkpoint. `values()` reads (and dequantizes) it at each call, so a caller keeps what it
    gets; `codes()` gives the file's integer blocks or None; `blocks()` its raw bytes where the file has blocks;
    `bits` is how many bits per weight the file spends on it (16 for float files)."""

    def __init__(self, shape: tuple[int, ...], bits: int, values: Callable[[], torch.Tensor],
                 codes: Callable[[], BlockCodes | None] | None = None,
                 blocks: Callable[[], RawBlocks] | None = None):
        self.shape = tuple(shape)
        self.bits = bits
        self._values = values
        self._codes = codes
        self._blocks = blocks

    def blocks(self) -> list[RawBlocks] | None:
        """The raw bytes of each part (one part, or those of a fused projection), or None."""
        return None if self._blocks is None else self._blocks()

    @classmethod
    def of(cls, t: torch.Tensor) -> FileTensor:
        """A float tensor already in memory."""
        return cls(tuple(t.shape), 16, lambda: t)

    def values(self) -> torch.Tensor:
        return self._values()

    def codes(self) -> BlockCodes | None:
        return None if self._codes is None else self._codes()

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FileTensor:
        """The same tensor with its rows rearranged by `fn` (values, codes and raw rows alike), still read lazily."""
        codes, blocks = self._codes, self._blocks

        def rearranged() -> list[RawBlocks]:
            (b,) = blocks()
            rows = torch.arange(self.shape[0]) if b.rows is None else b.rows
            return [RawBlocks(b.data, b.type, self.shape[0], fn(rows[:, None]).reshape(-1), b.source)]

        return FileTensor(self.shape, self.bits, lambda: fn(self._values()),
                          None if codes is None else lambda: _map(codes(), fn), None if blocks is None else rearranged)

    def transposed(self) -> FileTensor:
        """A float matrix stored [in, out] (GPT-2's Conv1D) as [out, in]."""
        assert self._codes is None and len(self.shape) == 2
        return FileTensor(self.shape[::-1], self.bits, lambda: self._values().t())

    @staticmethod
    def cat(parts: list[FileTensor]) -> FileTensor:
        """Parts stacked along rows (a fused q|k|v or gate|up projection): codes only where every part has them."""
        if len(parts) == 1:
            return parts[0]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

        def codes() -> BlockCodes | None:
            each = [p.codes() for p in parts]
            return None if any(c is None for c in each) else BlockCodes.cat(each)

        coded = all(p._codes is not None for p in parts)
        raw = all(p._blocks is not None for p in parts)
        return FileTensor(shape, max(p.bits for p in parts), lambda: torch.cat([p.values() for p in parts]),
                          codes if coded else None, (lambda: [b for p in parts for b in p.blocks()]) if raw else None)


def _map(codes: BlockCodes | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockCodes | None:
    return None if codes is None else codes.map_rows(fn)
