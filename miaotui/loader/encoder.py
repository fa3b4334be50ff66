"""Embedding models: a sentence-transformers / BERT folder (config.json, safetensors, tokenizer.json) or a GGUF
encoder (nomic-bert, bert) → an `Encoder` with its tokenizer and pooling, weights named as the Encoder names them."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as HFTokenizer, processors

from miaotui.config import EncoderConfig
from miaotui.errors import ModelFileError
from miaotui.loader.dequant import dequantize
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import ModelFiles, resolve
from miaotui.models.bert import Encoder
from miaotui.tokenizer import wordpiece_from_gguf

GGUF_ARCHITECTURES = ("nomic-bert", "bert")
HF_TYPES = ("bert",)
# Matryoshka truncations a model was trained for; no file records them, so they are known by the model's name.
_MATRYOSHKA = {"nomic-embed-text-v1.5": (64, 128, 256, 512, 768)}
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp's pooling_type numbers


@dataclass
class LoadedEncoder:
    model: Encoder
    tokenizer: HFTokenizer  # adds [CLS] ... [SEP]; no truncation, no padding
    config: EncoderConfig
    files: ModelFiles
    max_tokens: int  # the longest input the model takes, special tokens included
    load_seconds: float


def is_encoder(files: ModelFiles) -> bool:
    """Whether the files hold an embedding model rather than a language model (read from the metadata only)."""
    if files.kind == "gguf":
        try:
            return GGUFFile(files.path).get("general.architecture") in GGUF_ARCHITECTURES
        except (ModelFileError, OSError, ValueError):
            return False  # the language-model loader reports what is wrong with the file
    try:
        return json.loads((files.path / "config.json").read_text()).get("model_type") in HF_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def load_encoder(source: str | ModelFiles, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> LoadedEncoder:
    start = time.perf_counter()
    files = source if isinstance(source, ModelFiles) else resolve(source)
    if files.kind == "gguf":
        cfg, tokenizer, weights, max_tokens = _read_gguf(files.path)
    else:
        cfg, tokenizer, weights, max_tokens = _read_folder(files.path)
    try:
        cfg.check()
    except ValueError as e:
        raise ModelFileError(f"{files.path}: implausible encoder hyper-parameters: {e}") from None
    with torch.device(device):
        model = Encoder(cfg)
    try:
        model.load(weights)
    except ModelFileError as e:
        raise ModelFileError(f"{files.path}: {e}") from None
    model.to(dtype).eval()
    return LoadedEncoder(model, tokenizer, cfg, files, min(max_tokens, cfg.max_position),
                         time.perf_counter() - start)


def _with_cls_sep(tok: HFTokenizer, cls_id: int, sep_id: int) -> HFTokenizer:
    cls, sep = tok.id_to_token(cls_id), tok.id_to_token(sep_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                                       special_tokens=[(cls, cls_id), (sep, sep_id)])
    return tok


_GGUF_NAMES = {"token_embd": "word", "token_types": "token_type", "position_embd": "position",
               "token_embd_norm": "emb_norm", "attn_qkv": "qkv", "attn_output": "o", "attn_output_norm": "attn_norm",
               "ffn_down": "down", "layer_output_norm": "out_norm"}
_FUSED = {"attn_q": ("qkv", 0), "attn_k": ("qkv", 1), "attn_v": ("qkv", 2), "ffn_gate": ("up", 0), "ffn_up": ("up", 1)}


def encoder_config(files: ModelFiles) -> tuple[EncoderConfig, int]:
    """An encoder's configuration and the most tokens it takes, from its metadata alone (no weights read)."""
    return _gguf_config(GGUFFile(files.path)) if files.kind == "gguf" else _folder_config(files.path)


def _gguf_config(f: GGUFFile) -> tuple[EncoderConfig, int]:
    path, arch = f.path, f.get("general.architecture")

    def key(name: str, default=None):
        value = f.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFileError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    tokens = f.get("tokenizer.ggml.tokens")
    if f.get("tokenizer.ggml.model") != "bert" or not tokens:
        raise ModelFileError(f"{path}: an encoder GGUF needs a BERT (WordPiece) vocabulary")
    name = str(f.get("general.name", path.stem))
    try:
        cfg = EncoderConfig(
            architecture=arch, vocab_size=len(tokens), hidden_size=int(key("embedding_length")),
            intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
            num_heads=int(key("attention.head_count")), max_position=int(key("context_length")),
            type_vocab_size=int(f.tensors["token_types.weight"].shape[0]) if "token_types.weight" in f.tensors else 2,
            norm_eps=float(key("attention.layer_norm_epsilon", 1e-12)), rope_theta=float(key("rope.freq_base", 1e4)),
            pooling=_GGUF_POOLING.get(int(key("pooling_type", 1)), "unsupported"),
            matryoshka=_MATRYOSHKA.get(name, ()), name=name)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad {arch} hyper-parameters in the GGUF metadata ({e})") from None
    return cfg, cfg.max_position


