"""miaotui's C++ CPU kernels (miaotui/kernels/), each against the plain-torch computation it replaces — on every
CPU class this machine can run (generic C++, AVX2, AVX-512, AMX: each its own build of the same sources)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from miaotui import kernels

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the kernels cannot be built")


@pytest.fixture(scope="module", params=kernels.cpu_isas())
def ops(request):
    m = kernels.load(request.param)
    assert m is not None, f"the {request.param} kernels failed to build (see the warning above)"
    return m


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return bool(((a.float() - b.float()).abs() <= tol * (1 + b.float().abs())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(ops, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 88, dtype=dtype) * 3, torch.randn(88, dtype=dtype)
    ref = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6) * w.float()
    assert close(ops.rms_norm(x, w, 1e-6), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation(ops, dtype, gelu):
    torch.manual_seed(0)
    x = torch.randn(4, 2 * 100, dtype=dtype) * 4  # 100: a vector body and a scalar tail
    gate, up = x.chunk(2, -1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    assert close(ops.gated_act(x, gelu), act * up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_strided_heads_in_place(ops, dtype):
    from miaotui.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 4096, 10000.0)
    rope.reserve(200)
    assert rope.cos.shape == (1024, 64)  # grown in steps, not to the whole context length
    qkv = torch.randn(6, 5 * 64, dtype=dtype)
    qk = qkv[:, : 4 * 64].view(6, 4, 64)  # q and k heads inside a fused output: rows are strided
    pos = torch.tensor([0, 1, 7, 100, 3, 255])
    cos, sin = rope.cos[pos][:, None], rope.sin[pos][:, None]
    half = 32
    x = qk.float()
    ref = x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    v_before = qkv[:, 4 * 64 :].clone()
    ops.rope_(qk, pos, rope.cos, rope.sin)
    assert close(qk, ref, dtype)
    assert torch.equal(qkv[:, 4 * 64 :], v_before)  # the v part is untouched
    with pytest.raises(RuntimeError, match="beyond the angle table"):
        ops.rope_(qk, torch.tensor([0, 1, 2, 3, 4, 1024]), rope.cos, rope.sin)


def reference_attention(q, k_cache, v_cache, tables, lens, scale, window, k_scale=None, v_scale=None):
    out = []
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : (n + bs - 1) // bs]
        keys = k_cache[blocks].flatten(0, 1)[:n].float()
        values = v_cache[blocks].flatten(0, 1)[:n].float()
        if k_scale is not None:
            keys = keys * k_scale[blocks].flatten(0, 1)[:n].float()
            values = values * v_scale[blocks].flatten(0, 1)[:n].float()
        first = max(0, n - window) if window else 0
        keys, values = keys[first:].transpose(0, 1), values[first:].transpose(0, 1)  # [Hkv, n, D]
        group = q.shape[1] // keys.shape[0]
        qb = q[b].float().view(keys.shape[0], group, -1)
        out.append(F.scaled_dot_product_attention(qb, keys, values, scale=scale).reshape(q.shape[1], -1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,cache", [(torch.float32, "model"), (torch.bfloat16, "model"),
                                         (torch.bfloat16, "int8"), (torch.float32, "int8")])
@pytest.mark.parametrize("head_dim,window", [(64, 0), (80, 0), (64, 20)])  # 80: the generic (non-unrolled) path
def test_paged_attention_matches_gathered_sdpa(ops, dtype, cache, head_dim, window):
    torch.manual_seed(0)
    blocks, bs, hq, hkv = 40, 16, 6, 2
    lens = torch.tensor([1, 17, 50, 33])
    tables = torch.stack([torch.randperm(blocks - 1)[:8] + 1 for _ in lens])  # scattered blocks, block 0 unused
    q = torch.randn(len(lens), hq, head_dim, dtype=dtype)
    k = torch.randn(blocks, bs, hkv, head_dim, dtype=dtype)
    v = torch.randn(blocks, bs, hkv, head_dim, dtype=dtype)
    ks = vs = None
    if cache == "int8":
        ks = (k.abs().amax(-1, keepdim=True).float() / 127).to(dtype)
        vs = (v.abs().amax(-1, keepdim=True).float() / 127).to(dtype)
        k = torch.round(k.float() / ks.float()).clamp(-127, 127).to(torch.int8)
        v = torch.round(v.float() / vs.float()).clamp(-127, 127).to(torch.int8)
    scale = head_dim**-0.5
    out = ops.paged_attention(q, k, v, ks, vs, tables, lens, scale, window)
    ref = reference_attention(q, k, v, tables, lens, scale, window, ks, vs)
    assert out.dtype == dtype and out.shape == q.shape
    assert close(out, ref, dtype)


@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 9, 3), (128, 12, 2), (256, 4, 1)])  # SmolLM2, Qwen2.5, Gemma 3
def test_bf16_paged_attention_at_model_head_sizes(ops, head_dim, hq, hkv):
    """A bf16 query and cache at the head sizes with unrolled paths (on AVX-512 BF16 CPUs `vdpbf16ps` scores keys
    and sums values two keys at a time): odd and even lengths, one span and several merged."""
    torch.manual_seed(2)
    blocks, bs = 80, 16
    lens = torch.tensor([1, 2, 31, 256, 601])
    tables = torch.stack([torch.randperm(blocks - 1)[:38] + 1 for _ in lens])
    q = torch.randn(len(lens), hq, head_dim, dtype=torch.bfloat16) * 2
    k = torch.randn(blocks, bs, hkv, head_dim, dtype=torch.bfloat16) * 2
    v = torch.randn(blocks, bs, hkv, head_dim, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    out = ops.paged_attention(q, k, v, None, None, tables, lens, scale, 0)
    ref = reference_attention(q.double(), k.double(), v.double(), tables, lens, scale, 0)
    assert close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("cache", ["model", "int8"])
@pytest.mark.parametrize("hkv,group,d,window", [(1, 2, 64, 0), (3, 2, 64, 0), (1, 2, 64, 300), (2, 6, 128, 0),
                                                (1, 4, 256, 0)])
def test_paged_attention_long_contexts_merge_their_spans(ops, cache, hkv, group, d, window):
    """Past 256 keys a sequence's keys are scored in spans by separate work items and the partial softmaxes merged:
    the same attention as one pass (one kv head, as Gemma 3 270M has; a window that starts mid-span; Qwen2.5's and
    Gemma's head sizes and groups, whose value sums take the heads in chunks), and a sequence's result does not
    depend on the batch it is in."""
    torch.manual_seed(1)
    blocks, bs, hq = 140, 16, group * hkv
    lens = torch.tensor([700, 257, 256, 5])  # three spans (the last partial), two (one key in the second), one
    tables = torch.stack([torch.randperm(blocks - 1)[:48] + 1 for _ in lens])
    q = torch.randn(len(lens), hq, d)
    k, v = torch.randn(blocks, bs, hkv, d), torch.randn(blocks, bs, hkv, d) * 3
    ks = vs = None
    if cache == "int8":
        ks, vs = k.abs().amax(-1, keepdim=True) / 127, v.abs().amax(-1, keepdim=True) / 127
        k, v = (torch.round(x / s).clamp(-127, 127).to(torch.int8) for x, s in ((k, ks), (v, vs)))
    scale = d**-0.5
    out = ops.paged_attention(q, k, v, ks, vs, tables, lens, scale, window)
    ref = reference_attention(q, k, v, tables, lens, scale, window, ks, vs)
    assert close(out, ref, torch.float32)
    alone = ops.paged_attention(q[:1], k, v, ks, vs, tables[:1], lens[:1], scale, window)
    assert torch.equal(alone, out[:1])


def random_packed(n: int, k: int, bits: int, group: int):
    """Seeded random codes, d and m [N, K/group] and their packed weight (None without the kernel layout)."""
    from miaotui.quant.packed import PackedWeight

    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    d = torch.rand(n, k // group) * 0.01 + 1e-3
    mn = torch.randn(n, k // group) * 0.01
    return codes, d, mn, PackedWeight.pack(codes, d, mn, bits)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32), (8, 96)])
# 11: passes of 6 and 5 tokens (VNNI; at groups of 32, two row blocks at a time, passes of 4 and 3), the widened
# int16 kernel (AVX2); 10: at groups of 32 two row blocks for 4, 4 and 2 tokens (on every VNNI CPU, a Zen 5's
# included); 100: prefill-sized, fp32 without VNNI, and without BF16 units at groups other than 32
@pytest.mark.parametrize("m", [1, 3, 7, 10, 11, 37, 100])
def test_qmatmul_matches_the_dequantized_weight(ops, bits, group, m):
    """The integer kernel (two int8 terms per activation) against x @ (d q + m)ᵀ in fp32; rows not in blocks of 16,
    in_scale applied first; each class's kernel and the plain C++ definition agree to rounding (prefill-sized
    products on CPUs without VNNI, or with AVX-512 but no BF16 units at groups other than 32, are taken in fp32 on
    the dequantized weight: closer still)."""
    n, k = 50, 384
    codes, d, mn, w = random_packed(n, k, bits, group)
    if w is None:
        pytest.skip("miaotui's kernels are not built here")
    deq = (codes.float().view(n, -1, group) * d.half().float()[..., None] + mn.half().float()[..., None]).view(n, k)
    assert torch.equal(w.dequantize(), deq) and torch.equal(w.codes(torch.tensor([49, 3])), codes[[49, 3]])
    rows = torch.tensor([49, 3, 0, 49])  # an embedding lookup: the same rows, straight from the layout
    assert torch.equal(ops.packed_rows(w.data, w.dm, bits, w.group, k, rows), deq[rows])
    with pytest.raises(RuntimeError, match="outside the weight"):
        ops.packed_rows(w.data, w.dm, bits, w.group, k, torch.tensor([64]))
    x = torch.randn(m, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)  # a few outlier channels
    s = torch.rand(k) + 0.5

    def qmatmul(x, in_scale, reference=False):
        return ops.qmatmul(x, w.data, w.dm, bits, w.group, n, in_scale, reference=reference)

    ref = (x * s) @ deq.t()
    y = qmatmul(x, s)
    assert y.shape == (m, n)
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-4  # the residual term keeps ~15 bits of x
    slow = qmatmul(x, s, reference=True)
    if not 0 < ops.fp32_rows(bits, group) <= m:
        assert torch.allclose(y, slow, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
    sb = s.bfloat16()  # a bf16 in_scale (as Int4Weight stores it) is read as it is: the same bits as in fp32
    assert torch.equal(qmatmul(x, sb), qmatmul(x, sb.float()))
    yb = qmatmul(x.bfloat16(), s)
    assert yb.dtype == torch.bfloat16 and ((yb.float() - ref).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.parametrize("layout", [(4, 32), (4, 128), (8, 32), "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qmatmul_rows_do_not_depend_on_the_batch(ops, layout, dtype):
    """Below prompt sizes a row's product is the same bits whether it goes alone, in a speculative check of a few
    rows or in a batch of 37 (AVX2 takes 4- and 8-bit codes from 8 rows on through its widened int16 kernel, the
    VNNI kernel passes of 6 tokens): a batch or a check gives the one-row step's logits. AMX widens bf16 rows to
    bf16 tiles from 8 rows on, so there only smaller groups of them are compared; its fp32 rows stay exact. Under
    `set_row_exact` (a step that scores speculative proposals) every row, at any row count, is the lone row's,
    on every class: no tiles and no prompt-sized float product (100 rows)."""
    if isinstance(layout, str):
        if ops.qmatmul_path == "generic" and layout == "Q6_K":
            pytest.skip("the portable build takes Q6_K as 8-bit codes")
        n, k = 230, 768  # 15 row blocks: pairs of them inside a thread's range too, and one alone
        raw, _ = random_kquant(layout, n, k)
        data, sc, bits, group = pack_kquant(ops, layout, raw, n, k)
    else:
        (bits, group), n, k = layout, 50, 384
        *_, w = random_packed(n, k, bits, group)
        data, sc, group = w.data, w.dm, w.group
    torch.manual_seed(1)
    x = (torch.randn(100, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)).to(dtype)
    s = torch.rand(k) + 0.5
    alone = torch.cat([ops.qmatmul(x[i:i + 1], data, sc, bits, group, n, s) for i in range(100)])
    for start, size in [(3, 5), (10, 7), (1, 8), (20, 11), (40, 10), (0, 36), (0, 37)]:
        if ops.amx and dtype == torch.bfloat16 and size >= 8:
            continue
        part = ops.qmatmul(x[start:start + size], data, sc, bits, group, n, s)
        assert torch.equal(part, alone[start:start + size]), (start, size)
    before = ops.set_row_exact(True)
    try:
        assert ops.row_exact() and torch.equal(ops.qmatmul(x, data, sc, bits, group, n, s), alone)
    finally:
        ops.set_row_exact(before)
    assert not ops.row_exact()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32)])
@pytest.mark.parametrize("m", [1, 3, 7, 11, 37])
def test_qmatmul_with_one_activation_term_is_llama_cpps_rounding(ops, bits, group, m):
    """`act_bits=8`: each block of 32 activations (times in_scale) rounded once to int8 at amax / 127, as llama.cpp's
    Q8 activations, and multiplied exactly: x_q @ (d q + m)ᵀ, the m term too taking the rounded activations' sum
    (with x's exact sum there, the rounding's error met d q, whose codes sit on one side of zero, instead of the
    centred weight: SmolLM2's perplexity +1.2% instead of +0.4%), on every class's kernel and the plain C++
    definition; visibly coarser than the default's two terms."""
    n, k = 50, 384
    codes, d, mn, w = random_packed(n, k, bits, group)
    if w is None:
        pytest.skip("miaotui's kernels are not built here")
    dq = (codes.double().view(n, -1, group) * d.half().double()[..., None]).view(n, k)
    mfull = mn.half().double().repeat_interleave(group, dim=1)
    x = torch.randn(m, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)
    s = torch.rand(k) + 0.5
    xs = (x * s).view(m, -1, 32)
    amax = xs.abs().amax(-1, keepdim=True)
    xq = (torch.round(xs * (127 / amax)) * (amax / 127)).view(m, k)
    ref = xq.double() @ (dq + mfull).t()

    def qmatmul(act_bits, reference=False):
        return ops.qmatmul(x, w.data, w.dm, bits, w.group, n, s, reference=reference, act_bits=act_bits)

    y = qmatmul(8)
    tol = 2e-6 * ref.abs().max().item()
    assert (y - ref).abs().max() <= tol and (qmatmul(8, reference=True) - ref).abs().max() <= tol
    assert (y - qmatmul(16)).abs().max() > 100 * tol  # the second term is gone
    with pytest.raises(RuntimeError, match="16 bits"):
        qmatmul(12)


@pytest.mark.parametrize("bits", [4, 8])
def test_one_activation_term_keeps_bf16_prompts_on_the_integer_kernel(ops, bits):
    """On VNNI classes, from 128 rows, bf16 activations under two terms go to the widened-codes bf16 GEMM where the
    CPU has bf16 units (they stay on the integers where it has not); under one term the integer kernel is faster
    (Qwen2.5-1.5B at 512 rows: 1.4-1.5x on a Zen 4, 1.0-1.3x on an Ice Lake), so a prompt's rows stay there and are
    rounded as a decode row is: each row's result is what it is in a small batch. So do AVX2's 4-bit codes (one
    term: `vpmaddubsw`, twice fp32's products a cycle); its 8-bit codes and the generic class take an fp32 product
    from 40-96 rows whatever the rounding, and AMX bf16 tiles from 8 rows (5-6x the integer kernel's speed at 96-128
    rows)."""
    if ops.fp32_rows(bits, act_bits=8):
        pytest.skip("prompts take an fp32 product at either rounding here")
    if ops.amx:
        pytest.skip("bf16 prompts take the AMX tiles at either rounding")
    n, k, m = 64, 256, 160
    codes, d, mn, w = random_packed(n, k, bits, 32)
    if w is None:
        pytest.skip("miaotui's kernels are not built here")
    x = torch.randn(m, k).bfloat16()

    def qmatmul(rows):
        return ops.qmatmul(rows, w.data, w.dm, bits, w.group, n, None, reference=False, act_bits=8)

    assert torch.equal(qmatmul(x), torch.cat([qmatmul(x[i : i + 16]) for i in range(0, m, 16)]))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 96)])
