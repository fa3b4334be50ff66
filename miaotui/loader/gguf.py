"""GGUF → canonical model config and weights (Hugging Face tensor names, float tensors)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from miaotui.config import ModelConfig
from miaotui.errors import ModelFileError
from miaotui.loader.dequant import FLOAT_TYPES, SUPPORTED_TYPES, block_codes, dequantize
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.tensors import FileTensor, RawBlocks

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# GGUF tensor name → Hugging Face name; {n} is the layer index.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has a norm before *and* after each sub-block; GGUF's ffn_norm is the one before the MLP.
_ARCH_NAMES = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm"}}
_BITS = {"Q4": 4, "Q5": 5, "Q6": 6, "Q8": 8, "Q2": 2, "Q3": 3, "IQ": 4}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m is None:
        return None
    layer, part, kind = m.groups()
    mapped = _ARCH_NAMES.get(arch, {}).get(part) or _NAMES.get(part)
    return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for `llama` GGUFs.

    llama.cpp's converter interleaves each head's rows into (pair, 2) order for its GPT-J-style rope; the
    Hugging Face layout keeps the two rotary halves apart (NEOX style). Our single rope uses the latter.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            f"{f.path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str, default=None):
        return f.get(f"{arch}.{name}", default)

    try:
        hidden = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        n_layers = int(key("block_count"))
        ffn = int(key("feed_forward_length"))
    except TypeError:
        raise ModelFileError(f"{f.path}: GGUF metadata lacks the {arch} hyper-parameters") from None
    try:
        return _config(f, arch, key, hidden, n_heads, n_layers, ffn)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ModelFileError(f"{f.path}: bad {arch} hyper-parameters in the GGUF metadata ({e})") from None


def _config(f: GGUFFile, arch: str, key, hidden: int, n_heads: int, n_layers: int, ffn: int) -> ModelConfig:
    blocks = {int(m.group(1)) for name in f.tensors if (m := _BLOCK.fullmatch(name))}
    if len(blocks) != n_layers or blocks and (min(blocks), max(blocks)) != (0, n_layers - 1):  # not 0..n-1
        raise ValueError(f"block_count is {n_layers} but the file holds blocks {_span(blocks)}")
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // n_heads)))
    vocab = key("vocab_size")
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else f.tensors["token_embd.weight"].shape[0]
    scaling = None
    if key("rope.scaling.type") in ("linear",) and key("rope.scaling.factor"):
        scaling = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position=int(key("context_length", 4096)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        tie_embeddings="output.weight" not in f.tensors,
        name=str(f.get("general.name", Path(f.path).stem)),
    )
    ffn = f.tensors.get("blk.0.ffn_up.weight")
    if ffn is not None:
        cfg.weight_bits = _BITS.get(ffn.qtype.name[:2], 16)
    if arch == "gemma3":
        cfg.sliding_window = int(key("attention.sliding_window", 512))
        cfg.sliding_window_pattern = 6
        cfg.rope_local_theta = 10000.0  # llama.cpp and transformers both fix the local layers' theta
        cfg.query_pre_attn_scalar = float(head_dim)
    return cfg


def _span(blocks: set[int]) -> str:
    return f"{min(blocks)}..{max(blocks)} ({len(blocks)} of them)" if blocks else "none"


def check_tensor_types(f: GGUFFile) -> None:
    for t in f.tensors.values():
        if t.qtype not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise ModelFileError(
                f"{f.path}: tensor {t.name} has type {t.qtype.name}, which miaotui cannot read yet "
                f"(supported: {supported})"
            )


_CODED = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")  # the matrices the low-bit kernels can take


def iter_weights(f: GGUFFile, cfg: ModelConfig) -> Iterator[tuple[str, FileTensor]]:
    """Yield (Hugging Face name, FileTensor) for every tensor: its values dequantized only when read, and for a
    projection, embedding or output head stored as integer blocks, those codes (for the low-bit formats to take
    exactly). Nothing is read here: the recipe reads each tensor in the form it keeps."""
    for info in f.tensors.values():
        name = hf_name(info.name, cfg.architecture)
        if name is None:
            continue  # e.g. rope_freqs, which we derive from the config

        def values(info=info) -> torch.Tensor:
            return dequantize(f.raw(info.name), info.qtype, info.shape)

        def codes(info=info):
            return block_codes(f.raw(info.name), info.qtype, info.shape)

        def blocks(info=info):
            with warnings.catch_warnings():  # the memory map is read-only; the packer only reads it
                warnings.simplefilter("ignore", UserWarning)
                return [RawBlocks(torch.from_numpy(f.raw(info.name)), info.qtype.name, info.shape[0],
                                  source=(f.path, info.name))]

        coded = name.endswith(_CODED)
        t = FileTensor(info.shape, _BITS.get(info.qtype.name[:2], 16), values, codes if coded else None,
                       blocks if coded and info.qtype not in FLOAT_TYPES else None)
        if cfg.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            t = t.map_rows(lambda w, heads=heads: unpermute_rotary(w, heads))
        yield name, t
