"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miaotui.kernels import SMALL_ROWS, use_cpu_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_ROWS and (ops := use_cpu_ops(x)):
        return ops.gated_act(x, False)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_ROWS and (ops := use_cpu_ops(x)):
        return ops.gated_act(x, True)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
