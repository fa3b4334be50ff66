"""int8 KV cache: the stored keys within half a step of the real ones, twice the tokens in the same memory, and a
model whose perplexity and greedy answers barely move."""

from __future__ import annotations

import pytest
import torch

from miaotui.errors import MiaotuiError
from miaotui.attention.base import read_kv, write_kv
from miaotui.layers.attention import Attention


def test_write_then_read_is_within_half_a_step():
    torch.manual_seed(0)
    attn = Attention(4, 2, 64, 1.0)
    attn.k_cache = attn.v_cache = torch.zeros(4, 8, 2, 64, dtype=torch.int8)
    attn.k_scale = attn.v_scale = torch.zeros(4, 8, 2, 1, dtype=torch.bfloat16)
    # Large, outlying values: the worst case for the rounded scale (the largest element must not wrap past 127).
    k = (torch.randn(20, 2, 64) * torch.logspace(-2, 2, 20)[:, None, None]).to(torch.bfloat16)
    slots = torch.arange(5, 25)
    write_kv(attn, slots, k, attn.k_cache, attn.k_scale)
    back, _ = read_kv(attn, torch.arange(4), torch.float32)
    step = k.float().abs().amax(-1, keepdim=True) / 127
    assert ((back[slots] - k.float()).abs() <= step * 0.5 * 1.02 + 1e-6).all()


def test_int8_cache_holds_twice_the_tokens_and_keeps_quality(smollm2_path):
    from miaotui import LLM, SamplingParams

    budget = 16 * 2**20
    llms = {kv: LLM(str(smollm2_path), dtype="bfloat16", quantization="none", kv_cache_memory=budget,
                    kv_cache_dtype=kv, max_model_len=1024) for kv in ("auto", "int8")}
    ratio = llms["int8"].engine.kv.num_blocks / llms["auto"].engine.kv.num_blocks
    assert 1.8 < ratio <= 2.0  # 64 int8 values + one bf16 scale per head instead of 64 bf16 values
    from miaotui.eval.perplexity import default_text, perplexity

    ids = llms["auto"].tokenizer.encode(default_text())

    def ppl(llm):
        return perplexity(llm.engine, ids, ctx=256, max_windows=2)[0]

    assert ppl(llms["int8"]) / ppl(llms["auto"]) == pytest.approx(1.0, abs=0.01)
    sp = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    texts = {kv: [o.text for o in llm.generate(prompts, sp, use_tqdm=False)] for kv, llm in llms.items()}
    assert texts["int8"] == texts["auto"]
    # Prompt chunking does not change what an int8 cache computes: the prompt always reads its keys back.
    chunked = LLM(str(smollm2_path), dtype="bfloat16", quantization="none", kv_cache_memory=budget,
                  kv_cache_dtype="int8", max_model_len=1024, max_num_batched_tokens=7)
    assert [o.text for o in chunked.generate(prompts, sp, use_tqdm=False)] == texts["int8"]
    for llm in (*llms.values(), chunked):
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_unknown_kv_cache_dtype():
    from miaotui.config import EngineConfig

    with pytest.raises(MiaotuiError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
