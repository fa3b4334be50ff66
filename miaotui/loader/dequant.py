"""Vectorised GGUF dequantization in torch (multi-threaded, ~10x faster than gguf-py's numpy reference).

Each function takes the raw blocks as a uint8 tensor of shape [n_blocks, type_size] and returns float32 values
of shape [n_blocks, block_size]. The block layouts are llama.cpp's (ggml-common.h); tests compare every type
with `gguf.quants.dequantize`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from miaotui.errors import ModelFileError
from miaotui.loader.tensors import BlockCodes


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row → float32 column [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes → [n, 32]: low nibbles give elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] little-endian uint32 of high bits → [n, 32] values of 0 or 16."""
    bits = qh.contiguous().view(torch.int32)  # [n, 1]
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits >> shifts) & 1).to(torch.uint8) << 4


def q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K → 8 six-bit scales and 8 six-bit mins per super-block."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] → [n, 8, 32]: each 32-byte chunk gives one sub-block from low nibbles, the next from high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:]).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(-1, 256)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit i of qh[l] is the fifth bit of element l of sub-block i
    high = ((qh[:, None, :] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1) << 4
    q = (_k_nibbles(b[:, 48:]) | high).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(-1, 256)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].reshape(-1, 2, 64)  # two halves of 128 elements
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 16)
    d = _f16(b[:, 208:210])
    # Within a half: elements [0,32) low nibbles of ql[0:32], [32,64) low of ql[32:64],
    # [64,96) high of ql[0:32], [96,128) high of ql[32:64]; qh supplies 2 bits each at shifts 0,2,4,6.
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-1).reshape(-1, 2, 4, 32)
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(-1, 16, 16)
    return (d[..., None] * sc[..., None] * q).reshape(-1, 256)


def block_codes(raw: np.ndarray | torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> BlockCodes | None:
    """The codes of a type that is an affine map of integers per 32 weights (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q8_0);
    None for the others (Q6_K's sub-blocks of 16, Q5_K, floats)."""
    if qtype not in (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        return None
    data = torch.from_numpy(np.array(raw)) if isinstance(raw, np.ndarray) else raw
    b = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype == Q.Q4_K:
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scales(b[:, 4:16])
        q, scale, low, bits = _k_nibbles(b[:, 16:]), d * sc, -(dmin * mn), 4
    elif qtype == Q.Q8_0:
        scale = _f16(b[:, :2])
        q, low, bits = (b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8), -128 * scale, 8
    else:
        bits = 4 if qtype in (Q.Q4_0, Q.Q4_1) else 5
        affine = qtype in (Q.Q4_1, Q.Q5_1)
        offset = 2 + 2 * affine + 4 * (bits == 5)
        q, scale = _nibbles(b[:, offset:]), _f16(b[:, :2])
        if bits == 5:
            q = q | _fifth_bits(b[:, offset - 4 : offset])
        low = _f16(b[:, 2:4]) if affine else -(2 ** (bits - 1)) * scale
        q = q[:, None]
    n = shape[0]
    return BlockCodes(q.reshape(n, -1).contiguous(), scale.reshape(n, -1), low.reshape(n, -1), bits)


DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: q4_0,
    Q.Q4_1: q4_1,
    Q.Q5_0: q5_0,
    Q.Q5_1: q5_1,
    Q.Q8_0: q8_0,
    Q.Q4_K: q4_k,
    Q.Q5_K: q5_k,
    Q.Q6_K: q6_k,
}
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED_TYPES = set(DEQUANTIZERS) | set(FLOAT_TYPES)


def dequantize(raw: np.ndarray | torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes of one tensor → float32 (or the file's float dtype) tensor of `shape`."""
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # the memory map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(raw)
    else:
        data = raw
    if qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[qtype]).reshape(shape)
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ModelFileError(f"tensor type {qtype.name} is not supported (supported: {supported})")
    _, type_size = GGML_QUANT_SIZES[qtype]
    return fn(data.reshape(-1, type_size)).reshape(shape)
