"""The Llama family: Llama 2/3, SmolLM2, Mistral, and Qwen2/2.5 (the same block with q/k/v biases)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.context import ForwardContext, get_context
from miaotui.kernels import SMALL_ROWS, use_cpu_ops
from miaotui.layers.activation import silu_and_mul
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding
from miaotui.models.base import CausalLM

# Checkpoint projection → (fused module, part index)
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sizes = [h * d, kv * d, kv * d]
        self.qkv_proj = Linear(cfg.hidden_size, self.sizes, bias=cfg.attention_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size)
        self.rotary = rotary
        self.attn = Attention(h, kv, d, scale=d**-0.5, sliding_window=cfg.sliding_window)
        self.shape = (h, kv, d)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, kv, d = self.shape
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused output: rotate both in one go.
        qk = self.rotary(positions, qkv[:, : (h + kv) * d].view(-1, h + kv, d))
        v = qkv[:, (h + kv) * d :].view(-1, kv, d)
        return self.o_proj(self.attn(qk[:, :h], qk[:, h:], v).view(-1, h * d))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.mlp.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp.down_proj(silu_and_mul(self.mlp.gate_up_proj(self.post_attention_layernorm(x))))


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(LlamaBlock(cfg, rotary) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = self.model.embed_tokens if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

        self._stack: tuple | None = None  # (cache it was built for, rows it serves, the C++ stack or None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        ctx = get_context()
        if (stack := self._decode_stack(x, ctx)) is not None:
            rotary = self.model.layers[0].self_attn.rotary
            x = stack.decode(x, positions, ctx.slot_mapping, ctx.block_tables, ctx.context_lens_t, rotary.cos,
                             rotary.sin)
        else:
            for layer in self.model.layers:
                x = layer(x, positions)
        return self.model.norm(x)

    def _decode_stack(self, x: torch.Tensor, ctx: ForwardContext):
        """The blocks as one C++ call (kernels/cpu_ops.cpp, LlamaStack) for a pure decode step on the CPU whose
        projections all run on miaotui's kernels at this batch size; None for every other step. It runs
        the modules' own kernels in their order, so tokens are the same; module hooks do not fire on these steps
        (calibration and pruning hook prompt passes)."""
        if len(ctx.decode_seqs) != ctx.num_seqs or x.shape[0] > SMALL_ROWS or not (ops := use_cpu_ops(x)):
            return None
        cache = self.model.layers[0].self_attn.attn.k_cache
        if self._stack is None or self._stack[0] is not cache:
            self._stack = (cache, *self._build_stack(ops, x.dtype))
        return self._stack[2] if x.shape[0] <= self._stack[1] else None

    def _build_stack(self, ops, dtype: torch.dtype) -> tuple[int, object]:
        """(up to how many rows it serves, the stack), or (0, None) where some block cannot run in it."""
        rows, layers = SMALL_ROWS, []
        for block in self.model.layers:
            attn = block.self_attn.attn
            if attn.k_cache is None or attn.k_cache.dtype != (torch.int8 if attn.k_scale is not None else dtype):
                return 0, None
            projs = []
            for linear in (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj,
                           block.mlp.down_proj):
                if (kernel := linear.kernel()) is None:
                    return 0, None
                rows = min(rows, kernel.max_rows)
                projs.append(kernel.proj(sum(linear.output_sizes), None if linear.bias is None else linear.bias.data))
            layers.append(ops.LlamaLayer(block.input_layernorm.weight.data, block.post_attention_layernorm.weight.data,
                                         *projs, attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale,
                                         attn.sliding_window or 0))
        first = self.model.layers[0].self_attn
        return rows, ops.LlamaStack(layers, *first.shape, self.config.norm_eps, first.attn.scale)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.load_stacked(weights, STACKED)
