"""Perplexity methods: token accounting as llama.cpp does it, the sliding window agreeing with one full pass."""

from __future__ import annotations

import math

import pytest
import torch

from miaotui.errors import MiaotuiError
from miaotui.eval.perplexity import default_text, perplexity


def test_llamacpp_scores_the_second_half_of_each_window(smollm2_engine):
    ids = smollm2_engine.tokenizer.encode(default_text())[:300]
    ppl, n = perplexity(smollm2_engine, ids, ctx=64, method="llamacpp")
    assert n == (300 // 64) * (64 - 32 - 1)
    window = ids[64:128]  # the second window, by hand
    logits = smollm2_engine.prompt_logits(window)
    nll = torch.nn.functional.cross_entropy(logits[32:-1], torch.tensor(window[33:]), reduction="sum").item()
    _, n1 = perplexity(smollm2_engine, ids[64:128], ctx=64)
    assert n1 == 31 and math.isclose(perplexity(smollm2_engine, window, ctx=64)[0], math.exp(nll / 31), rel_tol=1e-5)
    assert 1 < ppl < 200


def test_sliding_window_over_whole_text_is_one_pass(smollm2_engine):
    ids = smollm2_engine.tokenizer.encode(default_text())[:96]
    ppl, n = perplexity(smollm2_engine, ids, ctx=96, method="sliding")
    logits = smollm2_engine.prompt_logits(ids)
    full = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert n == 95 and math.isclose(ppl, full, rel_tol=1e-5)


def test_errors(smollm2_engine):
    with pytest.raises(MiaotuiError, match="method"):
        perplexity(smollm2_engine, [1] * 100, ctx=64, method="magic")
    with pytest.raises(MiaotuiError, match="fewer than one"):
        perplexity(smollm2_engine, [1] * 10, ctx=64)
    assert smollm2_engine.kv.num_free_blocks == smollm2_engine.kv.num_blocks


def test_same_as_llama_cpp_on_the_same_tokens(smollm2_path, smollm2_engine):
    """llama.cpp scores the same windows of the same ids within 1% (its matmuls quantize activations to 8 bits)."""
    pytest.importorskip("llama_cpp")
    from miaotui.eval.perplexity import llama_cpp_perplexity

    ids = smollm2_engine.tokenizer.encode(default_text())
    ours, n = perplexity(smollm2_engine, ids, ctx=256, max_windows=2)
    peer, m = llama_cpp_perplexity(smollm2_path, ids, ctx=256, max_windows=2)
    assert n == m == 254
    assert abs(ours / peer - 1) < 0.01
