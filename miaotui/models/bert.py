"""Bidirectional text encoders for embeddings: BERT (learned positions, GELU, biases) and nomic-bert (rotary,
SwiGLU, no biases), both post-norm. The batch is packed — the sequences' tokens one after another, no padding — so
the projections, which are nearly all the work, never multiply pad tokens; only attention runs per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.config import EncoderConfig
from miaotui.errors import ModelFileError


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h, bias = cfg.hidden_size, not cfg.rotary
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h, bias=bias)
        self.o = nn.Linear(h, h, bias=bias)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.gated = cfg.rotary  # nomic-bert: down(silu(gate) * up); BERT: down(gelu(up))
        self.up = nn.Linear(h, (2 if self.gated else 1) * cfg.intermediate_size, bias=bias)  # [gate | up] if gated
        self.down = nn.Linear(cfg.intermediate_size, h, bias=bias)
        self.out_norm = nn.LayerNorm(h, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, bounds: list[tuple[int, int]], rope: tuple[torch.Tensor, ...] | None):
        t, h = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, h // self.heads).unbind(1)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        out = torch.empty_like(x).view(t, self.heads, -1)
        for a, b in bounds:  # one sequence at a time: every token sees its own sequence, in both directions
            # as (1, heads, tokens, dim): torch's CPU flash kernel takes only 4-d inputs (3-d ones go the slower
            # math path: 1.4-1.7x the time, measured at MiniLM's 12 x 32 heads, bf16 and fp32)
            q1, k1, v1 = (t_[a:b].transpose(0, 1)[None] for t_ in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(q1, k1, v1)[0].transpose(0, 1)
        x = self.attn_norm(x + self.o(out.view(t, h)))
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            y = F.silu(gate).mul_(up)
        else:
            y = F.gelu(self.up(x))
        return self.out_norm(x + self.down(y))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the NEOX layout (the two halves of each head rotate together)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class Encoder(nn.Module):
    """`forward(ids, lengths)`: the last hidden state of every token of the packed batch."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h)
        self.position = None if cfg.rotary else nn.Embedding(cfg.max_position, h)
        self.emb_norm = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        half = h // cfg.num_heads // 2
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half),
                             persistent=False)

    def forward(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        positions = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
        x = self.word(ids) + self.token_type.weight[0]  # one segment: token type 0 throughout
        if self.position is not None:
            x = x + self.position(positions)
        x = self.emb_norm(x)
        rope = None
        if self.position is None:
            angles = positions[:, None].float() * self.inv_freq[None, :]
            rope = (angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype))
        ends = torch.tensor(lengths).cumsum(0).tolist()
        bounds = [(e - n, e) for n, e in zip(lengths, ends)]
        for layer in self.layers:
            x = layer(x, bounds, rope)
        return x

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights named as `state_dict()` names them; every one must be there with its shape."""
        own = self.state_dict()
        missing = sorted(set(own) - set(weights))
        if missing:
            raise ModelFileError(f"the encoder's weights lack {missing[0]}" + (
                f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        for name, target in own.items():
            w = weights[name]
            if tuple(w.shape) != tuple(target.shape):
                raise ModelFileError(f"{name} has shape {tuple(w.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(w)
