"""Tensor parallelism over 2 processes (gloo, 1 thread each) computes what one process computes: on the three real
models in fp32, logits within 1e-4 and identical greedy tokens, each rank holding about half the blocks' weights."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine
from miaotui.engine.tensor_parallel import head_ranges, parse_cpulist
from miaotui.layers.linear import Linear
from miaotui.sampling import SamplingParams
from tests.conftest import REAL_MODELS, model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_heads_split_by_kv_group_or_evenly_when_kv_heads_are_fewer_than_ranks():
    assert [head_ranges(9, 3, r, 2) for r in (0, 1)] == [((0, 3), (0, 1)), ((3, 9), (1, 3))]  # SmolLM2
    assert [head_ranges(4, 1, r, 2) for r in (0, 1)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]  # Gemma 3 270M
    assert [head_ranges(14, 2, r, 2) for r in (0, 1)] == [((0, 7), (0, 1)), ((7, 14), (1, 2))]  # Qwen2.5 0.5B


def test_numa_cpu_lists_parse():
    assert parse_cpulist("0-3,8-9,12\n") == [0, 1, 2, 3, 8, 9, 12]


def _greedy(engine: Engine, ids: list[list[int]]) -> list[list[int]]:
    rids = [engine.add_request(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)) for p in ids]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[r] for r in rids]


def _block_bytes(engine: Engine) -> int:
    model = engine.loaded.model
    return sum(m.format.nbytes for layer in model.layers for m in layer.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("alias", REAL_MODELS)
def test_two_ranks_compute_what_one_does(alias):
    cfg = EngineConfig(model=str(model_path(alias)), dtype="float32", quantization="none", threads=1,
                       kv_cache_memory=32 << 20, max_model_len=256)
    one = Engine(cfg)
    ids = [one.tokenizer.encode(p) for p in PROMPTS]
    ref_logits, ref_tokens, ref_bytes = one.prompt_logits(ids[2]), _greedy(one, ids), _block_bytes(one)
    del one
    gc.collect()
    two = Engine(replace(cfg, tensor_parallel_size=2))
    try:
        logits = two.prompt_logits(ids[2])
        assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-4
        assert _greedy(two, ids) == ref_tokens
        assert 0.45 < _block_bytes(two) / ref_bytes < 0.6  # rank 0's share; rank 1 holds the rest
    finally:
        two.close()
    assert torch.distributed.is_initialized() is False
