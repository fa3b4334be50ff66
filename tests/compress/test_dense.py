"""Dense weights on oneDNN: every product length rounds to one of a bounded set of shapes (oneDNN keeps state for
each shape it meets, so a server's memory grew with every new prompt length), and the padding changes no row."""

from __future__ import annotations

import pytest
import torch

from miaotui.quant.dense import OneDNNWeight, onednn_bf16, onednn_rows


def test_product_lengths_round_to_a_bounded_set():
    sizes = [onednn_rows(r) for r in range(1, 2049)]
    assert sizes[:16] == list(range(1, 17))  # decode sizes exact
    assert all(r <= s <= r * 1.125 for r, s in zip(range(1, 2049), sizes))
    assert len(set(sizes)) <= 72 and sizes == sorted(sizes)


@pytest.mark.skipif(not onednn_bf16(), reason="this CPU has no oneDNN bf16 product")
@pytest.mark.parametrize("rows", [1, 17, 100, 333])
def test_padded_product_equals_the_exact_one(rows):
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)  # 2 * rows: padded when over 16
    bias = torch.randn(96, dtype=torch.bfloat16)
    y = OneDNNWeight(w).matmul(x, bias)
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    assert y.shape == (2, rows, 96)
    assert ((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output rounding
