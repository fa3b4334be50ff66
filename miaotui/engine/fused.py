"""The fused decode stack, a fast path of the runner: a pure decode step through every block of a model in one C++
call (kernels/stack.cpp `LlamaStack`), built from the blocks' own description (`DecoderBlockParts`).

Driven from Python, a decode step's ~15 small ops a block cost more than their arithmetic (module calls and
per-op dispatch: ~3 ms of a 9 ms SmolLM2 token). The stack runs the modules' own kernels in their order with
the same roundings, so tokens and logprobs equal the module path exactly (tests/models/test_decode_stack.py).
It serves pure decode steps on the CPU whose projections all run on miaotui's kernels at that batch size; every
other step runs the modules.
"""

from __future__ import annotations

import torch

from miaotui.attention.base import AttentionMetadata
from miaotui.kernels import cpu_ops
from miaotui.models.base import CausalLM, DecoderBlockParts
from miaotui.quant.base import StackWeight

MAX_ROWS = 64  # the C++ stack serves steps of up to this many sequences


class DecodeStack:
    def __init__(self, stack, rows: int, rotary):
        self.stack, self.rows, self.rotary = stack, rows, rotary

    def decode(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.stack.decode(x, positions, meta.slot_mapping, meta.block_tables, meta.context_lens_t,
                                 self.rotary.cos, self.rotary.sin)


def build(model: CausalLM, dtype: torch.dtype) -> DecodeStack | None:
    """The stack for the model's blocks as they are now (formats and KV cache assigned), or None where some block
    cannot run in it: no description, another activation, a projection off miaotui's kernels, a cache in
    another dtype, not on the CPU."""
    ops = cpu_ops()
    if ops is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    parts: list[DecoderBlockParts] = []
    for block in model.layers:
        describe = getattr(block, "parts", None)
        p = describe() if describe is not None else None
        if p is None or p.activation != "silu" or (parts and p.rotary is not parts[0].rotary):
            return None  # (one angle table for all blocks)
        parts.append(p)
    if not parts:
        return None
    rows, layers = MAX_ROWS, []
    for p in parts:
        attn = p.attention
        if attn.k_cache is None or attn.k_cache.device.type != "cpu" or attn.k_cache.dtype != (
                torch.int8 if attn.k_scale is not None else dtype):
            return None
        projs = []
        for linear in (p.qkv, p.o, p.gate_up, p.down):
            kernel = linear.format.kernel()
            if kernel is None:
                return None
            rows = min(rows, kernel.max_rows)
            projs.append(_proj(ops, kernel, sum(linear.output_sizes), linear.bias))
        layers.append(ops.LlamaLayer(p.input_norm.weight.data, p.post_norm.weight.data, *projs, attn.k_cache,
                                     attn.v_cache, attn.k_scale, attn.v_scale, attn.sliding_window or 0))
    a = parts[0].attention
    stack = ops.LlamaStack(layers, a.num_heads, a.num_kv_heads, a.head_dim, parts[0].input_norm.eps, a.scale)
    return DecodeStack(stack, rows, parts[0].rotary)


def _proj(ops, k: StackWeight, n: int, bias: torch.Tensor | None):
    p = k.packed
    return ops.Proj(None if p is None else p.data, None if p is None else p.dm, p.bits if p else 0,
                    p.group if p else 0, n, k.in_scale, None if bias is None else bias.data, k.tiles, k.tile_rows,
                    p.act_bits if p else 16)
