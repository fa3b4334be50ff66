"""Configuration dataclasses: one canonical model description for every file format, one engine config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.errors import MiaotuiError


def _check_sizes(cfg: object, sizes: dict[str, int]) -> None:
    """ValueError naming the first of `cfg`'s sizes that is not a whole number from 1 to its bound."""
    for name, most in sizes.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= most:
            raise ValueError(f"{name} is {value!r} (must be a whole number from 1 to {most})")


@dataclass(slots=True)
class ModelConfig:
    """Architecture hyper-parameters, whatever format the model came in (GGUF metadata or config.json)."""

    architecture: str  # registry key: "llama", "qwen2", "gemma3", "gpt2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3: theta of the sliding-window layers
    rope_scaling: dict | None = None  # {"type": "linear", "factor": 8.0} and the like
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None  # Gemma 3: every Nth layer is global
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_embeddings: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its inverse square root
    name: str = ""
    weight_bits: int = 16  # bits per weight of the file's block weights (4 for Q4_0/Q4_1/Q4_K GGUFs)
    quantization: str | None = None  # the method a `miaotui compress --quantize` folder was stored with
    quantization_group: int | None = None  # and its int4 group size
    layer_types: list[str] | None = None  # per layer "sliding_attention" or "full_attention", where explicit

    def check(self) -> None:
        """ValueError naming the first value no real model has: what a corrupt or forged file would make the model
        builder allocate or divide by. The bounds are far above today's largest models."""
        _check_sizes(self, {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
                            "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096,
                            "max_position": 1 << 24})
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not split into {self.num_kv_heads} KV groups")
        for name in ("norm_eps", "rope_theta", "rope_local_theta", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"{name} is {value!r} (must be a finite non-negative number)")
        if self.rope_theta <= 0 or (self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0):
            raise ValueError("rope_theta and query_pre_attn_scalar must be positive")
        for name in ("sliding_window", "sliding_window_pattern"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} is {value!r} (must be a positive whole number)")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers for {self.num_layers}")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` uses the sliding window (Gemma 3 alternates five local, one global)."""
        if self.sliding_window is None:
            return False
        if self.layer_types is not None:  # explicit, e.g. after layers were dropped
            return self.layer_types[layer] == "sliding_attention"
        if self.sliding_window_pattern is None:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0


POOLINGS = ("mean", "cls", "last")  # an encoder's vector: its tokens' mean, the first ([CLS]) or the last token


@dataclass(slots=True)
class EncoderConfig:
    """A bidirectional text encoder for embeddings (BERT, nomic-bert), from config.json or GGUF metadata alike."""

    architecture: str  # "bert" (learned positions, GELU, biases) or "nomic-bert" (rotary, SwiGLU, no biases)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    rope_theta: float = 10000.0
    pooling: str = "mean"  # one of POOLINGS, what sentence-transformers' Pooling module (or the GGUF) says
    normalize: bool = True  # unit-length embeddings, as sentence-transformers' Normalize module and llama.cpp do
    matryoshka: tuple[int, ...] = ()  # truncations the model was trained for (`dimensions`), smallest first
    name: str = ""

    @property
    def rotary(self) -> bool:
        return self.architecture == "nomic-bert"

    def check(self) -> None:
        """ValueError naming the first value no real encoder has (a corrupt or forged file)."""
        _check_sizes(self, {"vocab_size": 1 << 22, "hidden_size": 1 << 15, "intermediate_size": 1 << 17,
                            "num_layers": 256, "num_heads": 256, "max_position": 1 << 20, "type_vocab_size": 1 << 10})
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} does not split into {self.num_heads} heads")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported ({', '.join(POOLINGS)})")


DEFAULT_MODEL = "smollm2-135m"
KV_CACHE_DTYPES = ("auto", "int8")
QUANTIZATIONS = ("none", "int8", "int4", "native", "auto")  # quant/recipe.py says what each means
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MiaotuiError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise MiaotuiError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware has fast bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise MiaotuiError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


SPECULATIVE_METHODS = ("ngram", "suffix", "draft_model")


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's shape (`--speculative-config '{"method": "ngram", ...}'`): a proposer guesses
    up to `num_speculative_tokens` tokens, one forward pass of the model checks them all."""

    method: str = "ngram"  # one of SPECULATIVE_METHODS
    num_speculative_tokens: int = 8  # the most proposed per step (k adapts below it to each request's acceptance)
    # ngram / suffix (and draft_model, before its draft): the longest and the shortest suffix looked up. A match of
    # one token is weak evidence (Qwen2.5-Coder-1.5B's summaries kept 29% of such proposals' first tokens, 64% after
    # two, 93% after three); long ones continue (94% after 8+). Default min: 2, or the max where that is lower.
    prompt_lookup_max: int = 8
    prompt_lookup_min: int | None = None
    model: str | None = None  # draft_model: a model with the same vocabulary
    quantization: str | None = None  # draft_model: its weights' format (one of QUANTIZATIONS; default the model's)
    disable_by_batch_size: int = 4  # no speculation in steps with more running requests than this

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise MiaotuiError(f"unknown speculative method {self.method!r}; use one of "
                               f"{', '.join(SPECULATIVE_METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise MiaotuiError(f"num_speculative_tokens must be from 1 to 16, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min is None:
            self.prompt_lookup_min = min(2, self.prompt_lookup_max)
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 64:
            raise MiaotuiError("need 1 <= prompt_lookup_min <= prompt_lookup_max <= 64, got "
                               f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if (self.method == "draft_model") != (self.model is not None):
            raise MiaotuiError("a draft model is given with method draft_model, and only then")
        if self.quantization is not None and (self.model is None or self.quantization not in QUANTIZATIONS):
            raise MiaotuiError(f"speculative quantization {self.quantization!r}: a draft model's weight format, one "
                               f"of {', '.join(QUANTIZATIONS)}")
        if self.disable_by_batch_size < 1:
            raise MiaotuiError(f"disable_by_batch_size must be at least 1, got {self.disable_by_batch_size}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """From `LLM(speculative={...})` or the CLI's JSON; unknown keys are refused, never dropped."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise MiaotuiError(f"speculative config must be a mapping, got {type(value).__name__}")
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise MiaotuiError(f"unknown speculative config key(s) {', '.join(sorted(unknown))}; known: "
                               f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**value)


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, from CLI flags, `LLM(...)` keywords or the server's options alike."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's context length, capped at 8192
    block_size: int = 16
    kv_cache_memory: float | int | None = None  # bytes (int) or a fraction of free memory (float <= 1)
    enable_prefix_caching: bool = True
    quantization: str = "auto"  # one of QUANTIZATIONS
    group_size: int = 32  # int4 group size along the input dimension
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) or int8 (per-token, per-head scales)
    activation_bits: int = 16  # low-bit products' activations: 16 (two int8 terms, ~15 bits) or 8 (one, faster)
    seed: int = 0
    threads: int | None = None
    chat_template: str | None = None  # a Jinja file or template text in place of the model's own
    speculative: SpeculativeConfig | dict | None = None  # speculative decoding (off by default)
    tensor_parallel_size: int = 1  # processes each holding 1/N of every layer (engine/tensor_parallel.py)
    enforce_eager: bool = False  # no CUDA graphs: every decode step launched op by op (engine/cuda_graphs.py)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise MiaotuiError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise MiaotuiError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise MiaotuiError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; use one of "
                               f"{', '.join(KV_CACHE_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise MiaotuiError(f"unknown quantization {self.quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        if self.activation_bits not in (8, 16):
            raise MiaotuiError(f"activation_bits must be 16 (two int8 terms) or 8 (one), got {self.activation_bits}")
        self.speculative = SpeculativeConfig.parse(self.speculative)
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise MiaotuiError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
