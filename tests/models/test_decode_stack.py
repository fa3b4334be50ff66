"""The fused decode step (engine/fused.py over LlamaStack in kernels/stack.cpp) against the module-by-module
forward it replaces: built from the blocks' own description, it must compute exactly what they compute."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.engine.runner import ModelRunner
from miaotui.kernels import has_amx, has_packed
from tests.models.test_reference import PROMPTS

pytestmark = pytest.mark.skipif(not has_packed(), reason="needs miaotui's kernels")
REAL_STACK = ModelRunner._decode_stack


def _generate(llm: LLM, fused: bool, monkeypatch, prompts: list[str] = PROMPTS) -> tuple[list, int]:
    """Greedy continuations with their logprobs, and how many forward passes ran through the stack."""
    used = [0]

    def spy(self, meta, rows):
        stack = REAL_STACK(self, meta, rows) if fused else None
        used[0] += stack is not None
        return stack

    monkeypatch.setattr(ModelRunner, "_decode_stack", spy)
    # Each run computes its prompts whole: a prefix cached by the other would spare this one rows of its prompt
    # step, and a step's row count picks its products (fp32 from 48 rows where AVX-512 has no bf16 units).
    llm.engine.kv.reset_prefix_cache()
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    return [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]) for o in outs], used[0]


def _assert_same(llm: LLM, monkeypatch, prompts: list[str] = PROMPTS) -> None:
    modules, _ = _generate(llm, False, monkeypatch, prompts)
    fused, steps = _generate(llm, True, monkeypatch, prompts)
    assert steps >= 15  # every decode step after the prompts' prefill
    assert fused == modules  # the same kernels in the same order: identical tokens and logprobs
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("batch", [2, len(PROMPTS)])
def test_stack_equals_modules_on_smollm2(smollm2_path, kv_cache_dtype, batch, monkeypatch):
    """The default model and setting: `auto` decodes a few rows on the file's exact 4-bit codes and, with AMX,
    more rows (here 5) on the bf16 tiles; with an int8 cache the stack quantizes this step's keys and values as
    the module path does."""
    llm = LLM(str(smollm2_path), kv_cache_memory=32 * 2**20, kv_cache_dtype=kv_cache_dtype)
    _assert_same(llm, monkeypatch, PROMPTS[:batch])


@pytest.mark.skipif(not has_amx(), reason="bf16 weights run on miaotui's kernel only in AMX tile order")
def test_stack_equals_modules_on_bf16_tiles(smollm2_path, monkeypatch):
    """`none`: every projection a dense bf16 weight in tile order."""
    _assert_same(LLM(str(smollm2_path), quantization="none", kv_cache_memory=32 * 2**20), monkeypatch)


def test_stack_equals_modules_with_biases_and_input_scales(tmp_path, monkeypatch):
    """A Qwen2-shaped model (q/k/v biases) quantized from float to int4: activation-aware input scales too."""
    transformers = pytest.importorskip("transformers")
    from tests.models.test_hf_folders import _config, _tokenizer_json

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config("qwen2"), dtype=torch.float32)
    for name, p in hf.named_parameters():
        if name.endswith("bias"):  # initialised to zero: make them count
            p.data.normal_(0, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_json(tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", quantization="int4", kv_cache_memory=16 * 2**20)
    layer = llm.engine.loaded.model.model.layers[0]
    assert layer.self_attn.qkv_proj.bias is not None
    assert any(block.mlp.down_proj.format.kernel().in_scale is not None for block in llm.engine.loaded.model.layers)
    _assert_same(llm, monkeypatch)


def test_stack_steps_aside(smollm2_path, monkeypatch):
    """Where a projection runs on no kernel of miaotui's (fp32 weights: torch's own product) the modules run."""
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", kv_cache_memory=32 * 2**20)
    _, steps = _generate(llm, True, monkeypatch)
    assert steps == 0
