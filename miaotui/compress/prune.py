"""Pruning, applied to a model's Hugging Face-named weights before they are written out (`miaotui compress`).

- magnitude: unstructured; in every row of every block projection, the given fraction of smallest |w| become 0
  (per row rather than per matrix, so no output channel loses all its inputs).
- 2:4: in every group of four consecutive inputs the two smallest |w| become 0 — the pattern sparse tensor
  cores accelerate.
- layers: drop the blocks whose removal hurts least, scored by the angular distance between a block's input and
  output hidden states on calibration text (Gromov et al. 2024): a block that barely turns the residual stream
  does little.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from miaotui.compress.export import quantizable
from miaotui.config import ModelConfig

def magnitude(state: dict[str, torch.Tensor], sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for name, w in state.items():
        k = int(sparsity * w.shape[-1]) if quantizable(name) else 0
        if k:
            w.scatter_(1, w.abs().argsort(dim=1)[:, :k], 0.0)


def two_four(state: dict[str, torch.Tensor]) -> None:
    for name, w in state.items():
        if quantizable(name) and w.shape[1] % 4 == 0:
            g = w.view(w.shape[0], -1, 4)
            g.scatter_(2, g.abs().argsort(dim=2)[..., :2], 0.0)


def sparsity(state: dict[str, torch.Tensor]) -> float:
    """Fraction of zeros among the block projections' weights."""
    zeros = total = 0
    for name, w in state.items():
        if quantizable(name):
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


@torch.inference_mode()
def layer_scores(engine, ids: list[int], window: int = 512) -> list[float]:
    """Mean angular distance (0..1) between each block's input and output over the calibration tokens."""
    layers = engine.loaded.model.layers
    sums = [0.0] * len(layers)
    count = [0]

    def hook(i: int):
        def record(module, args, output):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1)
            sums[i] += float(torch.arccos(cos.clamp(-1, 1)).sum() / math.pi)
            if i == 0:
                count[0] += cos.numel()
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, max(len(ids) - 1, 1), window):
            engine.prompt_logits(ids[start : start + window])
    finally:
        for h in handles:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


def drop_layers(state: dict[str, torch.Tensor], cfg: ModelConfig, drop: list[int]) -> tuple[dict, ModelConfig]:
    """The weights and config without blocks `drop`; later blocks are renumbered, each keeps its attention type."""
    keep = [i for i in range(cfg.num_layers) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, w in state.items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in new_index:
                continue
            name = f"model.layers.{new_index[int(index)]}.{rest}"
        out[name] = w
    types = None
    if cfg.sliding_window is not None:
        types = [("sliding_attention" if cfg.is_sliding(i) else "full_attention") for i in keep]
    return out, replace(cfg, num_layers=len(keep), layer_types=types)
