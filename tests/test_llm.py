"""The offline API's defaults, and the prompt forms it takes."""

from __future__ import annotations

import pytest

from miaotui import LLM, SamplingParams
from miaotui.config import DEFAULT_MODEL


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(dtype="float32", kv_cache_memory=16 * 2**20)


def test_llm_without_a_model_runs_the_default(llm):
    assert llm.engine.config.model == DEFAULT_MODEL
    assert llm.generate("1, 2, 3,", SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0].token_ids


def test_prompts_as_text_token_ids_or_vllms_dicts(llm):
    greedy = SamplingParams(max_tokens=4, temperature=0)
    ids = llm.tokenizer.encode("1, 2, 3,")
    forms = ["1, 2, 3,", ids, {"prompt": "1, 2, 3,"}, {"prompt_token_ids": ids}]
    outs = llm.generate(forms, greedy, use_tqdm=False)
    assert len({tuple(o.token_ids) for o in outs}) == 1 and outs[0].prompt_token_ids == ids
    assert llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0].token_ids == outs[0].token_ids
    for bad, error in [({"text": "hi"}, ValueError), ({"prompt": "a", "prompt_token_ids": ids}, ValueError),
                       ([3.5], TypeError), ([None], TypeError)]:
        with pytest.raises(error, match="prompt"):
            llm.generate(bad, greedy, use_tqdm=False)


def test_misshapen_chats_and_parameters_get_a_clear_error(llm):
    greedy = SamplingParams(max_tokens=2, temperature=0)
    for bad in ["hello", [{"content": "hi"}], [[]], [[{"role": "user", "content": "hi"}], "hi"]]:
        with pytest.raises(TypeError, match="chat takes a conversation"):
            llm.chat(bad, greedy, use_tqdm=False)
    for bad in [{"max_tokens": 2}, [greedy, {"max_tokens": 2}]]:
        with pytest.raises(TypeError, match="SamplingParams"):
            llm.generate(["a", "b"], bad, use_tqdm=False)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_parameter(llm):
    for params, name in [(SamplingParams(stop_token_ids=[2, 10**7]), "stop_token_ids"),
                         (SamplingParams(logit_bias={10**7: 5.0}), "logit_bias")]:
        with pytest.raises(ValueError, match=f"{name} token id 10000000 is outside the vocabulary"):
            llm.generate("hi", params, use_tqdm=False)
