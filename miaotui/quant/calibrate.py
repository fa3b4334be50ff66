"""Activation statistics on calibration text, for quantizers that weigh each input channel by what it carries."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from miaotui.layers.linear import Linear

CALIBRATION_TOKENS = 512


def calibration_text() -> str:
    """Calibration text that ships with Python, apart from the perplexity text (eval/perplexity.py): the
    language reference's help topics, else the standard library's docstrings."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data off
        import collections
        import json
        import os
        return "\n\n".join(m.__doc__ or "" for m in (os, json, collections, torch))
    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_ids(tokenizer) -> list[int]:
    """The first CALIBRATION_TOKENS tokens of the calibration text (only a prefix of it is encoded)."""
    return tokenizer.encode(calibration_text()[: CALIBRATION_TOKENS * 16])[:CALIBRATION_TOKENS]


@torch.inference_mode()
def input_power(model: nn.Module, ids: list[int], run: Callable[[list[int]], object]) -> dict[nn.Module, torch.Tensor]:
    """The mean square of every Linear's input channels [K] (fp32) over one prefill of `ids`, run by `run(ids)`
    (the engine's: a forward pass through a scratch KV cache)."""
    sums: dict[nn.Module, torch.Tensor] = {}

    def record(module, args):
        x = args[0].float()
        sums[module] = sums.get(module, 0) + x.square().sum(0)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Linear)]
    try:
        run(ids)
    finally:
        for h in handles:
            h.remove()
    return {m: s / len(ids) for m, s in sums.items()}
