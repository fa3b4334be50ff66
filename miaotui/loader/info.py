"""What `miaotui info` shows: read from headers and metadata only, without loading any weights."""

from __future__ import annotations

import json
from collections import Counter
from math import prod

from miaotui.loader import gguf, safetensors
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import resolve


def describe(name: str) -> dict[str, str]:
    files = resolve(name)
    if files.kind == "gguf":
        f = GGUFFile(files.path)
        cfg = gguf.read_config(f)
        params = sum(prod(t.shape) for t in f.tensors.values())
        types = Counter(t.qtype.name for t in f.tensors.values())
        template = bool(f.get("tokenizer.chat_template"))
        size = files.path.stat().st_size
    else:
        from safetensors import safe_open

        cfg = safetensors.read_config(files.path)
        params, types, size = 0, Counter(), 0
        for path in sorted(files.path.glob("*.safetensors")):
            size += path.stat().st_size
            with safe_open(str(path), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    params += prod(sl.get_shape())
                    types[sl.get_dtype()] += 1
        tc = files.path / "tokenizer_config.json"
        template = (files.path / "chat_template.jinja").is_file() or (
            tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template")))
    return {
        "model": files.name,
        "path": str(files.path),
        "name": cfg.name,
        "architecture": cfg.architecture,
        "parameters": f"{params / 1e6:.1f} M",
        "file size": f"{size / 1e6:.1f} MB",
        "tensor types": ", ".join(f"{k} ×{v}" for k, v in types.most_common()),
        "layers": str(cfg.num_layers),
        "hidden size": str(cfg.hidden_size),
        "heads (q / kv)": f"{cfg.num_heads} / {cfg.num_kv_heads} (head dim {cfg.head_dim})",
        "vocabulary": str(cfg.vocab_size),
        "context length": str(cfg.max_position),
        "sliding window": str(cfg.sliding_window) if cfg.sliding_window else "none",
        "chat template": "yes" if template else "no",
    }
