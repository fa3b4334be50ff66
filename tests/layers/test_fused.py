"""The elementwise layers CUDA runs compiled (layers/fused.py): compiled here by torch's CPU backend, they must give
what the plain functions give (the GPU check compares the whole CUDA path with the CPU one)."""

from __future__ import annotations

import pytest
import torch

from miaotui.layers.activation import _gelu_tanh_and_mul, _silu_and_mul
from miaotui.layers.fused import FusedOnGPU
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


def test_a_compiler_failure_runs_the_plain_function_with_a_warning(caplog):
    layer = FusedOnGPU(_silu_and_mul.fn)
    layer.devices = ("cpu",)  # as if this CPU were the GPU

    def broken(*args):
        raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no Triton here"), None)

    layer._compiled = broken
    x = torch.randn(4, 32)
    with caplog.at_level("WARNING", logger="miaotui"):
        torch.testing.assert_close(layer(x), _silu_and_mul.fn(x))
    assert layer.failed and "runs unfused on CUDA" in caplog.text
    layer._compiled = None  # not compiled again once it failed
    layer(x)
    assert layer._compiled is None
