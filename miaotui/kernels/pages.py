"""Memory that the kernels stream through, in 2 MB pages where the operating system grants them.

A decode step reads every weight once. In 4 KB pages that is a TLB miss and a page walk every 4 KB, and the
hardware prefetchers stop at each page's end; Linux's transparent huge pages come to memory that asks for them
(`madvise`, most distributions' default). A 4-bit product (8960 x 1536) streamed from 2 MB pages ran 1.06x (1 row)
to 1.08x (5 rows) faster than from 4 KB ones, at 5 rows as fast as with the weight in L3; Qwen2.5-Coder-1.5B's
decode steps with its weights in them 0.94-1.21x (1 row, median 1.07x) and 1.03-1.19x (5 rows, median 1.08x) over
9 processes, each alternating two engines step by step (AVX-512 Zen 4; SmolLM2's 32-request batch level), and its
load 1.13-1.18 s -> 0.91-1.05 s (512 page faults where there were 262,144). The KV cache stays in 4 KB pages: a
cache is mostly untouched at start, and in 2 MB pages the first block of each layer's plane faulted in 2 MB of it
(0.4-1.4 s more at load). Batched decode does read much of it (SmolLM2, 32 sequences at 128 tokens: ~94 MB a step,
as much as the weights), but its blocks are handed out in runs: decode attention over blocks scattered at random
ran 1.06-1.17x faster from 2 MB pages, whole steps of an engine's own blocks 0.98-1.03x (SmolLM2 16 x 1,024 and
32 x 512 tokens of context, Qwen2.5-1.5B 8 x 2,048; Zen 4, two engines alternated).

Tensors are carved out of arenas of 2 MB-aligned anonymous memory, never freed one by one: an arena goes when the
last tensor in it goes (each holds its arena's buffer). Where the system has no such pages (not Linux, or THP set
to `never`) `empty` is `torch.empty`. Packed weights kept on disk come back through `map_file` instead: the page
cache's own 2 MB folios, mapped in place (quant/pack_cache.py).
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import torch

PAGE = 2 << 20  # a huge page
MADV_POPULATE_READ = 22  # Linux 5.14+: a mapping's page tables filled from the page cache, nothing copied
ARENA = 64 << 20  # tensors up to a quarter of this share arenas; larger ones get one of their own
ALIGN = 64  # a cache line, for the kernels' aligned loads


def _granted() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


GRANTED = _granted()


class _Arena:
    """A 2 MB-aligned stretch of anonymous memory that asked for huge pages, handed out front to back."""

    def __init__(self, size: int):
        size = -(-size // PAGE) * PAGE
        region = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: each is then faulted in whole
        whole = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` for as long as any view of it lives
        start = -whole.data_ptr() % PAGE
        self.bytes = whole[start:start + size]
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        start = -(-self.used // ALIGN) * ALIGN
        if start + nbytes > self.bytes.numel():
            return None
        self.used = start + nbytes
        return self.bytes[start:start + nbytes]


_lock = threading.Lock()
_shared: _Arena | None = None


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor, in 2 MB pages where they are granted (else `torch.empty`)."""
    global _shared
    if not GRANTED:
        return torch.empty(*shape, dtype=dtype)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not nbytes:
        return torch.empty(*shape, dtype=dtype)
    with _lock:
        if nbytes > ARENA // 4:
            raw = _Arena(nbytes).take(nbytes)
        else:
            raw = _shared.take(nbytes) if _shared is not None else None
            if raw is None:
                _shared = _Arena(ARENA)
                raw = _shared.take(nbytes)
    assert raw is not None
    return raw.view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous, copied into 2 MB pages where it is on the CPU and they are granted."""
    if not GRANTED or t.device.type != "cpu":
        return t.contiguous()
    out = empty(*t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


def map_file(fd: int, size: int) -> torch.Tensor:
    """The first `size` bytes of an open file as a uint8 tensor, mapped copy-on-write from the OS page cache and
    faulted in now. Where the file system holds the file in 2 MB folios (ext4 and xfs large folios, Linux 6.x;
    a mapping that asks for huge pages reads ahead in them) the kernel maps each 2 MB-aligned stretch of the file in
    one huge page: no copy, no fresh memory to zero, and the same TLB reach as `empty`'s arenas. Elsewhere it is 4 KB
    pages, still correct. The file must not be truncated while mapped (SIGBUS): replace it by renaming."""
    region = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if GRANTED:
        region.madvise(mmap.MADV_HUGEPAGE)
    try:
        region.madvise(MADV_POPULATE_READ)  # at load, not in the first forward pass; no copy-on-write breaks
    except OSError:
        pass  # an older kernel: faulted in on first use
    return torch.frombuffer(region, dtype=torch.uint8)  # holds `region` for as long as any view of it lives


def in_huge_pages(t: torch.Tensor) -> bool:
    """Whether the mapping that holds `t` is mapped in huge pages (anonymous or from the page cache), as
    /proc/self/smaps tells; False where it cannot tell. A few ms: once a load, not once a tensor."""
    address = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return False
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, _, end = head.partition("-")
            inside = int(start, 16) <= address < int(end, 16)
        elif inside and head in ("AnonHugePages:", "FilePmdMapped:", "ShmemPmdMapped:") and line.split()[1] != "0":
            return True
    return False
