"""The fused decode step (LlamaStack in kernels/cpu_ops.cpp) against the module-by-module forward it replaces."""

from __future__ import annotations

import pytest
import torch

from miaotui import LLM, SamplingParams
from miaotui.kernels import packed
from miaotui.models.llama import LlamaForCausalLM
from tests.models.test_reference import PROMPTS

pytestmark = pytest.mark.skipif(not packed.available(), reason="needs miaotui's VNNI kernels")
REAL_STACK = LlamaForCausalLM._decode_stack


def _generate(llm: LLM, fused: bool, monkeypatch) -> tuple[list, int]:
    """Greedy continuations with their logprobs, and how many forward passes ran through the stack."""
    used = [0]

    def spy(self, x, ctx):
        stack = REAL_STACK(self, x, ctx) if fused else None
        used[0] += stack is not None
        return stack

    monkeypatch.setattr(LlamaForCausalLM, "_decode_stack", spy)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
                        use_tqdm=False)
    return [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]) for o in outs], used[0]


def _assert_same(llm: LLM, monkeypatch) -> None:
    modules, _ = _generate(llm, False, monkeypatch)
    fused, steps = _generate(llm, True, monkeypatch)
    assert steps >= 15  # every decode step after the prompts' prefill
    assert fused == modules  # the same kernels in the same order: identical tokens and logprobs
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_stack_equals_modules_on_smollm2(smollm2_path, kv_cache_dtype, monkeypatch):
    """The default model and setting: `auto` decodes on the file's exact 4-bit codes (and its 8-bit head); with
    an int8 cache the stack quantizes this step's keys and values as the module path does."""
    _assert_same(LLM(str(smollm2_path), kv_cache_memory=32 * 2**20, kv_cache_dtype=kv_cache_dtype), monkeypatch)


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
    assert any(block.mlp.down_proj.kernel()[1] is not None for block in llm.engine.loaded.model.model.layers)
    _assert_same(llm, monkeypatch)


def test_stack_steps_aside(smollm2_path, monkeypatch):
    """Where a projection has no low-bit kernel (bf16 dense weights) the modules run every step."""
    _, steps = _generate(LLM(str(smollm2_path), quantization="none", kv_cache_memory=32 * 2**20), True, monkeypatch)
    assert steps == 0
