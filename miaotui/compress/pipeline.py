"""`miaotui compress`: load a model in float, prune it and/or store it quantized, write a Hugging Face folder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from miaotui.compress import prune
from miaotui.compress.export import hf_state_dict, save_folder
from miaotui.config import DTYPES, EngineConfig
from miaotui.engine.engine import Engine
from miaotui.errors import MiaotuiError
from miaotui.quant.calibrate import calibration_text
from miaotui.quant.recipe import check

PRUNE_METHODS = ("magnitude", "2:4", "layers")


@dataclass(frozen=True, slots=True)
class CompressOptions:
    prune: str | None = None  # magnitude (with sparsity), 2:4, or layers (with drop_layers)
    sparsity: float | None = None
    drop_layers: int | None = None
    calibration_text: str | None = None  # for layer scores (default: Python's language reference topics)
    calibration_tokens: int = 2048
    quantize: str = "none"  # none, int8 or int4: the block projections stored packed
    group_size: int = 32
    dtype: str = "bfloat16"  # of the float tensors written

    def check(self) -> None:
        if self.prune is not None and self.prune not in PRUNE_METHODS:
            raise MiaotuiError(f"unknown pruning {self.prune!r}; use one of {', '.join(PRUNE_METHODS)}")
        if self.prune == "magnitude" and self.sparsity is None:
            raise MiaotuiError("--prune magnitude needs --sparsity, e.g. 0.3")
        if self.prune == "layers" and not self.drop_layers:
            raise MiaotuiError("--prune layers needs --drop-layers N")
        if self.quantize not in ("none", "int8", "int4"):
            raise MiaotuiError(f"cannot store {self.quantize!r} weights; use none, int8 or int4")
        check(self.quantize, self.group_size)
        if self.dtype not in DTYPES:
            raise MiaotuiError(f"unknown dtype {self.dtype!r}")


@dataclass(slots=True)
class CompressResult:
    path: Path
    bytes: int
    num_layers: int
    seconds: float
    layer_scores: list[float] = field(default_factory=list)  # angular distance of each block (prune layers)
    dropped: list[int] = field(default_factory=list)
    sparsity: float | None = None  # zeros among the block weights afterwards (magnitude, 2:4)


def compress(model: str, output: Path, opts: CompressOptions) -> CompressResult:
    opts.check()
    if output.exists() and any(output.iterdir()):
        raise MiaotuiError(f"{output} exists and is not empty")
    start = time.perf_counter()
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", quantization="none",
                                 kv_cache_memory=64 * 2**20, max_model_len=1024))
    cfg = engine.model_config
    state = hf_state_dict(engine.loaded.model)
    res = CompressResult(output, 0, cfg.num_layers, 0.0)
    if opts.prune == "magnitude":
        prune.magnitude(state, opts.sparsity)
    elif opts.prune == "2:4":
        prune.two_four(state)
    elif opts.prune == "layers":
        if not 0 < opts.drop_layers < cfg.num_layers:
            raise MiaotuiError(f"--drop-layers must be between 1 and {cfg.num_layers - 1}")
        text = opts.calibration_text or calibration_text()
        ids = engine.tokenizer.encode(text)[: opts.calibration_tokens]
        res.layer_scores = prune.layer_scores(engine, ids)
        res.dropped = sorted(sorted(range(len(res.layer_scores)), key=res.layer_scores.__getitem__)[: opts.drop_layers])
        state, cfg = prune.drop_layers(state, cfg, res.dropped)
    if opts.prune in ("magnitude", "2:4"):
        res.sparsity = prune.sparsity(state)
    save_folder(output, state, cfg, engine.tokenizer, DTYPES[opts.dtype], opts.quantize, opts.group_size)
    res.bytes = sum(p.stat().st_size for p in output.iterdir())
    res.num_layers = cfg.num_layers
    res.seconds = time.perf_counter() - start
    return res
