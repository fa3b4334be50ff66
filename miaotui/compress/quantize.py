"""Weight-only quantization as a model transformation: each Linear's float weight is replaced, once at load time,
by a packed low-bit weight that a low-bit kernel multiplies directly (never dequantized per step): miaotui's
VNNI kernel where the CPU has it (kernels/packed.py; 2-3x faster at decode sizes), else torch's own.

- int8: per-output-channel symmetric scales (torch: `aten._weight_int8pack_mm`).
- auto: int4 for decode-sized inputs beside a dense bf16 copy for prefill and large batches (CPU, bf16).
- int4: asymmetric groups of 32/64/128 along the input dimension (torch: `aten._weight_int4pack_mm_for_cpu`,
  which computes w = (q - 8) * scale + zero, so a group with minimum `lo` and step `scale` stores
  zero = lo + 8 * scale; a GGUF Q4_1 block, w = d * q + m, is scale = d, zero = m + 8d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.kernels import packed
from miaotui.kernels.packed import PackedWeight, StackWeight
from miaotui.loader.dequant import BlockCodes

METHODS = ("none", "int8", "int4", "auto")


@dataclass
class Int8Weight:
    q: torch.Tensor | None  # [N, K] int8 for torch's kernel; None where `fast` holds the codes
    scales: torch.Tensor | None  # [N], activation dtype (per-row weights; None for a file's blocks)
    fast: PackedWeight | None = None  # miaotui's VNNI layout (codes + 128), where the CPU has it

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        w = w.float()
        # The kernel takes scales in the activation dtype: round them (up) first, then quantize against the
        # rounded value, so the error stays within half a step of the scale actually used.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        scales = (scales * (1 + 2**-7)).to(dtype).float()
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        fast = PackedWeight.pack(codes, scales[:, None], -128 * scales[:, None], 8)
        return cls(None if fast else q.contiguous(), scales.to(dtype), fast)

    @classmethod
    def from_codes(cls, codes: BlockCodes | None) -> Int8Weight | None:
        """A file's integer blocks of up to 8 bits (Q8_0, Q5_0, Q4_1, ...) held exactly as 8-bit codes with their
        per-block d and m; None where that layout has no kernel here (then `from_float` requantizes per row)."""
        fast = PackedWeight.pack(codes.q, codes.d, codes.m, 8) if codes is not None and codes.bits <= 8 else None
        return None if fast is None else cls(None, None, fast)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.matmul(x)
        if x.dtype == self.scales.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)
        # The CPU kernel's fp32 path is unvectorised (~13x slower): compute in bf16, as the int4 kernel does.
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scales.to(torch.bfloat16))
        return y.to(x.dtype)

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernel: the packed weight."""
        return None if self.fast is None else StackWeight(self.fast)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The int8 values [N, K] (or of `rows` only) of a per-row weight (`from_float`)."""
        if self.fast is None:
            return self.q if rows is None else self.q[rows]
        return (self.fast.codes(rows).to(torch.int16) - 128).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.dequantize()
        return self.q.float() * self.scales.float()[:, None]

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` as `dtype`: the embedding table read from its int8 form."""
        if self.fast is not None:
            return self.fast.lookup(ids, dtype)
        flat = ids.reshape(-1)
        rows = self.q[flat].to(dtype) * self.scales[flat, None].to(dtype)
        return rows.reshape(*ids.shape, -1)

    @property
    def nbytes(self) -> int:
        if self.fast is not None:
            return self.fast.nbytes
        return self.q.numel() + self.scales.numel() * self.scales.element_size()


