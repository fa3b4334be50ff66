"""The elementwise layers CUDA runs compiled (layers/fused.py): compiled here by torch's CPU backend, they must give
what the plain functions give (the GPU check compares the whole CUDA path with the CPU one)."""

from __future__ import annotations

import pytest
import torch

from miaotui.layers.activation import _gelu_tanh_and_mul, _silu_and_mul
from miaotui.layers.norm import rms_norm
from miaotui.layers.rotary import RotaryEmbedding, rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layers_equal_the_plain_ones(dtype):
    g = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(64, 4096, 10000.0)
    rotary.reserve(2048)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for rows in (3, 17):  # dynamic shapes: one compile serves both
        x = torch.randn(rows, 256, generator=g).to(dtype)
        heads = torch.randn(rows, 6, 64, generator=g).to(dtype)
        positions = torch.randint(0, 2048, (rows,), generator=g)
        cases = [(rms_norm, (x, torch.randn(256, generator=g).to(dtype), 1e-6)),
                 (rope, (heads, positions, rotary.cos, rotary.sin)),
                 (_silu_and_mul, (x,)), (_gelu_tanh_and_mul, (x,))]
        for layer, args in cases:
            torch.testing.assert_close(layer.compiled()(*args), layer.fn(*args), **tol, msg=layer.__name__)
