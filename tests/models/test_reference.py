"""Every real model against Hugging Face transformers on the same GGUF file (fp32, dequantized weights):
logits within 1e-4 relative error, identical 32-token greedy continuations, equal perplexity, sane bf16."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.loader.gguf_file import GGUFFile
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


def without_vocabulary(path: Path, folder: Path) -> Path:
    """A copy of a GGUF file with the same tensors and settings but no vocabulary arrays (the vocabulary's size
    kept as a setting): transformers' GGUF reader spends ~30 s per read on a 262k-entry vocabulary, twice per
    model load, and a model needs only the weights. The tensor bytes are copied as they are."""
    f = GGUFFile(path)
    arch = f.metadata["general.architecture"]
    drop = {k for k, v in f.metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list | np.ndarray)}
    size = f"{arch}.vocab_size"
    keep = [k for k in f.spans if k not in drop]
    out = folder / path.name
    raw = memoryview(path.read_bytes())
    with open(out, "wb") as o:
        o.write(bytes(raw[:8]))  # magic and version
        o.write(struct.pack("<QQ", len(f.tensors), len(keep) + (size not in f.metadata)))
        o.writelines(bytes(raw[slice(*f.spans[k])]) for k in keep)
        if size not in f.metadata:
            key = size.encode()
            o.write(struct.pack("<Q", len(key)) + key + struct.pack("<II", GGUFValueType.UINT32,
                                                                    len(f.metadata["tokenizer.ggml.tokens"])))
        o.write(bytes(raw[slice(*f.table_span)]))
        align = int(f.metadata.get("general.alignment", 32))
        o.write(b"\0" * (-o.tell() % align))
        o.write(raw[f.data_start:])
    return out


@pytest.fixture(scope="module", params=REAL_MODELS)
def pair(request, tmp_path_factory):
    """(miaotui fp32 engine, transformers fp32 model) on the same file; freed after the module."""
    path = model_path(request.param)
    engine = Engine(EngineConfig(model=str(path), dtype="float32", quantization="none", kv_cache_memory=128 * 2**20))
    weights = without_vocabulary(path, tmp_path_factory.mktemp(request.param))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(weights.parent), gguf_file=weights.name,
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
    # transformers' reference in one batch, the prompts padded on the left (masked): 32 steps, not 5 x 32
    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    with torch.no_grad():
        ref = hf.generate(batch, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)
    for prompt, got, row in zip(PROMPTS, mine, ref):
        assert got == row[width:].tolist(), f"{name}: greedy continuation of {prompt!r} differs"
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
