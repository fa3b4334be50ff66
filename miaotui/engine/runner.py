"""The model runner: owns the model and its KV cache tensors, flattens a scheduled batch into one forward pass."""

from __future__ import annotations

import torch

from miaotui.config import ModelConfig
from miaotui.context import ForwardContext, forward_context
from miaotui.engine.sequence import Sequence
from miaotui.models.base import CausalLM


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Cache bytes per token: keys and values of every layer, plus one scale per head for an int8 cache."""
    size = torch.empty((), dtype=dtype).element_size()
    if kv_cache_dtype == "int8":
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + size)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto"):
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.positions_ready = 0  # rotary tables cover positions below this (models grow them on request)
        cfg = self.config
        int8 = kv_cache_dtype == "int8"
        # One tensor for all layers: [2, layers, blocks, block_size, kv_heads, head_dim]
        shape = (2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads)
        self.kv_cache = torch.empty(*shape, cfg.head_dim, dtype=torch.int8 if int8 else self.dtype,
                                    device=self.device)
        self.kv_scale = torch.empty(*shape, 1, dtype=self.dtype, device=self.device) if int8 else None
        self.zero_blocks([0])  # block 0 also pads block tables: keep it finite from the start
        layers = model.attention_layers()
        assert len(layers) == cfg.num_layers, "every layer must have exactly one Attention module"
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            if int8:
                attn.k_scale, attn.v_scale = self.kv_scale[0, i], self.kv_scale[1, i]

    def zero_blocks(self, blocks: list[int]) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.device)
            self.kv_cache[:, :, index] = 0
            if self.kv_scale is not None:
                self.kv_scale[:, :, index] = 0

    def _context(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[ForwardContext, torch.Tensor,
                                                                              torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens = []
        bs = self.block_size
        for seq, n in zip(seqs, num_tokens):
            start = seq.num_computed
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            context_lens.append(start + n)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        dev = self.device
        ctx = ForwardContext(
            query_start=query_start,
            context_lens=context_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            context_lens_t=torch.tensor(context_lens, dtype=torch.long, device=dev),
            decode_seqs=[i for i, n in enumerate(num_tokens) if n == 1],
            prefill_seqs=[i for i, n in enumerate(num_tokens) if n > 1],
        )
        return ctx, torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, device=dev)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """One forward pass. Returns float32 logits of each sequence's last token [B, V], or of every token."""
        ctx, ids, positions = self._context(seqs, num_tokens)
        longest = max(ctx.context_lens)
        if longest > self.positions_ready:
            self.positions_ready = self.model.reserve_positions(longest)
        with forward_context(ctx):
            hidden = self.model(ids, positions)
        if not all_logits:
            hidden = hidden[torch.tensor(ctx.query_start[1:], device=self.device) - 1]
        return self.model.compute_logits(hidden)
