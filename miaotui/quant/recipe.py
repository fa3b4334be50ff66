"""The recipe: which matrix of a loaded model gets which weight format, once, at load time — from the user's
`quantization` setting, the bits and codes the file stored each tensor with, and what this device multiplies fast.
The formats (dense.py, int8.py, int4.py, hybrid.py) each hold and multiply one matrix; only this file decides.

- none: every matrix dense, in the fastest layout the device has for it (dense.dense_weight).
- int8: every matrix as 8-bit codes: a file's blocks of up to 8 bits exactly, else per-row scales from float.
- int4: 4-bit groups (a 4-bit file's own codes exactly); the tensors a quantized file gave more than 5 bits, and
  attention projections stored in 5-bit blocks, stay at 8 bits; requantized weights are scaled by calibration
  statistics (activation-aware) when given.
- native: every matrix at the file's own precision, as its codes: 4-bit blocks as int4, 5- to 8-bit blocks as int8
  (both exactly), other quantized types (Q6_K) as int8 per row; no float copy at all.
- auto: `hybrid` (the file's codes for decode-sized products beside a dense copy of them) where the file's block
  weights are 4-bit, the model runs in bf16 on a CPU with bf16 units, activations keep 16 bits (with 8 the codes
  serve every product and the copy would go unused), and the copy is small (HYBRID_MAX_WEIGHTS);
  a `miaotui compress --quantize` folder's own method; `native` for any other quantized file on a CPU with
  miaotui's kernels; else none.
On CUDA, int8 and int4 run on torch's own weight-only kernels (`aten._weight_int8pack_mm`, per-row int8; tinygemm's
`aten._weight_int4pack_mm`, 4-bit groups), where the installed torch has them; native and hybrid are CPU layouts.
The output head stays at 8 bits whatever the method: 4-bit logits flip the argmax of small models (llama.cpp keeps
its output tensor at 6-8 bits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from miaotui.config import QUANTIZATIONS
from miaotui.errors import MiaotuiError
from miaotui.kernels import has_amx, has_packed
from miaotui.layers.linear import Embedding, Linear
from miaotui.loader.tensors import BlockCodes, FileTensor
from miaotui.quant.base import WeightFormat
from miaotui.quant.dense import DenseWeight, dense_weight
from miaotui.quant.hybrid import HybridWeight
from miaotui.quant.int4 import Int4Weight
from miaotui.quant.int8 import Int8Weight
from miaotui.quant.packed import PackedWeight

GROUP_SIZES = (32, 64, 128)
CUDA_KERNELS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm"}  # torch's weight-only products


def cuda_kernel(method: str) -> bool:
    """Whether this torch build has the CUDA kernel a method multiplies with (it depends on the build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{CUDA_KERNELS[method]}", "CUDA")


def check(quantization: str, group_size: int) -> None:
    if quantization not in QUANTIZATIONS:
        raise MiaotuiError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if group_size not in GROUP_SIZES:
        raise MiaotuiError(f"int4 group size must be 32, 64 or 128, got {group_size}")


# `auto` adds hybrid's dense bf16 copy (2 bytes a weight, made at load; AMX tile order) only to models up to this
# many weights in their products, and only where the CPU has AMX: there the copy's products beat widening the codes
# from ~20 rows (quant/hybrid.py). Without AMX, native codes take miaotui's own `vdpbf16ps` product at prefill sizes,
# widened in L2 (kernels/qmatmul.cpp), which left the copy nothing to save (AVX-512 Zen 4, 512-token prompts,
# alternated: SmolLM2 1.02x, Qwen2.5-0.5B 1.00x, Gemma 3 270M 1.00x native over hybrid; 32 x (64 in, 128 out) on
# SmolLM2 1.00x) while it cost load time and memory. On Qwen2.5-1.5B it cost 12-17 s of load and 6.3 GB resident
# against native's 1.4-2.5 s and 2.7 GB, and a 7B model's copy would not fit beside its codes in 24 GB.
HYBRID_MAX_WEIGHTS = 600_000_000
# The output head's codes under native and hybrid: at least 6 bits (a Q6_K head as it is, as llama.cpp keeps it; a
# 4-bit one as 8-bit codes).
HEAD_BITS = 6


def matrix_weights(model: nn.Module) -> int:
    """Weights in the model's products (its Linear layers; a tied output head is its embedding table, not counted)."""
    return sum(m.in_features * sum(m.output_sizes) for m in model.modules() if isinstance(m, Linear))


def resolve(quantization: str, group_size: int, model: nn.Module, dtype: torch.dtype,
            device: torch.device, activation_bits: int = 16) -> tuple[str, int]:
    """(method, group size) that `quantization` means for this model on this device. `auto` never costs quality:
    a file's low-bit blocks are affine maps of integer codes per 32 weights, which int4 (4-bit blocks) and int8
    (5- to 8-bit blocks) hold exactly. In bf16 on a CPU with AMX, a small model's 4-bit file decodes on its codes
    beside dense weights for prefill (`hybrid`); elsewhere every product runs on the codes (`native`); a
    `miaotui compress` folder keeps the method (and group) it was stored with; float files stay dense. With
    activations in one int8 term (`activation_bits` 8) hybrid's codes serve every batch and its copy would go
    unused (quant/hybrid.py), so `auto` is `native` there: the same products, without the copy's 2 bytes a weight
    and its load time."""
    check(quantization, group_size)
    cfg = model.config
    if quantization != "auto":
        method = quantization
    elif device.type != "cpu":
        method = "none"
    elif cfg.quantization:
        method = cfg.quantization
        group_size = cfg.quantization_group or group_size
    elif (dtype == torch.bfloat16 and cfg.weight_bits <= 4 and has_amx() and activation_bits == 16
          and matrix_weights(model) <= HYBRID_MAX_WEIGHTS):
        method = "hybrid"
    elif cfg.weight_bits < 16 and has_packed():
        method = "native"
    else:
        method = "none"
    if method != "none" and device.type != "cpu":
        if method not in CUDA_KERNELS:
            raise MiaotuiError(f"{method} quantization is a CPU layout; on {device.type} use none, int8 or int4")
        if device.type != "cuda" or not cuda_kernel(method):
            raise MiaotuiError(f"{method} quantization on {device.type} needs torch's aten.{CUDA_KERNELS[method]}, "
                               f"which this torch build ({torch.__version__}) lacks; use --quantization none")
    return method, group_size


class Matrix:
    """One matrix of the checkpoint as the recipe reads it: the file's codes where it has them, its float values
    (on the model's device, in its dtype) read once, when a format needs them."""

    def __init__(self, src: FileTensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.src, self.device, self.dtype = src, torch.device(device), dtype
        self.shape, self.bits = src.shape, src.bits
        self._values: torch.Tensor | None = None
        self._codes: BlockCodes | None | bool = False

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            self._values = self.src.values().to(device=self.device, dtype=self.dtype)
        return self._values

    @property
    def codes(self) -> BlockCodes | None:
        if self._codes is False:
            self._codes = self.src.codes()
        return self._codes

    def release(self) -> None:
        """Drop what was read (its format holds what it needs): the next matrix's codes take its place in memory."""
        self._values, self._codes = None, False


def apply(model: nn.Module, quantization: str, group_size: int, dtype: torch.dtype, device: torch.device,
          calibrate: Callable[[], dict[nn.Module, torch.Tensor]] | None = None, activation_bits: int = 16) -> str:
    """Give every Linear, the output head and the embedding tables of a freshly loaded model their formats, and drop
    the file tensors they were loaded from; return the method applied. `calibrate()` (run when int4 is asked for
    and some weight is requantized) gives the mean square of each Linear's input channels on calibration text.
    `activation_bits`: what `round_activations` will be asked for next (`auto` chooses with it)."""
    method, group = resolve(quantization, group_size, model, dtype, device, activation_bits)
    if model.quantization is not None:  # a loaded model shared by several engines: converted once
        if model.quantization != method:
            raise MiaotuiError(f"this loaded model holds {model.quantization} weights already; load it again for "
                               f"{method}")
        return method
    linears = {m: name for name, m in model.named_modules() if isinstance(m, Linear)}
    embeddings = [m for m in model.modules() if isinstance(m, Embedding)]
    mats = {m: Matrix(FileTensor.cat([m.parts[i] for i in range(len(m.output_sizes))]), device, dtype)
            for m in linears}
    mats.update({e: Matrix(e.source, device, dtype) for e in embeddings})
    head = model.lm_head
    emb = model.get_input_embeddings()

    # A quantized file's recipe marks its sensitive tensors by giving them more bits (Q4_K_M keeps attn_v and
    # ffn_down at Q6_K): those stay at 8 bits under int4, as llama.cpp keeps them at 6. So do attention
    # projections stored in 5-bit blocks: ~10% of the weights, but requantized to 4 bits half the loss
    # (Qwen2.5-0.5B, Q5_0 projections: +5.7% perplexity over bf16, +3.3% with them at 8 bits, for 21 MB).
    def eight_bit(m: Linear) -> bool:
        bits = mats[m].bits
        return m is head or (method == "int4" and (5 < bits < 16 or (bits == 5 and ".self_attn." in linears[m])))

    power: dict[nn.Module, torch.Tensor] = {}
    if quantization == "int4" and calibrate is not None and any(
            not eight_bit(m) and m.activation_aware and not exact_int4(mats[m], group) for m in linears):
        for m in [*linears, *embeddings]:  # calibration runs the model as it is, in float
            m.format = DenseWeight(mats[m].values)
        model.head = head.format
        power = calibrate()

    for m in tqdm(linears, desc="preparing weights", unit="matrix", delay=1.0, leave=False):
        mat = mats[m]
        if method == "none":
            m.format = dense_weight(mat.values)
        elif method == "hybrid":
            m.format = hybrid_format(mat, dtype, HEAD_BITS if m is head else None)
        elif method == "native":
            m.format = native_format(mat, dtype, HEAD_BITS if m is head else None)
        elif method == "int8" or eight_bit(m):
            m.format = int8_format(mat, dtype)
        else:
            m.format = int4_format(mat, group, dtype, power.get(m) if m.activation_aware else None)
        m.parts = {}
        if m is not head:
            mat.release()
    if isinstance(head, Linear):
        model.head = head.format
    elif method == "none":  # tied to the embedding table: the head gets its own copy, in a fast layout or int8
        model.head = dense_weight(mats[head].values)
    elif method == "hybrid":
        model.head = hybrid_format(mats[head], dtype, HEAD_BITS)
    elif method == "native":
        model.head = native_format(mats[head], dtype, HEAD_BITS)
    else:
        model.head = int8_format(mats[head], dtype)
    for e in embeddings:
        e.dtype = dtype
        if e is emb and method != "none":  # read by rows: a tied table shares the head's int8
            e.format = model.head if e is head else embedding_format(mats[e], method, dtype)
        else:
            e.format = DenseWeight(mats[e].values)
        e.source = None
    model.quantization = method
    return method


def shortlist_head(model: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Give a converted model's output head only the rows `ids` (a draft model's shortlist, engine/draft_model.py):
    dense where the model is, else 8-bit per row. A tied embedding table keeps the whole head it shares."""
    try:
        rows = model.head.lookup(ids, torch.float32)
    except NotImplementedError:  # a dense head in a packed layout
        rows = model.head.dequantize()[ids]
    model.head = dense_weight(rows.to(dtype)) if model.quantization == "none" else Int8Weight.from_float(rows, dtype)


def exact_int4(mat: Matrix, group: int) -> bool:
    """Whether the file holds this matrix as 4-bit codes at this group size, which int4 takes as they are."""
    codes = mat.codes
    return codes is not None and codes.bits <= 4 and codes.group == group


def int8_format(mat: Matrix, dtype: torch.dtype) -> Int8Weight:
    """A file's blocks of up to 8 bits exactly (miaotui's CPU layout), else per-row scales from float."""
    exact = Int8Weight.from_codes(mat.codes) if mat.device.type == "cpu" else None
    return exact or Int8Weight.from_float(mat.values, dtype)


def int4_format(mat: Matrix, group: int, dtype: torch.dtype,
                in_power: torch.Tensor | None = None) -> Int4Weight | Int8Weight:
    """A file's 4-bit codes at this group size exactly, else groups searched from float (activation-aware with
    `in_power`); int8 for rows that do not split into groups."""
    if exact_int4(mat, group):
        return Int4Weight.from_codes(mat.codes, mat.device)
    if mat.shape[1] % group:
        return Int8Weight.from_float(mat.values, dtype)
    return Int4Weight.from_float(mat.values, group, in_power)


def native_format(mat: Matrix, dtype: torch.dtype, min_bits: int | None = None) -> Int4Weight | Int8Weight:
    """The file's own codes at their own width (8 where that is below `min_bits`): read straight from its blocks by
    the kernels' packer where it can, else from the codes (and int8 per row from float for block types without
    8-bit codes)."""
    packed = PackedWeight.from_blocks(mat.src.blocks(), mat.shape[1], min_bits)
    if packed is not None:
        return Int4Weight(None, None, 32, packed.shape, fast=packed) if packed.bits == 4 else Int8Weight(None, None,
                                                                                                         packed)
    codes = mat.codes
    if min_bits is None and codes is not None and codes.bits <= 4:
        return Int4Weight.from_codes(codes)
    return int8_format(mat, dtype)


def hybrid_format(mat: Matrix, dtype: torch.dtype, min_bits: int | None = None) -> HybridWeight:
    """The file's own codes (native_format) for decoding beside a dense copy made from those codes: the two paths
    multiply the same values, and the copy skips the float detour (Qwen2.5-1.5B Q4_K_M: 68 -> 12-14 s to load; it had
    also requantized the file's 6-bit tensors to 4 bits)."""
    small = native_format(mat, dtype, min_bits)
    return HybridWeight(small, dense_weight(small.dequantize().to(device=mat.device, dtype=dtype)))


def round_activations(model: nn.Module, bits: int) -> int:
    """Have every product on miaotui's integer kernels round its activations to `bits` (16: two int8 terms; 8: one,
    llama.cpp's choice: multi-row products ~0.63 the time, the text no longer the reference's; see qmatmul.cpp);
    the number of weights it applies to. Products on other paths (dense, torch's kernels, CUDA) keep their own."""
    weights = {id(k.packed): k.packed for m in model.modules() for name in ("format", "head")
               if (f := getattr(m, name, None)) is not None and hasattr(f, "kernel")
               and (k := f.kernel()) is not None and k.packed is not None}
    for w in weights.values():
        w.act_bits = bits
    return len(weights)


def embedding_format(mat: Matrix, method: str, dtype: torch.dtype) -> WeightFormat:
    """An untied embedding table is only ever read a row per token, never multiplied: under int4 it takes 4-bit
    groups of 32 too (Qwen2.5-0.5B's 136M entries: 153 -> 85 MB) where miaotui's kernel layout exists; int8
    otherwise; under native, the file's own codes."""
    if method in ("native", "hybrid"):  # hybrid: only products need its dense copy
        return native_format(mat, dtype)
    if method == "int4" and mat.shape[1] % 32 == 0 and has_packed() and mat.device.type == "cpu":
        return int4_format(mat, 32, dtype)
    return int8_format(mat, dtype)
