"""The Llama family: Llama 2/3, SmolLM2, Mistral, and Qwen2/2.5 (the same block with q/k/v biases)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.layers.activation import silu_and_mul
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding
from miaotui.models.base import CausalLM, DecoderBlockParts

if TYPE_CHECKING:
    from miaotui.attention.base import AttentionMetadata
    from miaotui.loader.tensors import FileTensor

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h, kv, d = self.shape
        qkv = self.qkv_proj(x)
        # q and k sit side by side in the fused output: rotate both in one go.
        qk = self.rotary(positions, qkv[:, : (h + kv) * d].view(-1, h + kv, d))
        v = qkv[:, (h + kv) * d :].view(-1, kv, d)
        return self.o_proj(self.attn(qk[:, :h], qk[:, h:], v, meta).view(-1, h * d))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.mlp.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp.down_proj(silu_and_mul(self.mlp.gate_up_proj(self.post_attention_layernorm(x))))

    def parts(self) -> DecoderBlockParts:
        a = self.self_attn
        return DecoderBlockParts(self.input_layernorm, a.qkv_proj, a.rotary, a.attn, a.o_proj,
                                 self.post_attention_layernorm, self.mlp.gate_up_proj, "silu", self.mlp.down_proj)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(LlamaBlock(cfg, rotary) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = self.model.embed_tokens if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def load_weights(self, weights: Iterable[tuple[str, FileTensor]]) -> None:
        self.load_stacked(weights, STACKED)
