"""Rotary position embedding, NEOX layout (the two halves of each head rotate together), as in transformers.

llama.cpp's interleaved layout for `llama` GGUFs is undone at load time (loader/gguf.py), so one rope serves all.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.context import get_context
from miaotui.kernels import SMALL_ROWS, use_cpu_ops


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling and scaling.get("type") == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

        self._key: tuple | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (q and k heads side by side), positions [T] → x rotated, in its dtype.

        rotate_half(x) * sin is written as swap_halves(x) * signed_sin, with signed_sin = [-sin | sin].
        At decode sizes on the CPU one fused kernel rotates x in place instead.
        """
        if x.shape[0] <= SMALL_ROWS and (ops := use_cpu_ops(x)):
            ops.rope_(x, positions, self.cos, self.sin)
            return x
        # Every layer of a step rotates by the same positions: look the angles up once per step.
        key = (get_context().step, x.dtype)
        if key != self._key:
            half = self.sin.shape[-1] // 2
            sin = self.sin[positions]
            sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            self._cos_sin = (self.cos[positions].unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype))
            self._key = key
        cos, signed_sin = self._cos_sin
        half = x.shape[-1] // 2
        return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin
