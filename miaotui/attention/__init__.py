"""Attention backends: one interface (base.py), one file per implementation."""

from __future__ import annotations

import os

import torch

from miaotui.attention.base import AttentionBackend, AttentionMetadata
from miaotui.errors import MiaotuiError
from miaotui.kernels import cpu_ops

__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "choose_backend", "select_backend"]

BACKENDS = ("cpu-paged", "flex", "torch-sdpa")
FORCE_VAR = "MIAOTUI_ATTENTION"  # names a backend to use in place of the choice below (checks, comparisons)


def choose_backend(device: str, dtype: torch.dtype, kv_cache_dtype: str, block_size: int, cpu_kernels: bool,
                   forced: str | None = None) -> str:
    """Which backend serves a runner: on CUDA, FlexAttention over the cache in place (a block of a multiple of 16
    tokens, so Triton's key tile divides it; not over an int8 cache); on a CPU, miaotui's paged kernel where it is
    built (fp32 and bf16 models); torch's SDPA over gathered blocks elsewhere. `forced` (MIAOTUI_ATTENTION) picks
    one, refused where it cannot run."""
    flex_ok = kv_cache_dtype != "int8" and (device != "cuda" or block_size % 16 == 0)
    paged_ok = device == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels
    if forced:
        usable = {"cpu-paged": paged_ok, "flex": flex_ok, "torch-sdpa": True}
        if forced not in usable:
            raise MiaotuiError(f"{FORCE_VAR}={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
        if not usable[forced]:
            raise MiaotuiError(f"{FORCE_VAR}={forced!r} cannot serve this runner ({device}, {dtype}, "
                               f"kv cache {kv_cache_dtype}, block size {block_size})")
        return forced
    if device == "cuda" and flex_ok:
        return "flex"
    return "cpu-paged" if paged_ok else "torch-sdpa"


def select_backend(device: torch.device, dtype: torch.dtype, num_blocks: int, block_size: int,
                   kv_cache_dtype: str = "auto") -> AttentionBackend:
    """The backend `choose_backend` names, built for a cache of `num_blocks` blocks."""
    name = choose_backend(device.type, dtype, kv_cache_dtype, block_size,
                          device.type == "cpu" and cpu_ops() is not None, os.environ.get(FORCE_VAR) or None)
    if name == "flex":
        from miaotui.attention.flex import FlexBackend

        return FlexBackend(num_blocks, device)
    if name == "cpu-paged":
        from miaotui.attention.cpu_paged import CPUPagedBackend

        return CPUPagedBackend()
    from miaotui.attention.torch_sdpa import TorchSDPABackend

    return TorchSDPABackend()
