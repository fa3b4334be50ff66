"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused c_attn stored as Conv1D ([in, out]) weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.config import ModelConfig
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear
from miaotui.layers.norm import LayerNorm
from miaotui.models.base import CausalLM

if TYPE_CHECKING:
    from miaotui.attention.base import AttentionMetadata
    from miaotui.loader.tensors import FileTensor


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h = cfg.hidden_size, cfg.num_heads
        self.h, self.d = h, cfg.head_dim
        self.ln_1 = LayerNorm(e, cfg.norm_eps)
        self.c_attn = Linear(e, 3 * e, bias=True)
        self.attn_proj = Linear(e, e, bias=True)
        self.attn = Attention(h, h, cfg.head_dim, scale=cfg.head_dim**-0.5)
        self.ln_2 = LayerNorm(e, cfg.norm_eps)
        self.c_fc = Linear(e, cfg.intermediate_size, bias=True)
        self.mlp_proj = Linear(cfg.intermediate_size, e, bias=True)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).view(-1, 3, self.h, self.d).unbind(1)
        x = x + self.attn_proj(self.attn(q, k, v, meta).reshape(-1, self.h * self.d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(CausalLM):
    # Hugging Face name suffix → ours; Conv1D weights are [in, out] and get transposed.
    NAMES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = Embedding(cfg.max_position, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = self.wte

    @property
    def layers(self) -> nn.ModuleList:
        return self.h

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(positions)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def load_weights(self, weights: Iterable[tuple[str, FileTensor]]) -> None:
        def renamed():
            for name, w in weights:
                name = name.removeprefix("transformer.")
                if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") or name == "lm_head.weight":
                    continue  # causal-mask buffers of old checkpoints; the tied head
                for theirs, ours in self.NAMES.items():
                    if f".{theirs}." in name:
                        name = name.replace(theirs, ours)
                        if name.endswith(".weight"):
                            w = w.transposed()
                yield name, w

        self.load_stacked(renamed(), {})
