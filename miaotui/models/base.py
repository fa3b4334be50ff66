"""What every model shares: the output head, stacked-weight loading, and the list of attention layers."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from miaotui.config import ModelConfig
from miaotui.errors import ModelFileError
from miaotui.layers.attention import Attention
from miaotui.layers.linear import Embedding, Linear


class CausalLM(nn.Module):
    """A decoder-only language model: `forward(ids, positions)` gives hidden states, `compute_logits` the scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.lm_head: nn.Module
        self.head_quant = None  # quantized copy of the output head (it may be tied to the embedding table)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_quant is not None:
            return self.head_quant.matmul(hidden).float()
        return torch.nn.functional.linear(hidden, self.lm_head.weight).float()

    def get_input_embeddings(self) -> nn.Module | None:
        emb = getattr(getattr(self, "model", None), "embed_tokens", None)
        return emb if isinstance(emb, Embedding) else None

    def reserve_positions(self, n: int) -> int:
        """Make every rotary embedding ready for positions below n; return how many positions are ready (the
        model runner calls it again only past that)."""
        from miaotui.layers.rotary import RotaryEmbedding

        rotaries = [m for m in self.modules() if isinstance(m, RotaryEmbedding)]
        for m in rotaries:
            m.reserve(n)
        return min((m.cos.shape[0] for m in rotaries), default=sys.maxsize)  # none (GPT-2): never ask again

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def load_stacked(self, weights: Iterable[tuple[str, torch.Tensor]], stacked: dict[str, tuple[str, int]]) -> None:
        """Load Hugging Face-named tensors, routing q/k/v and gate/up into their fused projections."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            if name == "lm_head.weight" and self.config.tie_embeddings:
                continue
            module_name, _, kind = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            if leaf in stacked:
                fused, shard = stacked[leaf]
                target = f"{parent}.{fused}"
                mod = modules.get(target)
                if not isinstance(mod, Linear):
                    raise ModelFileError(f"checkpoint tensor {name} has no place in the model")
                mod.load(kind, w, shard)
                loaded.add(f"{target}.{kind}")
                continue
            if name not in params:
                raise ModelFileError(f"checkpoint tensor {name} has no place in the model")
            if params[name].shape != w.shape:
                raise ModelFileError(f"checkpoint tensor {name} has shape {tuple(w.shape)}, "
                                     f"the model expects {tuple(params[name].shape)}")
            mod = modules.get(module_name)
            if isinstance(mod, Linear):
                mod.load(kind, w)  # keeps the file's integer codes too
            else:
                params[name].data.copy_(w)
                if isinstance(mod, Embedding):
                    mod.codes = getattr(w, "codes", None)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ModelFileError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
