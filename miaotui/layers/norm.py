"""Normalisation layers. Weights are the multiplier itself (Gemma's `1 + w` is folded in at load time)."""

from __future__ import annotations

import torch
from torch import nn

from miaotui.kernels import use_cpu_ops
from miaotui.layers.fused import FusedOnGPU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops := use_cpu_ops(x):
            return ops.rms_norm(x, self.weight, self.eps)  # one fused pass instead of five ops
        return rms_norm(x, self.weight, self.eps)


@FusedOnGPU
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The sum of squares accumulates in fp32 (as the reference implementations do) inside one vectorised
    reduction; F.rms_norm is a chain of upcast copies."""
    inv_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    inv_rms = inv_rms.mul_(x.shape[-1] ** -0.5).square_().add_(eps).rsqrt_()
    return x * inv_rms.to(x.dtype) * weight


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, built on the meta device like the rest of the model."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
