"""Weights and the KV cache in memory that asked for 2 MB pages (miaotui/kernels/pages.py)."""

import gc

import pytest
import torch

from miaotui.kernels import pages


def _mapping(ptr: int) -> dict[str, str]:
    """The fields of /proc/self/smaps for the mapping that holds address `ptr`."""
    fields: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                start, end = (int(a, 16) for a in head.split("-"))
                if fields is not None:
                    return fields
                fields = {} if start <= ptr < end else None
            elif fields is not None:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    assert fields is not None, "no mapping holds the tensor"
    return fields


def test_tensors_are_aligned_and_hold_what_is_written():
    a = pages.empty(3, 5, dtype=torch.float16)
    b = pages.empty(1000, 17, dtype=torch.uint8)
    c = pages.copy(torch.arange(64, dtype=torch.float32).view(8, 8).t())  # not contiguous: copied so
    assert a.shape == (3, 5) and a.dtype == torch.float16 and b.shape == (1000, 17)
    assert c.is_contiguous() and torch.equal(c, torch.arange(64, dtype=torch.float32).view(8, 8).t())
    for t in (a, b, c):
        assert t.data_ptr() % 64 == 0
    a.fill_(1.5)
    b.fill_(7)
    assert (a == 1.5).all() and (b == 7).all()  # neighbours in one arena do not overlap
    assert pages.empty(0, 4, dtype=torch.float32).shape == (0, 4)


@pytest.mark.skipif(not pages.GRANTED, reason="this system grants no transparent huge pages")
def test_the_memory_asked_for_huge_pages_and_outlives_its_arena():
    small = pages.empty(1000, dtype=torch.float32)
    big = pages.empty(40 << 20, dtype=torch.uint8)  # an arena of its own
    for t in (small, big):
        assert _mapping(t.data_ptr()).get("THPeligible") == "1"
    view = big[-16:]
    del big
    gc.collect()
    view.fill_(3)  # the arena lives while a view of it does
    assert (view == 3).all()
