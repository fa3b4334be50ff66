"""Hugging Face folders (config.json + safetensors + tokenizer.json): seeded random GPT-2, Llama, Qwen2 and
Gemma 3 models saved by transformers, run by miaotui, compared with transformers on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from tests.models.test_reference import LONG_TEXT, PROMPTS, assert_logits_and_perplexity_match

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402


def _tokenizer_json(folder) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([LONG_TEXT, *PROMPTS] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _config(kind: str):
    small = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0)
    if kind == "llama":
        return transformers.LlamaConfig(**small, rope_theta=10000.0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**small, tie_word_embeddings=False)
    return transformers.Gemma3TextConfig(**small, head_dim=32, sliding_window=16, query_pre_attn_scalar=32)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2", "gemma3"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    cfg = _config(request.param)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if request.param == "gemma3":  # random init leaves norms at 0 (×(1+0)); make them matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.data.normal_(0, 0.5)
    hf.eval()
    hf.save_pretrained(folder, safe_serialization=True)
    _tokenizer_json(folder)
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", kv_cache_memory=16 * 2**20))
    return request.param, engine, hf


def test_logits_and_perplexity(pair):
    assert_logits_and_perplexity_match(*pair)


def test_greedy(pair):
    name, engine, hf = pair
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        engine.add_request(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), request_id=prompt)
        got = None
        while engine.has_unfinished():
            for o in engine.step():
                got = o.token_ids if o.finished else got
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=0)
        assert got == ref[0, len(ids):].tolist(), f"{name}: greedy continuation of {prompt!r} differs"