@dataclass
class Int4Weight:
    packed: torch.Tensor | None  # torch's int4 layout; None where `fast` holds the weight
    scales_zeros: torch.Tensor | None  # [K // group, N, 2], bf16
    group: int
    shape: tuple[int, int]
    in_scale: torch.Tensor | None = None  # [K]: inputs are multiplied by it first (activation-aware scaling)
    fast: PackedWeight | None = None  # miaotui's VNNI layout (w = d * q + m, fp16 d and m), where the CPU has it

    CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
    ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)

    @classmethod
    def from_float(cls, w: torch.Tensor, group: int, in_power: torch.Tensor | None = None) -> Int4Weight:
        """Each group's grid spans its [min, max] shrunk by the factor (of CLIPS) with the least squared error:
        clipping a few outliers buys a finer step for the rest (as llama.cpp's k-quants search their scales).

        in_power [K], the mean square of each input channel on calibration text, turns on activation-aware
        scaling (AWQ's idea): input channel k of W is multiplied by s_k = power_k^(alpha/2) before quantizing
        (and inputs by 1/s_k at run time), so channels that see large activations get finer steps. alpha (of
        ALPHAS; 0 = no scaling) minimises the output error Σ (ΔW)² · power, then the clip search runs on the
        scaled weight."""
        w = w.float()
        if in_power is None:
            return cls._from_groups(*_int4_search(w, group, cls.CLIPS), group)
        power = in_power.float().clamp(min=1e-12)
        best = None
        for alpha in cls.ALPHAS:
            s = power ** (alpha / 2)
            s = s / (s.max() * s.min()).sqrt()
            q, scale, lo = _int4_search(w * s, group, (1.0,))
            deq = (q * scale + lo).reshape(w.shape) / s
            err = ((deq - w).square() * power).sum().item()
            if best is None or err < best[0]:
                best = (err, alpha, s)
        _, alpha, s = best
        weight = cls._from_groups(*_int4_search(w * s, group, cls.CLIPS), group)
        if alpha > 0:
            weight.in_scale = (1 / s).to(torch.bfloat16)
        return weight

    @classmethod
    def _from_groups(cls, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int) -> Int4Weight:
        n = q.shape[0]
        return cls.from_codes(q.reshape(n, -1), scale.reshape(n, -1), lo.reshape(n, -1), group)

    @classmethod
    def from_codes(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int) -> Int4Weight:
        """q [N, K] in 0..15, d and m [N, K // group]: w = d * q + m."""
        fast = PackedWeight.pack(q, d.float(), m.float(), 4)
        if fast is not None:
            return cls(None, None, group, tuple(q.shape), fast=fast)
        sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
        return cls(packed, sz, group, tuple(q.shape))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.matmul(x, self.in_scale)
        if self.in_scale is not None:
            x = x * self.in_scale.to(x.dtype)
        if x.dtype == torch.bfloat16:  # the common case: skip two no-op casts on the decode hot path
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group,
                                                       self.scales_zeros)
        return y.to(x.dtype)

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernel: the packed weight and the input scale."""
        return None if self.fast is None else StackWeight(self.fast, self.in_scale)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` as `dtype`: an embedding table read from its int4 form (miaotui's layout only)."""
        return self.fast.lookup(ids, dtype)

    def dequantize(self) -> torch.Tensor:
        if self.fast is not None:
            w = self.fast.dequantize()
            return w if self.in_scale is None else w * self.in_scale.float()
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
        return self.matmul(eye).float().t()

    @property
    def nbytes(self) -> int:
        extra = 0 if self.in_scale is None else self.in_scale.numel() * 2
        if self.fast is not None:
            return self.fast.nbytes + extra
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2 + extra