@pytest.mark.parametrize("m,n,k", [(8, 50, 384), (17, 50, 384), (40, 50, 384), (600, 5700, 768)])
def test_qmatmul_many_rows_is_a_bf16_product(ops, bits, group, m, n, k):
    """From 8 rows on, the AMX path widens the weight to bf16 and multiplies bf16 activations with fp32 sums:
    x @ W^T as a dense bf16 weight would give it (rows padded to tiles, outputs not in blocks of 32). On a CPU
    with bf16 units and no tiles, bf16 activations of prefill size take the `vdpbf16ps` product on strips widened
    in L2: the same product (600 x 5700: rows not in whole passes of 14, a last strip of 4 outputs alone). fp32
    activations stay on the integer kernel at every size (test_qmatmul_matches_the_dequantized_weight)."""
    if not ops.amx and not (ops.bf16_gemm and m == 600):
        pytest.skip("neither AMX nor bf16 units in this build")
    *_, w = random_packed(n, k, bits, group)
    x = (torch.randn(m, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)).bfloat16()
    s = torch.rand(k) + 0.5
    ref = (x.float() * s).bfloat16().float() @ w.dequantize().bfloat16().float().t()
    y = ops.qmatmul(x, w.data, w.dm, bits, w.group, n, s)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.float() - ref).abs() <= 2**-8 * ref.abs().max()).all()


