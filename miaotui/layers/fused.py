"""Elementwise layers fused into one kernel each on CUDA, by torch.compile (Triton).

A decode step of a small model on a big GPU is bound by how many kernels it runs, not by its bytes: Qwen2.5-1.5B's
step was ~45 kernels a layer in torch's ops (a norm alone is eight: upcast, norm, scale, add, rsqrt, cast, two
multiplies), 4 ms a token on an H200 where reading its weights takes 0.76 ms. A CUDA graph removes the launch calls,
not the kernels. On the CPU miaotui's own C++ kernels fuse these layers instead (kernels/ops.cpp), so there the plain
function runs as written.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

log = logging.getLogger("miaotui")


class FusedOnGPU:
    """`fn` as written on the CPU; compiled on first use on CUDA (shapes dynamic: one compile serves every batch).
    Where the compiler fails (a Triton or driver this was not tried on), `fn` runs as written, with a warning: the
    same numbers, more kernels."""

    devices = ("cuda",)  # where the compiled kernel runs

    def __init__(self, fn: Callable[..., torch.Tensor]):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def compiled(self) -> Callable[..., torch.Tensor]:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled

    def __call__(self, x: torch.Tensor, *args) -> torch.Tensor:
        if x.device.type not in self.devices or self.failed:
            return self.fn(x, *args)
        try:
            return self.compiled()(x, *args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            self.failed = True
            log.warning("%s runs unfused on CUDA: torch.compile failed (%s)", self.fn.__name__,
                        str(e).splitlines()[0][:300])
            return self.fn(x, *args)