def _int4_search(w: torch.Tensor, group: int, clips: tuple[float, ...]):
    """Codes q [N, K/group, group] in 0..15, step and minimum [N, K/group, 1] of the clip factor with the least
    squared error per group."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo0, hi0 = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    best = None
    for clip in clips:
        lo, hi = lo0 * clip, hi0 * clip
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.round((g - lo) / scale).clamp(0, 15)
        err = (q * scale + lo - g).square().sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, q, scale, lo]
        else:
            better = err < best[0]
            for i, new in enumerate((err, q, scale, lo)):
                best[i] = torch.where(better, new, best[i])
    return best[1], best[2], best[3]


class HybridWeight:
    """`auto` on CPU: int4 for the few-row products of decoding (bandwidth-bound: 4x fewer bytes per token), a
    dense bf16 copy (`dense_weight`) for prefill and batches, which are compute-bound. Where the CPU has AMX the copy
    is miaotui's tile-order one; all 120 projections of SmolLM2 took here, at 1 / 4 / 8 / 16 / 32 rows, 3.7 / 5.0 /
    8.1 / 9.3 / 14.2 ms on int4 (VNNI below 8 rows, widened to bf16 tiles from 8) and 8.6 / 8.9 / 8.5 / 9.3 / 12.2
    ms on the bf16 tiles (streaming 214 MB at the machine's read bandwidth), so the switch sits at 8 rows.
    Elsewhere the copy is oneDNN's (335-395 us at 1-16 rows on one 3072 x 576 projection, int4 VNNI 58 / 109 / 199 /
    398 us at 1 / 4 / 8 / 16) and int4 serves up to SMALL_BATCH rows."""

    SMALL_BATCH = 12
    SMALL_BATCH_TILES = 7

    def __init__(self, w: torch.Tensor, group: int, small: str = "int4", codes: BlockCodes | None = None):
        from miaotui.layers.linear import TiledWeight, dense_weight

        self.small = quantize_weight(w, small, group, codes=codes)
        self.dense = dense_weight(w)
        tiles = isinstance(self.dense, TiledWeight) and self.small.fast is not None
        self.small_batch = self.SMALL_BATCH_TILES if tiles else self.SMALL_BATCH

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (self.small if x.shape[0] <= self.small_batch else self.dense).matmul(x)

    def kernel(self) -> StackWeight | None:
        """What `matmul` hands miaotui's kernels: the packed weight (and the tiles past `small_batch` rows)."""
        k = self.small.kernel()
        if k is None:
            return None
        if (tiles := self.dense.kernel()) is None:
            return StackWeight(k.packed, k.in_scale, max_rows=self.small_batch)
        return StackWeight(k.packed, k.in_scale, tiles.tiles, self.small_batch + 1)

    @property
    def nbytes(self) -> int:
        return self.small.nbytes + self.packed_nbytes

    @property
    def packed_nbytes(self) -> int:
        return self.dense.shape[0] * self.dense.shape[1] * 2


