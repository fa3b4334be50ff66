"""The offline API's defaults."""

from __future__ import annotations

from miaotui import LLM, SamplingParams
from miaotui.config import DEFAULT_MODEL


def test_llm_without_a_model_runs_the_default(smollm2_path):
    llm = LLM(dtype="float32", kv_cache_memory=16 * 2**20)
    assert llm.engine.config.model == DEFAULT_MODEL
    assert llm.generate("1, 2, 3,", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].token_ids
