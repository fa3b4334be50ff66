"""Every real model against Hugging Face transformers on the same GGUF file (fp32, dequantized weights):
logits within 1e-4 relative error, identical 32-token greedy continuations, equal perplexity, sane bf16."""

from __future__ import annotations

import math

import pytest
import torch

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from tests.conftest import REAL_MODELS, model_path

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

LONG_TEXT = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor in "
    "27 BC, after decades of civil war had ended the Republic. At its height under Trajan, the empire stretched "
    "from Britain to Mesopotamia, and its roads, laws and aqueducts shaped Europe for a thousand years. The "
    "western half collapsed in 476 AD, when the last emperor was deposed by Odoacer. The eastern half, known as "
    "the Byzantine Empire, lasted until 1453, when Constantinople fell to the Ottoman Turks. Historians still "
    "debate why the west fell: plague, inflation, overstretched borders and political instability all played a "
    "part, and the empire"
)
PROMPTS = ["Once upon a time", "The best way to learn programming is", "中国的首都是", "def fibonacci(n):",
           "Water boils at"]


@pytest.fixture(scope="module", params=REAL_MODELS)
def pair(request):
    """(miaotui fp32 engine, transformers fp32 model) on the same file; freed after the module."""
    path = model_path(request.param)
    engine = Engine(EngineConfig(model=str(path), dtype="float32", quantization="none", kv_cache_memory=128 * 2**20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    hf.eval()
    yield request.param, engine, hf
    del engine, hf


def test_logits_match(pair):
    assert_logits_and_perplexity_match(*pair)


def assert_logits_and_perplexity_match(name: str, engine: Engine, hf) -> None:
    """Logits on LONG_TEXT within 1e-4 relative error of transformers', perplexities within 0.5%."""
    ids = engine.tokenizer.encode(LONG_TEXT)
    assert len(ids) >= 100
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    mine = engine.prompt_logits(ids)
    rel = ((mine - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{name}: max relative logit error {rel:.2e}"
    # Perplexity of the text under both: the same within 0.5%.
    target = torch.tensor(ids[1:])
    ppl = [math.exp(torch.nn.functional.cross_entropy(x[:-1], target).item()) for x in (mine, ref)]
    assert abs(ppl[0] / ppl[1] - 1) < 0.005, f"{name}: perplexity {ppl[0]:.3f} vs {ppl[1]:.3f}"


def test_greedy_matches(pair):
    name, engine, hf = pair
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for ids in prompts:
        engine.add_request(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    mine = [outs[f"req-{i}"] for i in range(len(prompts))] if "req-0" in outs else list(outs.values())
    for prompt, ids, got in zip(PROMPTS, prompts, mine):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert got == ref[0, len(ids):].tolist(), f"{name}: greedy continuation of {prompt!r} differs"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_bf16_within_bf16_error(pair):
    name, _, hf = pair
    engine = Engine(EngineConfig(model=str(model_path(name)), dtype="bfloat16", kv_cache_memory=64 * 2**20))
    ids = engine.tokenizer.encode(LONG_TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    mine = engine.prompt_logits(ids)
    rel = ((mine - ref).abs().max() / ref.abs().max()).item()
    agree = (mine.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert rel < 0.1, f"{name}: bf16 max relative logit error {rel:.3f}"
    assert agree > 0.9, f"{name}: bf16 top-1 agreement {agree:.2%}"
