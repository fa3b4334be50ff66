"""The compression table: every compression setting of every model → perplexity (and its change against bf16),
the bytes of its weights, resident memory, single-stream decode tok/s and prefill tok/s.

Each setting is measured in a fresh process, so resident memory is that setting's alone: the process's RSS after
loading and running (freed heap handed back), minus its RSS before loading (the Python and torch runtime, the same
for every row). The KV cache gets the same byte budget in every row. Pruned settings go through `miaotui compress`'s
pipeline into a temporary folder first, exactly as a user's would.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from miaotui.compress.pipeline import CompressOptions, compress

SETTINGS: dict[str, dict] = {
    "bf16": {"quantization": "none"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "int4 + int8 KV": {"quantization": "int4", "kv_cache_dtype": "int8"},
    "auto (default)": {"quantization": "auto"},
    "prune 10%": {"compress": CompressOptions(prune="magnitude", sparsity=0.1)},
    "prune 30%": {"compress": CompressOptions(prune="magnitude", sparsity=0.3)},
    "2:4": {"compress": CompressOptions(prune="2:4")},
    "drop 2 layers": {"compress": CompressOptions(prune="layers", drop_layers=2)},
}
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


def measure(model: str, quantization: str, kv_cache_dtype: str, chunks: int, decode_tokens: int,
            prefill_tokens: int, repeats: int) -> dict:
    """One setting, in this process: perplexity, weights' RSS, decode and prefill tok/s (medians)."""
    import statistics

    import psutil

    from miaotui.bench.engine_bench import BenchConfig, MiaotuiBench
    from miaotui.config import EngineConfig
    from miaotui.engine.engine import trim_heap
    from miaotui.eval.perplexity import default_text, perplexity

    proc = psutil.Process()
    gc.collect()
    base = proc.memory_info().rss
    bench = MiaotuiBench(BenchConfig(EngineConfig(
        model=model, dtype="bfloat16", device="cpu", quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory=64 * 2**20, max_model_len=2048)))
    engine = bench.engine
    ids = engine.tokenizer.encode(default_text())
    ppl, scored = perplexity(engine, ids, 512, "llamacpp", chunks)
    prompt = ids[:prefill_tokens]
    bench.prefill(prompt)  # warm-up
    prefill = statistics.median(bench.prefill(prompt) for _ in range(repeats))
    decode = statistics.median(bench.decode(ids[:32], decode_tokens) for _ in range(repeats))
    del ids, prompt
    gc.collect()
    trim_heap()  # what stays resident, without the freed buffers of the perplexity run (its logits alone ~100 MB)
    return {"ppl": ppl, "tokens": scored, "rss_mb": (proc.memory_info().rss - base) / 2**20,
            "weights_mb": weight_bytes(engine.loaded.model) / 2**20,
            "decode": decode, "prefill": prefill, "quantization": engine.quantization}


def weight_bytes(model) -> int:
    """Bytes of every weight the model holds: float parameters and packed or quantized forms alike."""
    seen: set[int] = set()

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        return sum(size(v) for v in vars(obj).values() if isinstance(v, torch.Tensor) or hasattr(v, "matmul"))

    total = sum(size(p) for p in model.parameters())
    for m in model.modules():
        if getattr(m, "format", None) is not None:
            total += size(m.format)
    return total + size(model.head)


def _child(model: str, quantization: str = "none", kv_cache_dtype: str = "auto", **kw) -> dict:
    args = json.dumps({"model": model, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype, **kw})
    out = subprocess.run([sys.executable, "-m", "miaotui.eval.compression", args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {model} ({quantization}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(models=MODELS, settings=tuple(SETTINGS), chunks: int = 8, decode_tokens: int = 64,
        prefill_tokens: int = 512, repeats: int = 3) -> list[dict]:
    from tqdm import tqdm

    rows = []
    kw = {"chunks": chunks, "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="miaotui-compress-") as tmp, \
            tqdm(total=len(models) * len(settings), desc="compression table", unit="setting") as bar:
        for model in models:
            for name in settings:
                spec = SETTINGS[name]
                bar.set_postfix_str(f"{model} {name}")
                start = time.perf_counter()
                source = model
                if "compress" in spec:
                    label = f"{Path(model).name}-{name}".replace(" ", "_").replace("%", "").replace(":", "-")
                    source = str(Path(tmp) / label)  # inside tmp even when the model is given as a path
                    compress(model, Path(source), spec["compress"])
                res = _child(source, spec.get("quantization", "none"), spec.get("kv_cache_dtype", "auto"), **kw)
                rows.append({"model": model, "setting": name, **res, "seconds": time.perf_counter() - start})
                bar.update()
    return rows


def format_table(rows: list[dict]) -> str:
    base = {r["model"]: r for r in rows if r["setting"] == "bf16"}
    lines = ["| model | setting | perplexity | Δ vs bf16 | weights (MB) | × bf16 | RSS (MB) | × bf16 | decode tok/s "
             "| prefill tok/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r["model"])
        delta = f"{(r['ppl'] / b['ppl'] - 1) * 100:+.2f}%" if b else "—"
        mem = f"{r['weights_mb'] / b['weights_mb']:.2f}" if b else "—"
        rss = f"{r['rss_mb'] / b['rss_mb']:.2f}" if b else "—"
        lines.append(f"| {r['model']} | {r['setting']} | {r['ppl']:.3f} | {delta} | {r['weights_mb']:.0f} | {mem} "
                     f"| {r['rss_mb']:.0f} | {rss} "
                     f"| {r['decode']:.1f} | {r['prefill']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one setting, in a fresh process: JSON on the last line of stdout
    import logging

    logging.getLogger("miaotui").setLevel(logging.WARNING)
    opts = json.loads(sys.argv[1])
    print(json.dumps(measure(**opts)))
