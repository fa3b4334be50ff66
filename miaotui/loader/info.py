"""What `miaotui info` shows: read from headers and metadata only, without loading any weights."""

from __future__ import annotations

import json
from collections import Counter
from math import prod

from miaotui.loader import gguf, safetensors
from miaotui.loader.encoder import encoder_config, is_encoder
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import resolve
from miaotui.tokenizer import fim_tokens


def describe(name: str) -> dict[str, str]:
    files = resolve(name)
    if files.kind == "gguf":
        f = GGUFFile(files.path)
        params = sum(prod(t.shape) for t in f.tensors.values())
        types = Counter(t.qtype.name for t in f.tensors.values())
        template = bool(f.get("tokenizer.chat_template"))
        vocab = set(f.get("tokenizer.ggml.tokens") or ())
        size = files.path.stat().st_size
    else:
        from safetensors import safe_open

        params, types, size = 0, Counter(), 0
        for path in sorted(files.path.glob("*.safetensors")):
            size += path.stat().st_size
            with safe_open(str(path), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    params += prod(sl.get_shape())
                    types[sl.get_dtype()] += 1
        tc, tj = files.path / "tokenizer_config.json", files.path / "tokenizer.json"
        template = (files.path / "chat_template.jinja").is_file() or (
            tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template")))
        spec = json.loads(tj.read_text()) if tj.is_file() else {}
        vocab = set(spec.get("model", {}).get("vocab") or ()) | {t["content"] for t in spec.get("added_tokens", ())}
    head = {"model": files.name, "path": str(files.path)}
    sizes = {"parameters": f"{params / 1e6:.1f} M", "file size": f"{size / 1e6:.1f} MB",
             "tensor types": ", ".join(f"{k} ×{v}" for k, v in types.most_common())}
    if is_encoder(files):
        enc, max_tokens = encoder_config(files)
        return {**head, "name": enc.name, "architecture": f"{enc.architecture} (embedding model: /v1/embeddings, "
                "LLM.embed)", **sizes, "layers": str(enc.num_layers), "hidden size": str(enc.hidden_size),
                "heads": str(enc.num_heads), "vocabulary": str(enc.vocab_size), "input tokens": str(max_tokens),
                "pooling": enc.pooling + (", unit length" if enc.normalize else ""),
                "dimensions": ", ".join(map(str, enc.matryoshka)) or str(enc.hidden_size)}
    cfg = gguf.read_config(f) if files.kind == "gguf" else safetensors.read_config(files.path)
    return {
        **head,
        "name": cfg.name,
        "architecture": cfg.architecture,
        **sizes,
        "layers": str(cfg.num_layers),
        "hidden size": str(cfg.hidden_size),
        "heads (q / kv)": f"{cfg.num_heads} / {cfg.num_kv_heads} (head dim {cfg.head_dim})",
        "vocabulary": str(cfg.vocab_size),
        "context length": str(cfg.max_position),
        "sliding window": str(cfg.sliding_window) if cfg.sliding_window else "none",
        "chat template": "yes" if template else "no",
        "fill-in-middle": "yes (completions' suffix)" if fim_tokens(vocab.__contains__) else "no",
    }
