"""Loading: a model source → files → canonical config and weights → a model on its device, plus its tokenizer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from miaotui.config import ModelConfig
from miaotui.errors import EncoderModelError, ModelFileError
from miaotui.loader import gguf, safetensors
from miaotui.loader.encoder import GGUF_ARCHITECTURES, is_encoder
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import ModelFiles, resolve
from miaotui.loader.tensors import FileTensor
from miaotui.models.base import CausalLM
from miaotui.models.registry import model_class
from miaotui.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    files: ModelFiles
    load_seconds: float


def read_model(files: ModelFiles) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, FileTensor]]]:
    """Config, tokenizer and the checkpoint's tensors (unread), checking what can be checked before allocating."""
    if files.kind == "gguf":
        f = GGUFFile(files.path)
        if f.get("general.architecture") in GGUF_ARCHITECTURES:
            raise _encoder(files)
        gguf.check_tensor_types(f)
        cfg = _checked(gguf.read_config(f), f.path)
        return cfg, Tokenizer.from_gguf(f.metadata, f.path), gguf.iter_weights(f, cfg)
    if is_encoder(files):  # reads config.json only
        raise _encoder(files)
    cfg = _checked(safetensors.read_config(files.path), files.path / "config.json")
    return cfg, Tokenizer.from_folder(files.path), safetensors.iter_weights(files.path, cfg)


def _encoder(files: ModelFiles) -> EncoderModelError:
    return EncoderModelError(f"{files.path}: {files.name} is an embedding model, not a language model: embed with "
                             "LLM(...).embed() or serve it with `miaotui serve --embedding-model`")


def _checked(cfg: ModelConfig, path: Path | str) -> ModelConfig:
    try:
        cfg.check()
    except ValueError as e:
        raise ModelFileError(f"{path}: implausible model hyper-parameters: {e}") from None
    return cfg


def load(source: str | ModelFiles | None, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model with its small parameters (norms, biases) in place and its matrices still as the file's tensors:
    the recipe (quant/recipe.py) turns each into its weight format."""
    start = time.perf_counter()
    files = source if isinstance(source, ModelFiles) else resolve(source)
    cfg, tokenizer, weights = read_model(files)
    device = torch.device(device)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = model_class(cfg.architecture)(cfg)
    finally:
        torch.set_default_dtype(previous)
    try:
        model.load_weights(weights)
    except ModelFileError as e:
        raise ModelFileError(f"{files.path}: {e}") from None
    model.eval()
    return LoadedModel(model, tokenizer, cfg, files, time.perf_counter() - start)
