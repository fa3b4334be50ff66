"""Gemma 3 (text): five sliding-window layers to one global, QK-norm, GeGLU, norms before and after each block,
embeddings scaled by sqrt(hidden), and a different rope theta for local and global layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.layers.activation import gelu_tanh_and_mul
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding
from miaotui.models.base import CausalLM
from miaotui.models.llama import STACKED

if TYPE_CHECKING:
    from miaotui.attention.base import AttentionMetadata
    from miaotui.loader.tensors import FileTensor


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sizes = [h * d, kv * d, kv * d]
        self.shape = (h, kv, d)
        self.qkv_proj = Linear(cfg.hidden_size, self.sizes, bias=cfg.attention_bias)
        # q and k are RMS-normalised per head after this projection, where the per-weight error proxy of
        # activation-aware int4 misleads: measured +6% perplexity with it, against -6% for the MLP's inputs.
        self.qkv_proj.activation_aware = False
        self.o_proj = Linear(h * d, cfg.hidden_size)
        self.q_norm = RMSNorm(d, cfg.norm_eps)
        self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.rotary = rotary
        scale = (cfg.query_pre_attn_scalar or d) ** -0.5
        window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.attn = Attention(h, kv, d, scale=scale, sliding_window=window)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h, kv, d = self.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        qk = self.rotary(positions, torch.cat([self.q_norm(q.view(-1, h, d)), self.k_norm(k.view(-1, kv, d))], 1))
        q, k = qk[:, :h], qk[:, h:]
        return self.o_proj(self.attn(q, k, v.view(-1, kv, d), meta).view(-1, h * d))


class Gemma3Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding):
        super().__init__()
        eps = cfg.norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.mlp.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, meta))
        mlp = self.mlp.down_proj(gelu_tanh_and_mul(self.mlp.gate_up_proj(self.pre_feedforward_layernorm(x))))
        return x + self.post_feedforward_layernorm(mlp)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        global_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        local_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, local_theta)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(
            Gemma3Block(cfg, i, local_rope if cfg.is_sliding(i) else global_rope) for i in range(cfg.num_layers)
        )
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = self.model.embed_tokens if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.embed_scale = cfg.hidden_size**0.5

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def load_weights(self, weights: Iterable[tuple[str, FileTensor]]) -> None:
        self.load_stacked(weights, STACKED)
