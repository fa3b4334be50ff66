"""The compression table: every compression setting of every model → perplexity, task scores (`eval tasks`) and
their change against the float model, the bytes of its weights, resident memory, single-stream decode and prefill
tok/s, and joules per token — what each compression costs in accuracy and what it saves in time and energy.

Each setting is measured in a fresh process, so resident memory is that setting's alone: the process's RSS after
loading and running (freed heap handed back), minus its RSS before loading (the Python and torch runtime, the same
for every row). The KV cache gets the same byte budget in every row. Pruned settings go through `miaotui compress`'s
pipeline into a temporary folder first, exactly as a user's would. The float row runs in the dtype the engine
picks for this CPU (bf16 where it has bf16 units, fp32 where bf16 is emulated), and so does every other row.
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

from miaotui.bench.table import markdown_table
from miaotui.compress.pipeline import CompressOptions, compress
from miaotui.eval import tasks as task_set

SETTINGS: dict[str, dict] = {
    "float": {"quantization": "none"},  # the reference row: dense weights in the engine's dtype
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
            prefill_tokens: int, repeats: int, tasks: list[str] = (), limit: int = 20) -> dict:
    """One setting, in this process: perplexity, weights' RSS, decode and prefill tok/s (medians) and joules per
    token (all repeats), then each task's score over its first `limit` items."""
    import statistics

    import psutil

    from miaotui.bench.energy import EnergyMeter
    from miaotui.bench.engine_bench import BenchConfig, MiaotuiBench
    from miaotui.config import EngineConfig
    from miaotui.engine.engine import trim_heap
    from miaotui.eval.perplexity import default_text, perplexity
    from miaotui.llm import LLM

    proc = psutil.Process()
    gc.collect()
    base = proc.memory_info().rss
    bench = MiaotuiBench(BenchConfig(EngineConfig(
        model=model, dtype="auto", device="cpu", quantization=quantization, kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory=256 * 2**20, max_model_len=2048)))
    engine = bench.engine
    ids = engine.tokenizer.encode(default_text())
    ppl, scored = perplexity(engine, ids, 512, "llamacpp", chunks)
    prompt = ids[:prefill_tokens]
    bench.prefill(prompt)  # warm-up
    meter = EnergyMeter("cpu")
    span = meter.start()
    prefill = statistics.median(bench.prefill(prompt) for _ in range(repeats))
    prefill_j = meter.stop(span).joules / (repeats * len(prompt))
    span = meter.start()
    decode = statistics.median(bench.decode(ids[:32], decode_tokens) for _ in range(repeats))
    decode_j = meter.stop(span).joules / (repeats * decode_tokens)
    del ids, prompt
    gc.collect()
    trim_heap()  # what stays resident, without the freed buffers of the perplexity run (its logits alone ~100 MB)
    row = {"ppl": ppl, "tokens": scored, "rss_mb": (proc.memory_info().rss - base) / 2**20,
           "weights_mb": weight_bytes(engine.loaded.model) / 2**20, "decode": decode, "prefill": prefill,
           "decode_j": decode_j, "prefill_j": prefill_j, "energy_method": meter.method,
           "quantization": engine.quantization, "dtype": str(engine.dtype).removeprefix("torch.")}
    results = task_set.run(LLM.from_engine(engine), list(tasks), limit, use_tqdm=False) if tasks else []
    row["tasks"] = {r.task: r.score for r in results}
    row["task_items"] = {r.task: r.items for r in results}
    return row


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
        prefill_tokens: int = 512, repeats: int = 3, tasks: list[str] = (), limit: int = 20) -> list[dict]:
    from tqdm import tqdm

    rows = []
    kw = {"chunks": chunks, "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens, "repeats": repeats,
          "tasks": list(tasks), "limit": limit}
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
    """One line per row; each change is against the same model's float row; the energy method under the table."""
    base = {r["model"]: r for r in rows if r["setting"] == "float"}
    names = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    head = ["model", "setting", "perplexity", "Δ vs float", "weights (MB)", "× float", "RSS (MB)", "× float",
            "decode tok/s", "prefill tok/s", "decode J/tok", "prefill J/tok"]
    for t in names:
        head += [t, "Δ"]
    table = [head]
    for r in rows:
        b = base.get(r["model"])
        setting = f"{r['setting']} ({r['dtype']})" if r["setting"] == "float" else r["setting"]
        line = [r["model"], setting, f"{r['ppl']:.3f}", f"{(r['ppl'] / b['ppl'] - 1) * 100:+.2f}%" if b else "—",
                f"{r['weights_mb']:.0f}", f"{r['weights_mb'] / b['weights_mb']:.2f}" if b else "—",
                f"{r['rss_mb']:.0f}", f"{r['rss_mb'] / b['rss_mb']:.2f}" if b else "—",
                f"{r['decode']:.1f}", f"{r['prefill']:.0f}", f"{r['decode_j']:.3f}", f"{r['prefill_j']:.4f}"]
        for t in names:
            score = r.get("tasks", {}).get(t)
            ref = b.get("tasks", {}).get(t) if b else None
            line += [f"{score:.1f}" if score is not None else "—",
                     f"{score - ref:+.1f}" if score is not None and ref is not None else "—"]
        table.append(line)
    lines = markdown_table(table)
    methods = sorted({r["energy_method"] for r in rows})
    lines.append("")
    lines.append("Joules per token: " + "; ".join(methods) + ".")
    if names:
        items = sorted({n for r in rows for n in r.get("task_items", {}).values()})
        lines.append("Tasks (`miaotui eval tasks`): " + ", ".join(
            f"{t} ({task_set.TASKS[t].metric})" for t in names) + f"; first {'/'.join(map(str, items))} items of each, "
            "greedy; Δ in points against the float row.")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against decode speed and against the weights' bytes: one panel pair per accuracy measure (each
    task's score; perplexity when no task was run), one colour per model, each point named by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {}))) or ["perplexity"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for row_axes, name in zip(axes, names):
        for ax, (x, xlabel) in zip(row_axes, (("decode", "decode tok/s (1 stream)"),
                                              ("weights_mb", "weights (MB)"))):
            for m, model in enumerate(models):
                pts = [(r[x], r["ppl"] if name == "perplexity" else r["tasks"].get(name), r["setting"])
                       for r in rows if r["model"] == model]
                pts = [p for p in pts if p[1] is not None]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colours(m), label=Path(model).name)
                for px, py, label in pts:
                    ax.annotate(label, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{name} ({task_set.TASKS[name].metric})" if name in task_set.TASKS else
                          "perplexity (lower is better)")
            if name == "perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":  # one setting, in a fresh process: JSON on the last line of stdout
    import logging

    logging.getLogger("miaotui").setLevel(logging.WARNING)
    opts = json.loads(sys.argv[1])
    print(json.dumps(measure(**opts)))
