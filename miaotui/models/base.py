"""What every model shares: the output head, checkpoint loading into fused projections, and the attention layers."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.errors import ModelFileError
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from miaotui.attention.base import AttentionMetadata
    from miaotui.loader.tensors import FileTensor
    from miaotui.quant.base import WeightFormat


@dataclass(frozen=True, slots=True)
class DecoderBlockParts:
    """A pre-norm block described once, in the order its forward() runs it:
        h = input_norm(x); q|k|v = qkv(h); rotate q and k; write k, v to the cache; x = x + o(attention(q))
        x = x + down(activation(gate_up(post_norm(x))))
    A fast path that runs such blocks as one kernel (engine/fused.py) builds from this and must compute exactly
    what forward() computes (tests/models/test_decode_stack.py holds the two together)."""

    input_norm: RMSNorm
    qkv: Linear
    rotary: RotaryEmbedding
    attention: Attention
    o: Linear
    post_norm: RMSNorm
    gate_up: Linear
    activation: str  # "silu" or "gelu_tanh", over [gate | up]
    down: Linear


class CausalLM(nn.Module):
    """A decoder-only language model: `forward(ids, positions, meta)` gives the final hidden states, as `embed`,
    every block of `layers` and `norm` in turn; `compute_logits` the scores from them."""

    layers: nn.ModuleList

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.lm_head: nn.Module  # a Linear, or the embedding table itself when the head is tied to it
        self.head: WeightFormat | None = None  # the head's matrix in its format (quant/recipe.py sets it)
        self.quantization: str | None = None  # the method the recipe applied

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.matmul(hidden).float()

    def get_input_embeddings(self) -> Embedding | None:
        emb = getattr(getattr(self, "model", None), "embed_tokens", None)
        return emb if isinstance(emb, Embedding) else None

    def reserve_positions(self, n: int) -> int:
        """Make every rotary embedding ready for positions below n; return how many positions are ready (the
        model runner calls it again only past that)."""
        rotaries = [m for m in self.modules() if isinstance(m, RotaryEmbedding)]
        for m in rotaries:
            m.reserve(n)
        return min((m.cos.shape[0] for m in rotaries), default=sys.maxsize)  # none (GPT-2): never ask again

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def load_stacked(self, weights: Iterable[tuple[str, FileTensor]], stacked: dict[str, tuple[str, int]]) -> None:
        """Load Hugging Face-named tensors, routing q/k/v and gate/up into their fused projections. Projection and
        embedding weights are kept as the file's tensors for the recipe; everything else is copied in now."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        needed = {name for name, m in modules.items() if isinstance(m, Embedding)} | {
            f"{name}.{kind}[{i}]" for name, m in modules.items() if isinstance(m, Linear)
            for kind in ("weight", "bias")[: 1 + (m.bias is not None)] for i in range(len(m.output_sizes))}
        needed |= {n for n in params if not isinstance(modules[n.rpartition(".")[0]], Linear)}
        loaded: set[str] = set()
        for name, w in weights:
            if name == "lm_head.weight" and self.config.tie_embeddings:
                continue
            module_name, _, kind = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            shard = 0
            if leaf in stacked:
                fused, shard = stacked[leaf]
                module_name = f"{parent}.{fused}"
            mod = modules.get(module_name)
            try:
                if isinstance(mod, Linear):
                    mod.load(kind, w, shard)
                    loaded.add(f"{module_name}.{kind}[{shard}]")
                elif isinstance(mod, Embedding) and kind == "weight":
                    mod.load(w)
                    loaded.add(module_name)
                elif name in params and mod is not None and leaf not in stacked:
                    if params[name].shape != tuple(w.shape):
                        raise ModelFileError(f"shape {tuple(w.shape)}, the model expects {tuple(params[name].shape)}")
                    params[name].data.copy_(w.values())
                    loaded.add(name)
                else:
                    raise ModelFileError("it has no place in the model")
            except ModelFileError as e:
                raise ModelFileError(f"checkpoint tensor {name}: {e}") from None
        missing = sorted(needed - loaded)
        if missing:
            raise ModelFileError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