def _read_gguf(path: Path) -> tuple[EncoderConfig, HFTokenizer, dict[str, torch.Tensor], int]:
    f = GGUFFile(path)
    cfg, max_tokens = _gguf_config(f)
    tokens = f.get("tokenizer.ggml.tokens")
    tok = _with_cls_sep(wordpiece_from_gguf(tokens), int(f.get("tokenizer.ggml.bos_token_id", 101)),
                        int(f.get("tokenizer.ggml.seperator_token_id", f.get("tokenizer.ggml.eos_token_id", 102))))
    weights: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for info in f.tensors.values():
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", info.name)
        if m is None:
            continue
        layer, part, kind = m.groups()
        prefix = f"layers.{layer}." if layer is not None else ""
        value = dequantize(f.raw(info.name), info.qtype, info.shape).float()
        if part in _FUSED:
            fused, index = _FUSED[part]
            parts.setdefault(f"{prefix}{fused}.{kind}", {})[index] = value
        elif part in _GGUF_NAMES:
            weights[f"{prefix}{_GGUF_NAMES[part]}.{kind}"] = value
    for name_, pieces in parts.items():
        weights[name_] = torch.cat([pieces[i] for i in sorted(pieces)])
    return cfg, tok, weights, max_tokens


_HF_NAMES = [(r"embeddings\.word_embeddings", "word"), (r"embeddings\.position_embeddings", "position"),
             (r"embeddings\.token_type_embeddings", "token_type"), (r"embeddings\.LayerNorm", "emb_norm"),
             (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layers.\1.o"),
             (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layers.\1.attn_norm"),
             (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layers.\1.up"),
             (r"encoder\.layer\.(\d+)\.output\.dense", r"layers.\1.down"),
             (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"layers.\1.out_norm")]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)")


def _folder_config(folder: Path) -> tuple[EncoderConfig, int]:
    try:
        raw = json.loads((folder / "config.json").read_text())
        cfg = EncoderConfig(
            architecture="bert", vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"], max_position=raw.get("max_position_embeddings", 512),
            type_vocab_size=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
            name=folder.name)
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelFileError(f"{folder}: only BERT with GELU and absolute positions is supported")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{folder / 'config.json'}: cannot read the encoder config ({e})") from None
    return cfg, _sentence_transformers(folder, cfg)


def _read_folder(folder: Path) -> tuple[EncoderConfig, HFTokenizer, dict[str, torch.Tensor], int]:
    cfg, max_tokens = _folder_config(folder)
    try:
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises its own Exception subclass for bad files
        raise ModelFileError(f"{folder / 'tokenizer.json'}: cannot read the tokenizer ({e})") from None
    tok.no_truncation()
    tok.no_padding()
    weights: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    name, _, kind = key.removeprefix("bert.").rpartition(".")
                    if m := _HF_QKV.fullmatch(name):
                        qkv.setdefault(f"layers.{m.group(1)}.qkv.{kind}", {})[m.group(2)] = f.get_tensor(key)
                        continue
                    for pattern, ours in _HF_NAMES:
                        if re.fullmatch(pattern, name):
                            weights[f"{re.sub(pattern, ours, name)}.{kind}"] = f.get_tensor(key).float()
        except (OSError, SafetensorError) as e:
            raise ModelFileError(f"{path}: cannot read safetensors file ({str(e).splitlines()[0][:200]})") from None
    for name, p in qkv.items():
        if set(p) != {"query", "key", "value"}:
            raise ModelFileError(f"{folder}: {name} lacks one of query, key, value")
        weights[name] = torch.cat([p["query"], p["key"], p["value"]]).float()
    return cfg, tok, weights, max_tokens


def _sentence_transformers(folder: Path, cfg: EncoderConfig) -> int:
    """Pooling, normalization and input length from a sentence-transformers folder's module files; a plain BERT
    folder gets mean pooling and unit length."""
    max_tokens = cfg.max_position
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except FileNotFoundError:
        return max_tokens
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{folder / 'modules.json'}: cannot read it ({e})") from None
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    cfg.normalize = "Normalize" in kinds
    if "Pooling" in kinds:
        pooling = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
        modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                 .replace("lasttoken", "last") for k, on in pooling.items() if k.startswith("pooling_mode_") and on]
        cfg.pooling = modes[0] if len(modes) == 1 else "+".join(modes)
    unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise ModelFileError(f"{folder}: sentence-transformers module {sorted(unknown)[0]} is not supported")
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        max_tokens = int(json.loads(st.read_text()).get("max_seq_length") or max_tokens)
    return max_tokens
