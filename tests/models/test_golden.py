"""No behaviour change across restructurings: greedy tokens and logprobs of the three real models (fp32, dense
weights) equal those the engine gave before (tests/models/golden.json, with the commit and CPU they came from).
Tokens must be identical; logprobs agree to 1e-3 (another CPU class multiplies fp32 in another order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miaotui import LLM, SamplingParams
from tests.conftest import REAL_MODELS, model_path

GOLDEN = json.loads((Path(__file__).with_name("golden.json")).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", REAL_MODELS)
def test_greedy_tokens_and_logprobs_unchanged(name):
    llm = LLM(str(model_path(name)), dtype="float32", quantization="none", kv_cache_memory=64 * 2**20)
    outs = llm.generate(GOLDEN["prompts"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    for out, want in zip(outs, GOLDEN["models"][name]):
        assert out.token_ids == want["tokens"]
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(want["logprobs"], abs=1e-3)