def check_method(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise MiaotuiError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if group_size not in (32, 64, 128):
        raise MiaotuiError(f"int4 group size must be 32, 64 or 128, got {group_size}")


def quantize_weight(w: torch.Tensor, method: str, group_size: int = 32, dtype: torch.dtype = torch.bfloat16,
                    head: bool = False, codes: BlockCodes | None = None, in_power: torch.Tensor | None = None):
    """The output head stays at 8 bits whatever the method: 4-bit logits flip the argmax of small models (as
    llama.cpp keeps its output tensor at 6-8 bits). `codes`: the file's own integer blocks, taken exactly where
    the method holds them (int4: 4-bit codes at group 32; int8: up to 8 bits); `in_power`: calibration
    statistics of the inputs, for activation-aware int4."""
    if method == "auto":
        return HybridWeight(w, group_size, "int8" if head else "int4", codes)
    if method == "int8" or head:
        return Int8Weight.from_codes(codes) or Int8Weight.from_float(w, dtype)
    if codes is not None and codes.bits <= 4 and group_size == 32:
        return Int4Weight.from_codes(codes.q, codes.d, codes.m, 32)
    if w.shape[1] % group_size:
        return Int8Weight.from_float(w, dtype)  # rows that do not split into groups fall back to int8
    return Int4Weight.from_float(w, group_size, in_power)


def quantize_embedding(w: torch.Tensor, method: str, dtype: torch.dtype, codes: BlockCodes | None):
    """An untied embedding table is only ever read a row per token, never multiplied: under int4 it takes 4-bit
    groups of 32 too (Qwen2.5-0.5B's 136M entries: 153 -> 85 MB) where miaotui's kernel layout exists; int8
    otherwise."""
    int4 = method == "int4" and w.shape[1] % 32 == 0 and packed.available()
    return quantize_weight(w, "int4" if int4 else "int8", 32, dtype, codes=codes)


def file_codes(module, max_bits: int = 8) -> BlockCodes | None:
    """The integer blocks the loader kept for a Linear (every part of it) or an Embedding, if at most
    `max_bits` wide: the file's values exactly, no round trip through float."""
    codes = module.codes
    if isinstance(codes, dict):
        if len(codes) != len(module.output_sizes):
            return None
        codes = BlockCodes.cat([codes[i] for i in range(len(codes))])
    return codes if codes is not None and codes.bits <= max_bits else None


def resolve_auto(model: nn.Module) -> str:
    """`auto`: the int4 decode path where it costs no quality — the file's weights were 4-bit already (a Q4_1 or
    Q4_K block is an affine map of 4-bit codes per 32 weights, which int4 with group 32 holds exactly) and the
    model runs in bf16 on the CPU; else the method a `miaotui compress` folder was stored with; else dense."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return "none"
    if p.dtype == torch.bfloat16 and model.config.weight_bits <= 4:
        return "auto"
    return model.config.quantization or "none"


def quantize_model(model: nn.Module, method: str, group_size: int = 32, tokenizer=None) -> str:
    """Replace every Linear's weight (and a separate copy of a tied output head) by its quantized form; return
    the method applied. With a tokenizer, int4 weights that are requantized (not a 4-bit file's own codes) are
    scaled by the activations of calibration text (`Int4Weight.from_float`) when int4 was asked for: not when
    `auto` picks it for a stored int4 folder, whose grid reloads exactly only unscaled."""
    from miaotui.compress.calibrate import calibration_ids, input_power
    from miaotui.layers.linear import Linear

    check_method(method, group_size)
    calibrate = method == "int4" and tokenizer is not None
    if method == "auto":
        method = resolve_auto(model)
    if method == "none":
        _free_codes(model)
        return method
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise MiaotuiError(f"{method} quantization runs on the CPU kernels only for now; use --quantization none "
                           "on CUDA")
    dtype = next(model.parameters()).dtype
    head = model.lm_head
    # A quantized file's recipe marks its sensitive tensors by giving them more bits (Q4_K_M keeps attn_v and
    # ffn_down at Q6_K): those stay at 8 bits under int4, as llama.cpp keeps them at 6. So do attention
    # projections stored in 5-bit blocks: ~10% of the weights, but requantized to 4 bits half the loss
    # (Qwen2.5-0.5B, Q5_0 projections: +5.7% perplexity over bf16, +3.3% with them at 8 bits, for 21 MB).
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.quant is None]
    attention = {m for name, m in model.named_modules() if ".self_attn." in name}
    eight_bit = {m for m in linears if m is head or (method == "int4" and (
        5 < m.file_bits < 16 or (m.file_bits == 5 and m in attention)))}
    power = {}
    if calibrate and any(
            m not in eight_bit and m.activation_aware and not has_exact_int4(m, group_size) for m in linears):
        power = input_power(model, calibration_ids(tokenizer))
    if not isinstance(head, Linear):  # tied to the embedding table: the head gets its own quantized copy
        model.head_quant = quantize_weight(head.weight.data, method, group_size, dtype, head=True,
                                           codes=file_codes(head))
    for module in linears:
        kind = "int8" if module in eight_bit and method == "int4" else method
        module.quant = quantize_weight(module.weight.data, kind, group_size, dtype, module is head,
                                       file_codes(module), power.get(module) if module.activation_aware else None)
        module.weight = None
    if isinstance(head, Linear):
        model.head_quant = head.quant
    if method in ("int8", "int4"):  # the embedding table too, read row by row (shared with a tied head)
        emb = model.get_input_embeddings()
        if emb is not None and emb.weight is not None:
            emb.quant = model.head_quant if emb is head else quantize_embedding(
                emb.weight.data, method, dtype, file_codes(emb))
            emb.weight = None
    _free_codes(model)
    return method


def _free_codes(model: nn.Module) -> None:
    """The loader's copies of the file's codes are only needed while quantizing."""
    for module in model.modules():
        if hasattr(module, "codes"):
            module.codes = None


def has_exact_int4(module, group_size: int) -> bool:
    return group_size == 32 and file_codes(module, 4) is not None
