"""The CUDA path on a GPU (skipped without one; scripts/gpu_check.py runs these): greedy tokens equal to miaotui's
CPU fp32 path, bf16 logits within bf16's error, CUDA graphs and FlexAttention changing nothing, int8/int4 products
equal to their dequantized weights. Real models when they are in the cache, else same-shape stand-ins (random
weights: the GPU machines cannot fetch or carry the real files), compared on the same weights either way."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from miaotui import SamplingParams
from miaotui.config import EngineConfig
from miaotui.engine.engine import Engine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.py)")]

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
N_TOKENS = 32


def model_source(alias: str) -> str:
    """The cached real file, else the stand-in (built once into $MIAOTUI_STANDINS, or a folder in the cache)."""
    from miaotui.bench.standins import source

    home = Path(os.environ.get("MIAOTUI_STANDINS", Path.home() / ".cache" / "miaotui" / "standins"))
    return str(source(alias, home / alias)[0])


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 means fp32 here: no TF32 in cuBLAS or in Triton's dots (FlexAttention follows this setting)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def engine(alias: str, device: str, dtype: str = "float32", **kw) -> Engine:
    kw.setdefault("kv_cache_memory", 512 * 2**20)
    return Engine(EngineConfig(model=model_source(alias), device=device, dtype=dtype, quantization="none",
                               max_num_seqs=8, **kw))


def prompts(engine: Engine, n: int = 5) -> list[list[int]]:
    rng = random.Random(0)
    vocab = min(engine.model_config.vocab_size, 30000)
    stops = set(engine.tokenizer.stop_ids)
    pool = [t for t in range(256, vocab) if t not in stops]
    return [[rng.choice(pool) for _ in range(rng.randint(5, 60))] for _ in range(n)]


def greedy(engine: Engine, ids: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
    order = [engine.add_request(p, params) for p in ids]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[i] for i in order]


def _logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The logits after the prompt, on the CPU."""
    return engine.prompt_logits(ids)[-1].float().cpu()


def test_graphs_and_eager_agree():
    ids_engine = engine("smollm2-135m", "cuda")
    ids = prompts(ids_engine)
    eager = engine("smollm2-135m", "cuda", enforce_eager=True)
    assert eager.runner.graphs is None
    assert greedy(ids_engine, ids) == greedy(eager, ids)  # 5 rows replay the graph of 8


def test_flex_and_sdpa_agree(monkeypatch):
    flex = engine("gemma3-270m", "cuda")  # sliding windows and global layers
    ids = prompts(flex)
    monkeypatch.setenv("MIAOTUI_ATTENTION", "torch-sdpa")
    sdpa = engine("gemma3-270m", "cuda", enforce_eager=True)
    assert sdpa.runner.backend.name == "torch-sdpa"
    assert greedy(flex, ids) == greedy(sdpa, ids)


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_products_equal_their_dequantized_weights(bits):
    from miaotui.quant import recipe
    from miaotui.quant.int4 import Int4Weight
    from miaotui.quant.int8 import Int8Weight

    method = f"int{bits}"
    if not recipe.cuda_kernel(method):
        pytest.skip(f"this torch build has no CUDA aten.{recipe.CUDA_KERNELS[method]}")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 1024, device="cuda", generator=g) * 0.02
    x = torch.randn(7, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    fmt = Int8Weight.from_float(w, torch.bfloat16) if bits == 8 else Int4Weight.from_float(w, 64)
    assert fmt.fast is None  # torch's CUDA kernel, not miaotui's CPU layout
    deq = fmt.dequantize().to(torch.float32)
    assert (deq - w).abs().max() < (0.02 * 4 / (127 if bits == 8 else 7))  # within a step of the grid
    ref = x.float() @ deq.t()
    got = fmt.matmul(x).float()
    assert ((got - ref).norm() / ref.norm()) < 0.01


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_low_bit_engine_on_gpu(method):
    from miaotui.quant import recipe

    if not recipe.cuda_kernel(method):
        pytest.skip(f"this torch build has no CUDA aten.{recipe.CUDA_KERNELS[method]}")
    dense = engine("qwen2.5-coder-0.5b", "cuda", "bfloat16")
    low = Engine(EngineConfig(model=model_source("qwen2.5-coder-0.5b"), device="cuda", dtype="bfloat16",
                              quantization=method, max_num_seqs=8, kv_cache_memory=512 * 2**20))
    assert low.quantization == method
    ids = prompts(dense)[0]
    a, b = _logits(dense, ids), _logits(low, ids)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > (0.99 if method == "int8" else 0.95)
    assert len(greedy(low, [ids])[0]) == N_TOKENS


# The checks against the CPU reference last: their fp32 CPU runs are the slow part, and the bounded run of
# scripts/gpu_check.py reaches the ones above first (on the first H200 run they took the whole budget).
@pytest.fixture(scope="module", params=MODELS)
def cpu_reference(request):
    cpu = engine(request.param, "cpu", kv_cache_memory=128 * 2**20)
    ids = prompts(cpu)
    ref = (request.param, ids, greedy(cpu, ids), _logits(cpu, ids[-1]))
    del cpu
    return ref


def test_gpu_fp32_greedy_equals_cpu_fp32(cpu_reference):
    alias, ids, tokens, _ = cpu_reference
    gpu = engine(alias, "cuda")
    assert gpu.runner.backend.name == "flex"
    assert gpu.runner.graphs is not None, "decode steps were not captured"
    assert greedy(gpu, ids) == tokens
    assert gpu.runner.graphs.replays > 0


def test_gpu_bf16_logits_within_bf16_error(cpu_reference):
    alias, ids, _, ref = cpu_reference
    got = _logits(engine(alias, "cuda", "bfloat16"), ids[-1])
    rel = ((got - ref).norm() / ref.norm()).item()
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); tens of layers of rounding stay within a few %
    assert rel < 0.05, f"bf16 logits differ from fp32 by {rel:.3%}"
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.998
