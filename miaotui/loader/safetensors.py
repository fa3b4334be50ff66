"""Hugging Face model folders: config.json → ModelConfig, `*.safetensors` (single or sharded) → tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from miaotui.config import ModelConfig
from miaotui.errors import ModelFileError
from miaotui.loader import stored
from miaotui.loader.tensors import FileTensor

_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gpt2": "gpt2"}


def read_config(folder: Path) -> ModelConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{folder / 'config.json'}: cannot read the model config ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type not in _TYPES:
        raise ModelFileError(f"{folder}: unsupported model_type {model_type!r} (supported: {', '.join(_TYPES)})")
    try:
        return _config(raw, _TYPES[model_type], folder)
    except KeyError as e:
        raise ModelFileError(f"{folder / 'config.json'}: the model config lacks {e}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ModelFileError(f"{folder / 'config.json'}: bad value in the model config ({e})") from None


def _config(raw: dict, arch: str, folder: Path) -> ModelConfig:
    if arch == "gpt2":
        e = raw["n_embd"]
        return ModelConfig(
            architecture="gpt2", vocab_size=raw["vocab_size"], hidden_size=e,
            intermediate_size=raw.get("n_inner") or 4 * e, num_layers=raw["n_layer"], num_heads=raw["n_head"],
            num_kv_heads=raw["n_head"], head_dim=e // raw["n_head"], max_position=raw["n_positions"],
            norm_eps=raw.get("layer_norm_epsilon", 1e-5), tie_embeddings=True, name=folder.name,
        )
    heads = raw["num_attention_heads"]
    rope = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta") or rope.get("rope_theta") or rope.get("full_attention", {}).get("rope_theta")
    scaling = raw.get("rope_scaling")
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position=raw.get("max_position_embeddings", 4096),
        norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta or 10000.0),
        rope_scaling={"type": scaling.get("rope_type", scaling.get("type")), **scaling} if scaling else None,
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", arch == "gemma3")),
        name=folder.name,
    )
    if arch == "llama" and raw.get("sliding_window"):
        cfg.sliding_window = raw["sliding_window"]
    if arch == "gemma3":
        cfg.sliding_window = raw.get("sliding_window", 512)
        cfg.sliding_window_pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern", 6)
        cfg.rope_local_theta = raw.get("rope_local_base_freq") or rope.get("sliding_attention", {}).get(
            "rope_theta", 10000.0)
        cfg.query_pre_attn_scalar = raw.get("query_pre_attn_scalar", cfg.head_dim)
        if raw.get("layer_types"):
            cfg.layer_types = list(raw["layer_types"])
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") == "miaotui":
        cfg.quantization = quant["method"]
        cfg.weight_bits = quant["bits"]
        cfg.quantization_group = quant.get("group_size")
    elif quant:
        raise ModelFileError(f"{folder}: quantization {quant.get('quant_method')!r} is not supported; "
                             "use float weights or a `miaotui compress` folder")
    return cfg


def iter_weights(folder: Path, cfg: ModelConfig) -> Iterator[tuple[str, FileTensor]]:
    """Every tensor of the folder's safetensors files; a stored quantized projection comes with its codes."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors weights in the model folder")
    for name in files:
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())

                def get(key: str) -> torch.Tensor | None:
                    return f.get_tensor(key) if key in keys else None

                for key in f.keys():
                    if key.endswith(stored.READ_WITH_WEIGHT):
                        continue
                    prefix, _, kind = key.rpartition(".")
                    codes = stored.read_codes(prefix, get) if kind in ("weight", "weight_packed") else None
                    if codes is not None:
                        deq = stored.dequantize(codes)
                        yield f"{prefix}.weight", FileTensor(tuple(deq.shape), codes.bits, lambda deq=deq: deq,
                                                             lambda codes=codes: codes)
                        continue
                    w = f.get_tensor(key)
                    # Gemma's RMSNorm multiplies by (1 + w); we keep the multiplier itself, as GGUF does.
                    if cfg.architecture == "gemma3" and key.endswith("norm.weight"):
                        w = w.float() + 1.0
                    yield key, FileTensor.of(w)
        except (OSError, RuntimeError, SafetensorError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0][:200]})") from None