KQUANTS = {"Q6_K": (210, 6, 16), "Q4_K": (144, 4, 32)}  # block bytes, bits held, scale group


def random_kquant(kind: str, n: int, k: int):
    """Seeded random GGUF K-quant blocks [N, K] (raw bytes) with fp16 scales in [1e-3, 1.1e-2), and their values
    (miaotui's dequantizer, gguf's bit for bit)."""
    from miaotui.loader.dequant import q4_k, q6_k

    size, *_ = KQUANTS[kind]
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (n, k // 256, size), dtype=torch.uint8)
    for off in (208,) if kind == "Q6_K" else (0, 2):  # Q6_K's d; Q4_K's D and Dmin
        raw[..., off:off + 2] = (torch.rand(n, k // 256) * 0.01 + 1e-3).half().view(torch.uint8).view(n, k // 256, 2)
    values = (q6_k if kind == "Q6_K" else q4_k)(raw.reshape(-1, size))
    return raw.reshape(-1), values.reshape(n, k)


def pack_kquant(ops, kind: str, raw: torch.Tensor, n: int, k: int):
    """The layout of the file's own K-quant blocks: (data, scales, bits, group)."""
    _, bits, group = KQUANTS[kind]
    data, sc, held = ops.pack_blocks(raw, kind, n, k, bits=bits, kscales=kind == "Q4_K")
    assert held == bits and sc.dtype == torch.uint8
    return data, sc, bits, group


@pytest.mark.parametrize("kind", KQUANTS)
# 6: one 6-bit pass of 6 tokens; 9, 37: passes of 6 after one unpacking for them, the rest a pass of its own;
# 100: fp32 products without VNNI
@pytest.mark.parametrize("m", [1, 3, 6, 9, 37, 100])
def test_kquant_blocks_multiply_as_the_file_holds_them(ops, kind, m):
    """GGUF's K-quants held exactly — Q4_K (w = D sc q - Dmin mn, 6-bit sc and mn per 32) as 4-bit codes with its
    own scales by every class, Q6_K (w = D s (q - 32), an int8 s per 16 inputs) as 6-bit codes by the VNNI class:
    rows read back are the file's values bit for bit, and products (decode sizes; on AVX2 and portable builds,
    prompt sizes in fp32 over the dequantized rows) agree with the plain C++ definition, with x @ Wᵀ to the
    activations' rounding, and under one activation term with llama.cpp's rounding, as the fp16-scaled layouts do.
    Other classes refuse 6-bit codes by name (they take Q6_K as 8-bit codes)."""
    n, k = 50, 768
    raw, values = random_kquant(kind, n, k)
    if ops.qmatmul_path == "generic" and kind == "Q6_K":
        with pytest.raises(RuntimeError, match="VNNI"):
            pack_kquant(ops, kind, raw, n, k)
        return
    data, sc, bits, group = pack_kquant(ops, kind, raw, n, k)
    assert data.numel() == 64 * k * bits // 8  # 50 rows padded to 64
    rows = torch.tensor([49, 3, 0, 17])
    assert torch.equal(ops.packed_rows(data, sc, bits, group, k, rows), values[rows])
    x = torch.randn(m, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)
    s = torch.rand(k) + 0.5

    def qmatmul(act_bits=16, reference=False):
        return ops.qmatmul(x, data, sc, bits, group, n, s, reference=reference, act_bits=act_bits)

    ref = (x * s) @ values.t()
    y = qmatmul()
    if 0 < ops.fp32_rows(bits, group) <= m:  # x @ Wᵀ in fp32 on the dequantized rows
        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-6
    else:
        assert ((y - ref).abs().max() / ref.abs().max()) < 3e-4  # the residual term keeps ~15 bits of x
        assert torch.allclose(y, qmatmul(reference=True), rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if not 0 < ops.fp32_rows(bits, group, 8) <= m:
        xs = (x * s).view(m, -1, 32)
        amax = xs.abs().amax(-1, keepdim=True)
        xq = (torch.round(xs * (127 / amax)) * (amax / 127)).view(m, k).double()
        ref8 = xq @ values.double().t()
        tol = 2e-6 * ref8.abs().max().item()
        assert (qmatmul(8) - ref8).abs().max() <= tol and (qmatmul(8, reference=True) - ref8).abs().max() <= tol
    with pytest.raises(RuntimeError, match="groups of"):
        ops.qmatmul(x, data, sc, bits, 64, n, s)


@pytest.mark.parametrize("kind", KQUANTS)
@pytest.mark.parametrize("m", [8, 40, 300])
def test_kquant_many_rows_widen_to_bf16(ops, kind, m):
    """The file's own K-quant layouts widened to bf16 for the tile unit (from 8 bf16 rows) or `vdpbf16ps` (prefill
    sizes, CPUs with bf16 units): x @ Wᵀ as the dense bf16 weight gives it."""
    if ops.qmatmul_path != "vnni" or not (ops.amx or (ops.bf16_gemm and m == 300)):
        pytest.skip("neither AMX nor bf16 units in this build")
    n, k = (2900 if m == 300 else 50), 768
    raw, values = random_kquant(kind, n, k)
    data, sc, bits, group = pack_kquant(ops, kind, raw, n, k)
    x = (torch.randn(m, k) * torch.where(torch.rand(k) < 0.05, 30.0, 1.0)).bfloat16()
    ref = x.float() @ values.bfloat16().float().t()
    y = ops.qmatmul(x, data, sc, bits, group, n, None)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert ((y.float() - ref).abs() <= 2**-8 * ref.abs().max()).all()


@pytest.mark.parametrize("tokens,length,keys,hq,hkv,d", [(512, 512, 512, 12, 2, 128), (100, 50, 50, 9, 3, 64),
                                                          (37, 37, 37, 4, 1, 256), (90, 15, 15, 2, 2, 32),
                                                          (90, 15, 90, 2, 2, 32), (45, 45, 300, 6, 2, 64),
                                                          (1, 1, 33, 2, 1, 32)])
def test_prefill_attention_is_causal_attention(ops, tokens, length, keys, hq, hkv, d):
    """Prompts of `length` queries side by side (a wave of equal fresh prompts; or chunks after their cached
    prefixes, the queries the last of each prompt's `keys` positions), grouped heads, q/k/v strided views of one
    fused projection's output: torch's causal attention in fp32 on the same bf16 inputs, within the bf16 rounding of
    the softmax weights and the output (prompts not in whole passes of 14 queries or 32 keys)."""
    if not getattr(ops, "prefill_attention_available", False):
        pytest.skip("no bf16 units (AVX512-BF16 with VBMI) in this build or CPU")
    torch.manual_seed(0)
    prompts, width = tokens // length, (hq + 2 * hkv) * d
    q = (torch.randn(tokens, width) * 2).bfloat16()[:, : hq * d].view(tokens, hq, d)
    kv = (torch.randn(keys * prompts, width) * 2).bfloat16()
    k, v = kv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d), kv[:, (hq + hkv) * d :].view(-1, hkv, d)
    y = ops.prefill_attention(q, k, v, length, d**-0.5)

    def causal(p: int) -> torch.Tensor:
        qp = q[p * length : (p + 1) * length].float().transpose(0, 1)
        kp, vp = (x[p * keys : (p + 1) * keys].float().transpose(0, 1) for x in (k, v))
        allowed = torch.arange(keys)[None, :] <= torch.arange(keys - length, keys)[:, None]
        res = F.scaled_dot_product_attention(qp[None], kp[None], vp[None], attn_mask=allowed, scale=d**-0.5,
                                             enable_gqa=True)
        return res[0].transpose(0, 1)

    ref = torch.cat([causal(p) for p in range(prompts)])
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, hq, d)
    # each weight rounded to bf16 moves the output by at most 2^-9 of the largest value, the output's own rounding
    # 2^-9 of itself (twice both, for the fp32 sums)
    assert ((y.float() - ref).abs() <= 2**-8 * (v.float().abs().max() + ref.abs())).all()
    with pytest.raises(RuntimeError, match="whole prompts"):
        ops.prefill_attention(q, k, v, length + 1, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.prefill_attention(q[..., :16].contiguous(), k[..., :16].contiguous(), v[..., :16].contiguous(), length,
                              1.0)


def test_dense_matmul_equals_torch_and_is_batch_invariant(ops):
    """fp32 x @ wᵀ at decode sizes: torch's product within fp32 rounding, for widths with and without a scalar
    tail, a last pass of fewer than 4 weight rows and odd row counts; a row's result does not depend on the rows
    beside it (the same bits alone as in a batch)."""
    torch.manual_seed(0)
    for m, n, k in [(1, 4864, 896), (2, 7, 37), (3, 33, 576), (4, 5, 3), (1, 1, 8)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        y = ops.dense_matmul(x, w)
        ref = x.double() @ w.double().t()
        assert y.shape == (m, n) and ((y - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-6), (m, n, k)
        for i in range(m):
            assert torch.equal(ops.dense_matmul(x[i:i + 1], w), y[i:i + 1]), (m, n, k, i)
    x, w = torch.randn(8, 2), torch.randn(3, 8)
    assert torch.equal(ops.dense_matmul(x.t(), w), ops.dense_matmul(x.t().contiguous(), w))  # x any strides
    with pytest.raises(RuntimeError, match="float32"):
        ops.dense_matmul(torch.randn(2, 8, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="contiguous"):  # w is read in place, never copied
        ops.dense_matmul(x.t(), torch.randn(8, 3).t())


def test_argmax_rows_picks_the_first_maximum(ops):
    """The sampler's greedy pick: torch.argmax's answer, ties to the first index, for rows of any length."""
    from miaotui.kernels import argmax

    torch.manual_seed(0)
    for shape in [(32, 49152), (1, 100), (3, 17), (2, 5)]:
        x = torch.randn(*shape)
        assert torch.equal(ops.argmax_rows(x), x.argmax(-1))
    ties = torch.randint(0, 4, (64, 1000)).float()  # many equal maxima per row
    assert torch.equal(ops.argmax_rows(ties), ties.argmax(-1))
    x = torch.zeros(3, 40)
    x[0] = -float("inf")
    x[1, 39] = 1.0  # in the scalar tail
    x[2, 17] = x[2, 3] = 5.0
    assert ops.argmax_rows(x).tolist() == [0, 39, 3]
    assert torch.equal(argmax(x.double()), x.argmax(-1))  # other dtypes keep torch's path
    nan = torch.randn(2, 70)
    nan[0, 5] = float("nan")
    nan[1] = float("nan")
    assert ops.argmax_rows(nan).tolist() == [int(torch.nan_to_num(nan[0], nan=-1e9).argmax()), 0]


def test_topk_rows_is_a_stable_sort_prefix(ops):
    """The sampler's candidates: each row's k largest values, largest first, equal values in id order (a stable
    descending sort's first k), a NaN as -inf; rows with a tail block, many ties, few finite values (a grammar mask),
    k from 1 to the whole row (past the block bound: every column is a candidate)."""
    from miaotui.kernels import topk

    def reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, i = x.masked_fill(x.isnan(), -float("inf")).sort(dim=-1, descending=True, stable=True)
        return v[:, :k], i[:, :k]

    torch.manual_seed(0)
    masked = torch.full((3, 5000), -float("inf"))
    masked[0, torch.randperm(5000)[:10]] = torch.randn(10)  # fewer finite values than k
    masked[1, :] = 2.0  # one value everywhere: the first k ids
    masked[2, 100:4000] = torch.randn(3900)
    nan = torch.randn(2, 3000)
    nan[0, torch.randperm(3000)[:500]] = float("nan")
    nan[1, :2000] = float("nan")
    cases = [(torch.randn(32, 49152), [1, 64, 512]), (torch.randn(3, 1000), [1, 7, 15, 16, 64, 1000]),
             (torch.randint(0, 5, (4, 3001)).float(), [3, 64]), (masked, [1, 64, 78]), (nan, [64, 1500]),
             (torch.randn(2, 50), [50])]
    for x, ks in cases:
        for k in ks:
            v, i = ops.topk_rows(x, k)
            rv, ri = reference(x, k)
            assert torch.equal(i, ri) and torch.equal(v, rv), (tuple(x.shape), k)
    x = torch.randn(4, 49152)
    assert torch.equal(topk(x, 64)[1], reference(x, 64)[1])  # the sampler's entry
    assert torch.equal(topk(x.double(), 3)[1], x.double().topk(3)[1])  # other dtypes keep torch's path


def test_kernel_cache_is_per_torch_build_not_per_path(monkeypatch):
    """A second virtual environment with the same torch finds the kernels already built (no half-minute compile
    on a reinstall); another torch version builds its own."""
    here = kernels._build_dir("k", ["-O3"])
    monkeypatch.setattr(torch, "__file__", "/elsewhere/site-packages/torch/__init__.py")
    assert kernels._build_dir("k", ["-O3"]) == here
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert kernels._build_dir("k", ["-O3"]) != here


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="names the CPU from /proc/cpuinfo")
def test_description_names_the_processor_and_its_generation():
    """A benchmark's figures name the machine: the kernel class and path, and the processor with its family and
    model numbers on x86 (a VM's "AMD EPYC" alone hides whether it is a Zen 3, 4 or 5)."""
    text = kernels.describe()
    assert text.startswith(f"{kernels.isa()} ") and text.endswith(kernels.cpu_model())
    with open("/proc/cpuinfo") as f:
        info = f.read().split("\n\n")[0]
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()))
    if "model name" in fields:
        assert kernels.cpu_model().startswith(fields["model name"])
    if "cpu family" in fields:
        assert f"family {fields['cpu family']} model {fields['model']}" in kernels.cpu_model()


def test_isa_switch_forces_a_lower_class():
    """MIAOTUI_ISA picks the class a process runs (each class the CPU can run is one choice); a class the CPU
    cannot run, or a name that is none, is a one-line error."""
    def run(isa: str) -> subprocess.CompletedProcess:
        code = "from miaotui import kernels; print(kernels.isa(), kernels.cpu_ops().qmatmul_path)"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "MIAOTUI_ISA": isa}, timeout=600)

    r = run("generic")
    assert r.returncode == 0 and r.stdout.split() == ["generic", "generic"], r.stderr
    r = run("sse9")
    assert r.returncode != 0 and "MIAOTUI_ISA='sse9' is not a CPU class" in r.stderr
    missing = [i for i in kernels.ISAS if i not in kernels.cpu_isas()]
    if missing:
        r = run(missing[0])
        assert r.returncode != 0 and "cannot run" in r.stderr
