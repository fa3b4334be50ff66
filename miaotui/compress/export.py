"""Writing a model out as a Hugging Face folder (config.json, model.safetensors, tokenizer files), the format
transformers and miaotui both load.

Quantized weights (`miaotui compress --quantize`) are stored packed, in a layout of our own that transformers
cannot read (it records `quantization_config.quant_method = "miaotui"`):
- int8: `X.weight` int8 [N, K] and `X.weight_scale` [N]: w = q * scale.
- int4: `X.weight_packed` uint8 [N, K/2] (low nibble = even column), `X.weight_scale` and `X.weight_zero`
  [N, K/group]: w = (q - 8) * scale + zero, the layout of torch's int4 CPU kernel, so loading is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from miaotui.config import ModelConfig
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.models.base import CausalLM
from miaotui.models.llama import STACKED
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
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight is None:
            raise MiaotuiError("export needs the float weights: load the model with quantization none")
    for name, p in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        w = p.data
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
    from miaotui.compress.quantize import Int8Weight

    q = Int8Weight.from_float(w, torch.bfloat16)
    return {"weight": q.codes(), "weight_scale": q.scales}


def pack_int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return {"weight_packed": q[:, 0::2] | (q[:, 1::2] << 4), "weight_scale": scale.reshape(n, -1).to(torch.bfloat16),
            "weight_zero": zero.reshape(n, -1).to(torch.bfloat16)}


def unpack(prefix: str, get) -> torch.Tensor | None:
    """The float weight of a stored quantized projection (`get(name)` reads a tensor or gives None)."""
    scale = get(f"{prefix}.weight_scale")
    if scale is None:
        return None
    packed = get(f"{prefix}.weight_packed")
    if packed is None:  # int8
        return get(f"{prefix}.weight").float() * scale.float()[:, None]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).float()
    group = q.shape[1] // scale.shape[1]
    w = (q - 8).view(q.shape[0], -1, group) * scale.float()[..., None] + get(f"{prefix}.weight_zero").float()[..., None]
    return w.reshape(q.shape)


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
