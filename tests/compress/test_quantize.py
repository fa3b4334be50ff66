"""Weight-only quantization: each kernel against a float reference on the same quantized weights, the
quantization error itself within its stated bound, and a quantized model that still answers."""

from __future__ import annotations

import pytest
import torch

from miaotui.errors import MiaotuiError
from miaotui.loader.tensors import FileTensor
from miaotui.quant import recipe
from miaotui.quant.int4 import Int4Weight
from miaotui.quant.int8 import Int8Weight
from miaotui.quant.recipe import Matrix, check, int4_format, int8_format


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(256, 512) * 0.05


@pytest.mark.parametrize("m", [1, 7, 32])
def test_int8_kernel_matches_dequantized_reference(w, m):
    q = Int8Weight.from_float(w, torch.bfloat16)
    x = torch.randn(m, 512, dtype=torch.bfloat16)
    ref = x.float() @ q.dequantize().t()
    out = q.matmul(x).float()
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output rounding
    # Quantization error of per-channel int8: at most half a step per weight, the step barely above amax / 127.
    step = q.scales.float()[:, None]
    assert (step <= w.abs().amax(dim=1, keepdim=True) / 127 * 1.02).all()
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_matches_dequantized_reference(w, group):
    q = Int4Weight.from_float(w, group)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    deq = q.dequantize()
    ref = x.float() @ deq.t()
    assert ((q.matmul(x).float() - ref).abs().max() / ref.abs().max()) < 1e-2
    g = w.reshape(256, -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    minmax = (torch.round((g - lo) / step) * step + lo - g).square().sum(-1)
    chosen = (deq.reshape(256, -1, group) - g).square().sum(-1)
    # The clip search never does worse than the plain [min, max] grid (within half a step), up to the bf16
    # rounding of scales, zeros and the kernel's output (~2^-8 of the weights' range).
    slack = group * (w.abs().max() * 2**-7) ** 2
    assert (chosen <= minmax * 1.02 + slack).all()
    assert chosen.sum() < minmax.sum()  # and on Gaussian weights it is better overall


def test_int4_recovers_a_q4_1_grid_exactly():
    """Weights already on a 4-bit grid per group (as GGUF Q4_1 stores them) survive int4 unchanged."""
    torch.manual_seed(1)
    n, k = 64, 128
    d = (torch.rand(n, k // 32, 1) * 0.01 + 0.001).to(torch.bfloat16).float()
    m = (torch.randn(n, k // 32, 1) * 0.01).to(torch.bfloat16).float()
    codes = torch.randint(0, 16, (n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the whole grid
    w = (codes * d + m).reshape(n, k)
    deq = Int4Weight.from_float(w, 32).dequantize()
    assert ((deq - w).abs().max() / w.abs().max()) < 1e-2


def test_rows_that_do_not_split_fall_back_to_int8():
    assert isinstance(int4_format(Matrix(FileTensor.of(torch.randn(8, 48))), 32, torch.bfloat16), Int8Weight)


def test_bad_method_and_group():
    with pytest.raises(MiaotuiError, match="int5"):
        check("int5", 32)
    with pytest.raises(MiaotuiError, match="group size"):
        check("int4", 48)


@pytest.mark.parametrize("method", ["int8", "int4", "auto"])
def test_quantized_model_still_answers(smollm2_path, method):
    from miaotui import LLM, SamplingParams

    # Steps of at most 4 tokens: the perplexity below then runs through the decode-sized kernels (auto's int4).
    llm = LLM(str(smollm2_path), dtype="bfloat16", quantization=method, kv_cache_memory=32 * 2**20,
              max_num_batched_tokens=4)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    # Judged by perplexity below, not by the answer: it is a near tie on this Q4_1 file ("Paris" or "L'Étoile…", as
    # llama.cpp answers) that bf16 rounding decides — unquantized bf16 answers "L'Étoile…" on AVX-512, fp32 "Paris".
    assert out.text.strip()
    from miaotui.kernels import has_amx

    # auto on a small 4-bit file in bf16: its codes for decode beside dense weights where the CPU has AMX
    assert llm.engine.quantization == {"auto": "hybrid" if has_amx() else "native"}.get(method, method)
    ref = LLM(str(smollm2_path), dtype="bfloat16", quantization="none", kv_cache_memory=32 * 2**20)
    ids = ref.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 4)
    import math

    def ppl(engine):
        logits = engine.prompt_logits(ids)
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())

    assert ppl(llm.engine) / ppl(ref.engine) < {"int8": 1.02, "int4": 1.10, "auto": 1.10}[method]


def test_gguf_codes_go_to_the_kernels_exactly(smollm2_path):
    """A Q4_1 file's codes become the int4 weights as they are, and int8 holds them (and the Q8_0 output head) as
    8-bit codes with the file's block scales: each result equals the file's own values up to the rounding of
    each group's scale and zero (fp16 in miaotui's kernel, bf16 in torch's), far inside half a step."""
    from miaotui.kernels import has_packed
    from miaotui.loader import load

    loaded = load(smollm2_path, "cpu", torch.float32)
    for module in (loaded.model.model.layers[0].self_attn.qkv_proj, loaded.model.model.layers[3].mlp.down_proj):
        mat = Matrix(FileTensor.cat([module.parts[i] for i in range(len(module.output_sizes))]))
        w = mat.values
        assert mat.codes is not None and mat.codes.bits == 4
        q = int4_format(mat, 32, torch.float32)
        assert isinstance(q, Int4Weight) and q.in_scale is None
        err = (q.dequantize() - w).abs()
        step = (w.view(w.shape[0], -1, 32).amax(-1) - w.view(w.shape[0], -1, 32).amin(-1)) / 15
        assert (err.view(w.shape[0], -1, 32) <= step[..., None] * 0.05 + w.abs().max() * 2**-8).all()
        if has_packed():
            assert torch.equal(int8_format(mat, torch.float32).dequantize(), w)
    head = Matrix(loaded.model.lm_head.source)  # tied: the embedding table, Q8_0 in this file
    assert head.codes is not None and head.codes.bits == 8
    if has_packed():
        assert torch.equal(int8_format(head, torch.float32).dequantize(), head.values)


def test_auto_adds_a_dense_copy_only_to_small_models(smollm2_path, monkeypatch):
    """hybrid's bf16 copy (AMX CPUs only: elsewhere the codes' own bf16 product left it nothing to save) costs load
    time and 2 bytes a weight: `auto` keeps it to small models (SmolLM2: 106M weights in its products); past
    HYBRID_MAX_WEIGHTS it decodes and prefills on the codes, and so it does with activations in one int8 term,
    where the codes beat the copy at every size."""
    from miaotui import LLM
    from miaotui.kernels import has_amx, has_packed
    from miaotui.loader import load

    if not has_packed():
        pytest.skip("native needs miaotui's kernels, not built here")
    model = load(smollm2_path, "cpu", torch.bfloat16).model
    assert 100e6 < recipe.matrix_weights(model) < 110e6
    small = recipe.resolve("auto", 32, model, torch.bfloat16, torch.device("cpu"))[0]
    assert recipe.resolve("auto", 32, model, torch.bfloat16, torch.device("cpu"), activation_bits=8)[0] == "native"
    assert LLM(smollm2_path, dtype="bfloat16", activation_bits=8).engine.quantization == "native"
    monkeypatch.setattr(recipe, "HYBRID_MAX_WEIGHTS", 100_000_000)
    large = recipe.resolve("auto", 32, model, torch.bfloat16, torch.device("cpu"))[0]
    assert (small, large) == (("hybrid" if has_amx() else "native"), "native")


@pytest.mark.parametrize("method", ["none", "int8"])
def test_file_tensors_are_dropped_once_converted(smollm2_path, method):
    from miaotui import LLM
    from miaotui.layers.linear import Embedding, Linear

    llm = LLM(str(smollm2_path), dtype="float32", quantization=method, kv_cache_memory=2**24)
    assert llm.engine.quantization == method
    modules = list(llm.engine.loaded.model.modules())
    assert not any(m.parts for m in modules if isinstance(m, Linear))
    assert not any(m.source for m in modules if isinstance(m, Embedding))
    assert all(m.format is not None for m in modules if isinstance(m, (Linear, Embedding)))


def test_activation_aware_int4_lowers_the_output_error():
    """Channels that carry large activations get finer steps when calibration statistics are given; inputs are
    scaled back at run time, so the layer still computes x Wᵀ."""
    torch.manual_seed(2)
    w = torch.randn(128, 256) * 0.05
    loud = torch.ones(256)
    loud[torch.randperm(256)[:12]] = 30.0  # a few outlier channels, as real hidden states have

    def inputs(n):
        return (torch.randn(n, 256) * loud).to(torch.bfloat16)

    calib = inputs(512).float()
    plain = Int4Weight.from_float(w, 32)
    aware = Int4Weight.from_float(w, 32, calib.square().mean(0))
    assert plain.in_scale is None and aware.in_scale is not None
    x = inputs(256)
    ref = x.float() @ w.t()
    err_plain = (plain.matmul(x).float() - ref).square().mean()
    err_aware = (aware.matmul(x).float() - ref).square().mean()
    assert err_aware < 0.7 * err_plain
    # The run-time input scaling is part of the layer: its dequantized weight reproduces its output.
    deq_out = x.float() @ aware.dequantize().t()
    assert ((aware.matmul(x).float() - deq_out).abs().max() / deq_out.abs().max()) < 1e-2


def test_int4_calibrates_only_requantized_weights(smollm2_path, gemma3_path):
    """Engine-level: `int4` on a Q4_1 file uses the file's codes (nothing to calibrate); activation-aware
    scaling shows up only where weights are requantized, and never on Gemma's QK-normalised projection."""
    from miaotui import LLM

    llm = LLM(smollm2_path, quantization="int4", kv_cache_memory=16 * 2**20)
    scaled = [m for m in llm.engine.runner.model.modules() if getattr(getattr(m, "format", None), "in_scale", None)
              is not None]
    assert scaled == []

    gemma = LLM(gemma3_path, quantization="int4", kv_cache_memory=16 * 2**20).engine.runner.model
    layers = gemma.model.layers
    assert all(getattr(layer.self_attn.qkv_proj.format, "in_scale", None) is None for layer in layers)
    assert any(getattr(layer.mlp.gate_up_proj.format, "in_scale", None) is not None for layer in layers)
    # Attention stored in 5-bit blocks (Gemma's Q5_0 q/k/v) stays at 8 bits; its Q4_K output projection is
    # taken at 4 bits exactly, and the Q5_0 MLP is requantized to 4.
    assert all(isinstance(layer.self_attn.qkv_proj.format, Int8Weight) for layer in layers)
    assert all(isinstance(layer.self_attn.o_proj.format, Int4Weight) for layer in layers)
    assert all(isinstance(layer.mlp.gate_up_proj.format, Int4Weight) for layer in layers)


def test_untied_embedding_takes_int4_rows():
    """Under int4 an embedding table that is only looked up (not a tied head) is held in 4-bit groups; its rows
    come back as the dequantized weight's rows, in the asked dtype."""
    from miaotui.kernels import has_packed
    from miaotui.quant.recipe import embedding_format

    if not has_packed():
        pytest.skip("no VNNI kernel layout on this CPU")
    torch.manual_seed(0)
    table = torch.randn(1000, 64) * 0.02
    emb = embedding_format(Matrix(FileTensor.of(table)), "int4", torch.bfloat16)
    assert isinstance(emb, Int4Weight) and emb.nbytes < 0.7 * table.numel()
    ids = torch.tensor([[3, 999], [0, 3]])
    rows = emb.lookup(ids, torch.bfloat16)
    assert rows.shape == (2, 2, 64) and rows.dtype == torch.bfloat16
    assert torch.equal(rows.float(), emb.dequantize()[ids].bfloat16().float())
    assert ((rows.float() - table[ids]).abs().amax(-1) <= table[ids].abs().amax(-1) / 7).all()  # 4-bit steps
    assert isinstance(embedding_format(Matrix(FileTensor.of(table)), "int8", torch.bfloat16), Int8Weight)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_native_holds_the_files_own_codes(name):
    """`native` (auto's choice for a quantized file wherever miaotui's kernels run, in fp32): every 4-bit block
    matrix as int4 codes and every 5- to 8-bit one as int8 codes, both exactly the file's weights; Q6_K as 6-bit
    codes exactly where the VNNI kernel is built, else requantized to 8-bit ones; no float copy. Its perplexity is
    the dense model's (activations keep ~15 bits)."""
    import math

    from miaotui import LLM
    from miaotui.kernels import has_packed
    from miaotui.layers.linear import Linear
    from tests.conftest import model_path

    if not has_packed():
        pytest.skip("miaotui's kernels are not built here")
    path = model_path(name)
    llm = LLM(str(path), dtype="float32", kv_cache_memory=32 * 2**20)
    assert llm.engine.quantization == "native"
    model = llm.engine.loaded.model
    formats = [m.format for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(f, (Int4Weight, Int8Weight)) and f.kernel() is not None for f in formats)
    assert isinstance(model.head, Int8Weight)
    if name == "qwen2.5-coder-0.5b":  # its ffn_down are Q6_K
        from miaotui.quant.packed import six_bit_codes
        assert any(f.kernel().packed.bits == 6 for f in formats) == six_bit_codes()
    dense = LLM(str(path), dtype="float32", quantization="none", kv_cache_memory=32 * 2**20)
    # the file's own values: the codes dequantize to the dense model's weights up to the fp16 rounding of their
    # scales; Q6_K's (no exact 8-bit form) within half an 8-bit step of each group of 32
    for m, d in zip((m for m in model.modules() if isinstance(m, Linear)),
                    (m for m in dense.engine.loaded.model.modules() if isinstance(m, Linear))):
        w = d.format.weight.view(d.format.weight.shape[0], -1, 32)
        err = (m.format.dequantize().view_as(w) - w).abs()
        step = w.abs().amax(-1, keepdim=True) / 127
        assert (err <= torch.maximum(step * 0.51, w.abs().max() * 2**-10)).all()
    ids = llm.tokenizer.encode("The history of the Roman Empire spans many centuries. " * 6)

    def ppl(engine):
        logits = engine.prompt_logits(ids)
        return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())

    assert abs(ppl(llm.engine) / ppl(dense.engine) - 1) < 0.003


def test_blocks_pack_straight_into_the_kernel_layout(smollm2_path, gemma3_path):
    """Loading packs a GGUF's blocks in C++ (no float detour): exactly the layout the codes give through torch, for
    every block type in the real files (and llama's rearranged q/k rows). The K-quants exactly as stored (their
    values bit for bit, in fewer bytes): Q4_K with its own scales on every class, Q6_K as 6-bit codes where the VNNI
    kernel is built, elsewhere as 8-bit codes (no exact 8-bit form) within half a step of its values."""
    from miaotui.kernels import has_packed
    from miaotui.loader.gguf import iter_weights, read_config
    from miaotui.loader.gguf_file import GGUFFile
    from miaotui.quant.packed import PackedWeight, six_bit_codes
    from tests.conftest import model_path

    if not has_packed():
        pytest.skip("miaotui's kernels are not built here")
    seen = set()
    for path in (smollm2_path, gemma3_path, model_path("qwen2.5-coder-0.5b")):
        f = GGUFFile(path)
        cfg = read_config(f)
        for name, t in iter_weights(f, cfg):
            blocks = t.blocks()
            kind = (blocks[0].type, blocks[0].rows is not None) if blocks else None
            if kind is None or kind in seen:
                continue
            seen.add(kind)
            packed = PackedWeight.from_blocks(blocks, t.shape[1])
            assert packed is not None and packed.shape == t.shape, name
            if kind[0] == "Q6_K":
                w = t.values()
                assert packed.bits == (6 if six_bit_codes() else 8), name
                if packed.bits == 6:
                    assert torch.equal(packed.dequantize(), w) and packed.nbytes * 8 / w.numel() < 6.6, name
                    continue
                step = w.view(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
                assert ((packed.dequantize().view_as(step.expand(-1, -1, 32)) - w.view(w.shape[0], -1, 32)).abs()
                        <= step * 0.51 + 1e-6).all(), name
                continue
            codes = t.codes()
            ref = PackedWeight.pack(codes.q, codes.d, codes.m, packed.bits)
            assert torch.equal(packed.data, ref.data), name
            if kind[0] == "Q4_K":
                assert torch.equal(packed.dequantize(), t.values()) and packed.nbytes < ref.nbytes * 0.93, name
                continue
            assert torch.equal(packed.dm, ref.dm), name
    assert {k for k, _ in seen} >= {"Q4_1", "Q4_K", "Q5_0", "Q8_0", "Q6_K"} and ("Q4_1", True) in seen


def test_parts_of_a_fused_projection_pack_in_place(gemma3_path):
    """A fused projection's parts (q, k, v; gate, up) pack straight into their rows of one layout: the same bytes
    as each part packed alone and concatenated, block types mixed (Gemma's first layer: Q5_0 q and k, Q8_0 v)."""
    from miaotui.kernels import has_packed
    from miaotui.loader.gguf import iter_weights, read_config
    from miaotui.loader.gguf_file import GGUFFile
    from miaotui.quant.packed import PackedWeight

    if not has_packed():
        pytest.skip("miaotui's kernels are not built here")
    f = GGUFFile(gemma3_path)
    weights = dict(iter_weights(f, read_config(f)))
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
    parts = [b for n in names for b in weights[n].blocks()]
    assert len({p.type for p in parts}) > 1, "the test wants mixed block types"
    k = weights[names[0]].shape[1]
    fused = PackedWeight.from_blocks(parts, k, 8)
    alone = [PackedWeight.from_blocks([p], k, 8) for p in parts]
    assert fused.shape == (sum(p.num_rows for p in parts), k)
    assert torch.equal(fused.data, torch.cat([a.data for a in alone]))
    assert torch.equal(fused.dm, torch.cat([a.dm for a in alone]))


def test_methods_on_cuda_use_torch_kernels_or_say_which_is_missing(monkeypatch):
    """Which weight formats a CUDA device gets, decided without one: auto stays dense, int8/int4 go to torch's
    weight-only kernels when the torch build has them (else a clear refusal), CPU layouts are refused."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(quantization=None, quantization_group=None, weight_bits=4))
    cuda = torch.device("cuda")
    assert recipe.resolve("auto", 32, model, torch.bfloat16, cuda) == ("none", 32)
    monkeypatch.setattr(recipe, "cuda_kernel", lambda method: True)
    assert recipe.resolve("int4", 64, model, torch.bfloat16, cuda) == ("int4", 64)
    assert recipe.resolve("int8", 32, model, torch.bfloat16, cuda) == ("int8", 32)
    with pytest.raises(MiaotuiError, match="CPU layout"):
        recipe.resolve("native", 32, model, torch.bfloat16, cuda)
    monkeypatch.setattr(recipe, "cuda_kernel", lambda method: False)
    with pytest.raises(MiaotuiError, match="_weight_int4pack_mm"):
        recipe.resolve("int4", 32, model, torch.bfloat16, cuda)


@pytest.mark.parametrize("bits", [8, 4])
def test_hybrid_serves_batches_on_its_codes_with_one_activation_term(bits):
    """With activations in one int8 term the codes' products beat the dense copy at every size (quant/hybrid.py);
    with two, batches past 16 (8-bit codes) or 32 (4-bit) rows go to the copy."""
    from miaotui.kernels import has_packed
    from miaotui.quant.dense import DenseWeight
    from miaotui.quant.hybrid import HybridWeight

    if not has_packed():
        pytest.skip("no packed integer kernel on this CPU")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    small = Int8Weight.from_float(w, torch.float32) if bits == 8 else Int4Weight.from_float(w, 32)
    hybrid = HybridWeight(small, DenseWeight(small.dequantize()))
    x = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(hybrid.matmul(x), hybrid.dense.matmul(x))
    assert torch.equal(hybrid.matmul(x[:8]), small.matmul(x[:8]))
    small.fast.act_bits = 8  # what recipe.round_activations sets under --activation-bits 8
    prompt = torch.randn(300, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(hybrid.matmul(x), small.matmul(x))
    assert torch.equal(hybrid.matmul(prompt), small.matmul(prompt))
