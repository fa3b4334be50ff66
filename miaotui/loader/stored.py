"""The layout of quantized projections in a `miaotui compress --quantize` folder (safetensors), written by
compress/export.py and read back here as the codes they are — so loading such a folder is exact, at its group size.

transformers cannot read these (config.json records `quantization_config.quant_method = "miaotui"`):
- int8: `X.weight` int8 [N, K] and `X.weight_scale` [N]: w = q * scale.
- int4: `X.weight_packed` uint8 [N, K/2] (low nibble = even column), `X.weight_scale` and `X.weight_zero` [N, K/group]:
  w = (q - 8) * scale + zero (the convention of torch's int4 CPU kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from miaotui.loader.tensors import BlockCodes

READ_WITH_WEIGHT = (".weight_scale", ".weight_zero")  # tensors read together with their projection's codes


def int8_tensors(q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """q int8 [N, K], scale [N]."""
    return {"weight": q.contiguous(), "weight_scale": scale.contiguous()}


def int4_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """q in 0..15 [N, K], scale and zero [N, K / group]."""
    q = q.to(torch.uint8)
    return {"weight_packed": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), "weight_scale": scale.contiguous(),
            "weight_zero": zero.contiguous()}


def read_codes(prefix: str, get: Callable[[str], torch.Tensor | None]) -> BlockCodes | None:
    """The codes of projection `prefix` if it is stored quantized (`get(name)` reads a tensor or gives None)."""
    scale = get(f"{prefix}.weight_scale")
    if scale is None:
        return None
    scale = scale.float()
    packed = get(f"{prefix}.weight_packed")
    if packed is None:  # int8, one group per row; unsigned codes q + 128
        q = get(f"{prefix}.weight")
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        return BlockCodes(codes, scale[:, None], -128 * scale[:, None], 8)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return BlockCodes(q, scale, get(f"{prefix}.weight_zero").float() - 8 * scale, 4)


def dequantize(codes: BlockCodes) -> torch.Tensor:
    """The float weight [N, K] of stored codes."""
    n, k = codes.q.shape
    g = codes.q.float().view(n, -1, codes.group)
    return (g * codes.d[..., None] + codes.m[..., None]).reshape(n, k)
