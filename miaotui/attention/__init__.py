"""Attention backends: one interface (base.py), one file per implementation."""

from __future__ import annotations

import torch

from miaotui.attention.base import AttentionBackend, AttentionMetadata
from miaotui.kernels import cpu_ops

__all__ = ["AttentionBackend", "AttentionMetadata", "select_backend"]


def select_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """miaotui's paged kernel on a CPU that has it built (fp32 and bf16 models), torch's SDPA elsewhere."""
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_ops() is not None:
        from miaotui.attention.cpu_paged import CPUPagedBackend

        return CPUPagedBackend()
    from miaotui.attention.torch_sdpa import TorchSDPABackend

    return TorchSDPABackend()
