"""Architecture name → model class, imported lazily so loading one family never imports the others."""

from __future__ import annotations

import importlib

from miaotui.errors import ModelFileError
from miaotui.models.base import CausalLM

_MODELS = {
    "llama": ("miaotui.models.llama", "LlamaForCausalLM"),
    "mistral": ("miaotui.models.llama", "LlamaForCausalLM"),
    "qwen2": ("miaotui.models.llama", "LlamaForCausalLM"),
    "gemma3": ("miaotui.models.gemma3", "Gemma3ForCausalLM"),
    "gpt2": ("miaotui.models.gpt2", "GPT2LMHeadModel"),
}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in _MODELS:
        raise ModelFileError(f"unsupported architecture {architecture!r} (supported: {', '.join(_MODELS)})")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
