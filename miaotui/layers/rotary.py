"""Rotary position embedding, NEOX layout (the two halves of each head rotate together), as in transformers.

llama.cpp's interleaved layout for `llama` GGUFs is undone at load time (loader/gguf.py), so one rope serves all.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.kernels import use_cpu_ops
from miaotui.layers.fused import FusedOnGPU


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling and scaling.get("type") == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        self.max_position = max_position
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # cos and sin [positions, head_dim] (fp32), grown by `reserve` as positions are reached
        self.register_buffer("cos", torch.empty(0, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim, dtype=torch.float32), persistent=False)

    def reserve(self, n: int) -> None:
        """Angle tables for positions [0, n), grown in steps of 1,024 as contexts reach them rather than built for
        the whole context length up front: Gemma 3's two 32K-position tables of 256-wide heads held 128 MB."""
        if n <= self.cos.shape[0]:
            return
        n = max(n, min(-(-n // 1024) * 1024, self.max_position))
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (q and k heads side by side), positions [T] → x rotated, in its dtype.

        rotate_half(x) * sin is written as swap_halves(x) * signed_sin, with signed_sin = [-sin | sin].
        On the CPU one fused kernel rotates x in place instead (angles in fp32, one rounding).
        """
        if ops := use_cpu_ops(x):
            ops.rope_(x, positions, self.cos, self.sin)
            return x
        return rope(x, positions, self.cos, self.sin)


@FusedOnGPU
def rope(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    sin = sin_table[positions]
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).unsqueeze(1).to(x.dtype)
    cos = cos_table[positions].unsqueeze(1).to(x.dtype)
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin
