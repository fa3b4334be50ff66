"""Perplexity over a text, with llama.cpp's method (score the second half of each non-overlapping window, as
`llama-perplexity -c N` does) so numbers compare across engines, or a sliding window (stride ctx/2, each token
scored once with at least ctx/2 tokens of context)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from miaotui.engine.engine import Engine
from miaotui.errors import MiaotuiError

METHODS = ("llamacpp", "sliding")


def default_text() -> str:
    """Text that ships with Python itself: the interpreter's LICENSE, else the standard library's docstrings."""
    license_file = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "LICENSE.txt"
    if license_file.is_file():
        return license_file.read_text(encoding="utf-8", errors="replace")
    import collections
    import json
    import os
    return "\n\n".join(m.__doc__ or "" for m in (os, json, collections, math))


def perplexity(engine: Engine, ids: list[int], ctx: int = 512, method: str = "llamacpp",
               max_windows: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored)."""
    if method not in METHODS:
        raise MiaotuiError(f"unknown perplexity method {method!r}; use one of {', '.join(METHODS)}")
    if ctx < 4 or ctx > engine.max_model_len:
        raise MiaotuiError(f"--ctx must be between 4 and the context length {engine.max_model_len}, got {ctx}")
    if len(ids) < ctx:
        raise MiaotuiError(f"the text has {len(ids)} tokens, fewer than one {ctx}-token window")
    return _score(engine.prompt_logits, ids, ctx, method, max_windows)


def _score(window_logits, ids: list[int], ctx: int, method: str, max_windows: int | None) -> tuple[float, int]:
    """The windows of `method` over ids, each scored from `window_logits(window) -> [len, V]`."""
    nll, count = 0.0, 0
    half = ctx // 2
    if method == "llamacpp":
        windows = [(s, half) for s in range(0, len(ids) - ctx + 1, ctx)]
    else:  # sliding: windows overlap by half; each scores only the tokens the previous one did not
        windows = [(0, 0)] + [(s, half) for s in range(half, len(ids) - ctx + 1, half)]
    for start, first in windows[:max_windows]:
        window = ids[start : start + ctx]
        logits = window_logits(window)
        target = torch.tensor(window[first + 1 :], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits[first:-1].float(), target, reduction="sum").item()
        count += len(target)
    return math.exp(nll / count), count


def llama_cpp_perplexity(gguf_path: str, ids: list[int], ctx: int = 512, method: str = "llamacpp",
                         max_windows: int | None = None) -> tuple[float, int]:
    """The same windows and token ids scored by llama.cpp (llama-cpp-python) on the same GGUF file."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                n_threads=torch.get_num_threads())

    def window_logits(window: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(window)
        return torch.from_numpy(np.array(llm.scores[: len(window)]))

    return _score(window_logits, ids, ctx, method, max_windows)
