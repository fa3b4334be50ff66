"""Writing a model out as a Hugging Face folder (config.json, model.safetensors, tokenizer files), the format
transformers and miaotui both load. Quantized weights (`miaotui compress --quantize`) are stored in miaotui's own
layout (loader/stored.py), which loads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from miaotui.config import ModelConfig
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Embedding, Linear
from miaotui.loader import stored
from miaotui.models.base import CausalLM
from miaotui.models.llama import STACKED
from miaotui.quant.dense import DenseWeight
from miaotui.quant.int8 import Int8Weight
from miaotui.tokenizer import Tokenizer

EXPORTABLE = ("llama", "qwen2", "gemma3")
_HF = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
       "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_PARTS = {fused: [name for name, (f, _) in sorted(STACKED.items(), key=lambda kv: kv[1][1]) if f == fused]
          for fused, _ in STACKED.values()}


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's float weights under Hugging Face names: fused q|k|v and gate|up split apart again."""
    cfg = model.config
    if cfg.architecture not in EXPORTABLE:
        raise MiaotuiError(f"cannot export a {cfg.architecture} model (supported: {', '.join(EXPORTABLE)})")
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            if not isinstance(module.format, DenseWeight):
                raise MiaotuiError("export needs the float weights: load the model with quantization none")
            tensors.append((f"{name}.weight", module.format.weight))
    tensors += [(name, p.data) for name, p in model.named_parameters()]
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors:
        module_name, _, kind = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        if leaf in _PARTS:
            module = model.get_submodule(module_name)
            for part, chunk in zip(_PARTS[leaf], w.split(module.output_sizes)):
                out[f"{parent}.{part}.{kind}"] = chunk
            continue
        if cfg.architecture == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # Gemma's checkpoints store the norm multiplier minus one
        out[name] = w
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer) -> dict:
    model_type, arch = _HF[cfg.architecture]
    raw = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
    }
    if cfg.rope_scaling:
        raw["rope_scaling"] = {"rope_type": cfg.rope_scaling["type"], **cfg.rope_scaling}
    if cfg.architecture == "llama":
        raw["attention_bias"] = cfg.attention_bias
        raw["hidden_act"] = "silu"
    if cfg.architecture == "qwen2":
        raw["hidden_act"] = "silu"
    if cfg.architecture == "gemma3":
        raw.update(
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),
            sliding_window=cfg.sliding_window, rope_local_base_freq=cfg.rope_local_theta,
            layer_types=[("sliding_attention" if cfg.is_sliding(i) else "full_attention")
                         for i in range(cfg.num_layers)],
            final_logit_softcapping=None, attn_logit_softcapping=None,
        )
    return raw


def pack_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q = Int8Weight.from_float(w, torch.bfloat16)
    return stored.int8_tensors(q.codes(), q.scales)


def pack_int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Each group's [min, max] on a 4-bit grid (w = (q - 8) * scale + zero, scale and zero rounded to bf16)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero) / scale + 8).clamp(0, 15).reshape(n, k)
    return stored.int4_tensors(q, scale.reshape(n, -1).to(torch.bfloat16), zero.reshape(n, -1).to(torch.bfloat16))


def quantizable(name: str) -> bool:
    """The block projections; embeddings, norms and the output head stay in float."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def save_folder(out: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Tokenizer,
                dtype: torch.dtype = torch.bfloat16, quantization: str = "none", group_size: int = 32) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config(cfg, dtype, tokenizer)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if quantization != "none" and quantizable(name) and (quantization == "int8" or w.shape[1] % group_size == 0):
            parts = pack_int8(w) if quantization == "int8" else pack_int4(w, group_size)
            prefix = name.removesuffix(".weight")
            tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
        else:
            tensors[name] = w.to(dtype).contiguous()
    if quantization != "none":
        raw["quantization_config"] = {"quant_method": "miaotui", "method": quantization,
                                      "bits": 8 if quantization == "int8" else 4, "group_size": group_size}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer.save(out)
    return out
