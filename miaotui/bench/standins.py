"""Stand-ins for the benchmark models where their files cannot go: a Hugging Face folder with each model's exact
architecture and shapes (so the same bytes per token, the same FLOPs, the same kernels) and random weights.

The GPU machines lent to this project reach no network and take at most 64 MiB of files along, less than any real
model here, so the GPU check (scripts/gpu_check.py) runs on these unless the real files are in the model cache.
Speed on a stand-in is the real model's speed; tokens are not (random weights say nothing about quality), so
correctness there compares miaotui on the GPU with miaotui's CPU path and transformers on the same stand-in.
The tokenizer is a plain word-level vocabulary of the model's size: these runs feed token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

# transformers config fields per alias, from the real models' config.json
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        sliding_window=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        query_pre_attn_scalar=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
                        tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               max_position_embeddings=32768),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               max_position_embeddings=32768),
}


def source(alias: str, folder: str | Path) -> tuple[Path, bool]:
    """The real file when the model cache already holds it, else the stand-in built in `folder`; and whether it is
    real. Never fetches: pip on a machine without a network retries for minutes before it gives up."""
    from miaotui.loader.sources import ALIASES, alias_path

    real = alias_path(ALIASES[alias])
    return (real, True) if real.is_file() else (build_standin(alias, folder), False)


def build_standin(alias: str, folder: str | Path, seed: int = 0, scale: int = 1) -> Path:
    """Write the stand-in of `alias` into `folder` (once: an existing one is kept) and return the folder.
    `scale` > 1 divides the width and depth, for quick checks of the plumbing on a CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    shape = dict(SHAPES[alias])
    if scale > 1:
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            shape[key] = max(1, shape[key] // scale)
        shape["hidden_size"] -= shape["hidden_size"] % (shape["num_attention_heads"] * 2)
        shape["num_hidden_layers"] = max(2, shape["num_hidden_layers"])
        shape["vocab_size"] = 4096
    model_type = shape.pop("model_type")
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    # drawn on the GPU where there is one: transformers' initialisation of a 1.5B model takes a minute on a CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _write_tokenizer(folder, config.vocab_size)
    return folder


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` tokens ("t0" ...), "t0" unknown, "t1" beginning, "t2" end."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                 "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
                 "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))
