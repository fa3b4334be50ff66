"""Elementwise layers fused into one kernel each on CUDA, by torch.compile (Triton).

A decode step of a small model on a big GPU is bound by how many kernels it runs, not by its bytes: Qwen2.5-1.5B's
step was ~45 kernels a layer in torch's ops (a norm alone is eight: upcast, norm, scale, add, rsqrt, cast, two
multiplies), 4 ms a token on an H200 where reading its weights takes 0.76 ms. A CUDA graph removes the launch calls,
not the kernels. On the CPU miaotui's own C++ kernels fuse these layers instead (kernels/ops.cpp), so there the plain
function runs as written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


class FusedOnGPU:
    """`fn` as written on the CPU; compiled on first use on CUDA (shapes dynamic: one compile serves every batch)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._compiled: Callable[..., torch.Tensor] | None = None

    def compiled(self) -> Callable[..., torch.Tensor]:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.compiled()(x, *args) if x.is_cuda else self.fn(x, *args)
