"""Every dequantizer against gguf-py's reference (gguf.quants), bit for bit, on random blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from miaotui.errors import ModelFileError
from miaotui.loader.dequant import DEQUANTIZERS, dequantize

# Byte offsets of the float16 scales in each block layout; they get finite values so both sides agree on NaNs.
SCALE_OFFSETS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2],
                 Q.Q5_K: [0, 2], Q.Q6_K: [208]}


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZERS, key=lambda q: q.name), ids=lambda q: q.name)
def test_matches_gguf_reference(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    n_blocks = 64
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        raw[:, off : off + 2] = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    shape = (4, n_blocks * block // 4)
    ref = quants.dequantize(raw.reshape(shape[0], -1), qtype)
    mine = dequantize(raw.reshape(-1), qtype, shape).numpy()
    assert mine.shape == ref.shape
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_float_types(qtype):
    x = torch.randn(8, 32)
    dt = {Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.F32: torch.float32}[qtype]
    raw = x.to(dt).view(torch.uint8).reshape(-1).numpy()
    out = dequantize(raw, qtype, (8, 32))
    assert torch.equal(out, x.to(dt))


def test_unsupported_type_is_named():
    with pytest.raises(ModelFileError, match="IQ2_XXS"):
        dequantize(np.zeros(66, dtype=np.uint8), Q.IQ2_XXS, (256,))
