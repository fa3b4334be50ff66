"""`miaotui bench`: miaotui's figures, and with --compare the peers' on the same file and prompts, in one run:
the engines loaded side by side and run in turns, one run at a time (never at the same time: two engines on two
cores slow each other several-fold)."""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from miaotui.bench.energy import EnergyMeter
from miaotui.bench.engine_bench import SAMPLED, BenchConfig, MiaotuiBench, random_prompts
from miaotui.bench.spec_bench import format_llama_cpp_lookup, format_speculative, run_llama_cpp_lookup, run_speculative
from miaotui.bench.table import markdown_table
from miaotui.config import resolve_dtype
from miaotui.errors import MiaotuiError
from miaotui.kernels import describe


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_turns(benches: dict[str, Any], cfg: BenchConfig, vocab: int, avoid: set[int],
             meter: EnergyMeter) -> dict[str, dict[str, Any]]:
    """The scenarios every engine supports (decode, sampled, prefill, long, throughput), the engines taking turns run by
    run, the order rotating each round, medians per engine. A host's speed drifts: the 2-core development machine's
    memory bandwidth moved between 32 and 50 GB/s within minutes, and one engine's runs all before the other's once
    made a 1.05x decode ratio read 1.46x. Each of decode, prefill and throughput also gets its joules per token over
    its engine's timed runs, from `meter`."""
    names = list(benches)
    res: dict[str, dict[str, Any]] = {n: {} for n in names}

    def turns(key: str, runs: int, run, energy: tuple[str, int] | None = None) -> None:
        """`energy`: where to put the joules per unit, and the units (tokens) a run makes."""
        values: dict[str, list[float]] = {n: [] for n in names}
        joules = dict.fromkeys(names, 0.0)
        for i in range(runs):
            for n in names[i % len(names):] + names[: i % len(names)]:
                span = meter.start()
                values[n].append(run(benches[n], i))
                joules[n] += meter.stop(span).joules
        for n in names:
            res[n][key] = statistics.median(values[n])
            if energy:
                res[n][energy[0]] = joules[n] / (energy[1] * runs)

    decode_prompt = random_prompts(vocab, 1, 32, cfg.seed, avoid)[0]
    if "decode" in cfg.scenarios:
        for b in benches.values():
            b.decode(decode_prompt, 8)  # warm-up
        turns("decode_tok_s", cfg.repeats, lambda b, i: b.decode(decode_prompt, cfg.decode_tokens),
              ("decode_j_tok", cfg.decode_tokens))
    if "sampled" in cfg.scenarios:
        for b in benches.values():
            b.decode(decode_prompt, 8, sampled=True)
        turns("sampled_tok_s", cfg.repeats, lambda b, i: b.decode(decode_prompt, cfg.decode_tokens, sampled=True))
    if "prefill" in cfg.scenarios:
        prompts = random_prompts(vocab, cfg.repeats + 1, cfg.prefill_tokens, cfg.seed + 1, avoid)
        for b in benches.values():
            b.prefill(prompts[-1])
        turns("prefill_tok_s", cfg.repeats, lambda b, i: b.prefill(prompts[i]), ("prefill_j_tok", cfg.prefill_tokens))
    if "long" in cfg.scenarios:  # only the decode is timed (miaotui keeps the prompt's cache; llama.cpp reads it again)
        context = random_prompts(vocab, 1, cfg.context_tokens, cfg.seed + 6, avoid)[0]
        for b in benches.values():
            b.decode(context, 8)
        # (no joules: a run's energy would hold the prompt's pass for an engine that does not keep its cache)
        turns("long_decode_tok_s", cfg.repeats, lambda b, i: b.decode(context, cfg.decode_tokens))
    if "throughput" in cfg.scenarios:
        prompts = random_prompts(vocab, cfg.num_prompts, cfg.input_len, cfg.seed + 2, avoid)
        turns("throughput_tok_s", 1, lambda b, i: b.throughput(prompts, cfg.output_len),
              ("throughput_j_tok", cfg.num_prompts * cfg.output_len))
    return res


def run_engine(bench: MiaotuiBench, cfg: BenchConfig, vocab: int, avoid: set[int],
               meter: EnergyMeter) -> dict[str, Any]:
    """miaotui alone: the shared scenarios (`in_turns`), then its own — `latency` and `prefix` (peers lack
    batching) and `speculative` — and its peak memory."""
    res: dict[str, Any] = {"load_s": bench.load_seconds, **in_turns({"miaotui": bench}, cfg, vocab, avoid,
                                                                      meter)["miaotui"]}
    if "latency" in cfg.scenarios:
        prompts = random_prompts(vocab, cfg.serve_requests, cfg.input_len, cfg.seed + 3, avoid)
        res["latency"] = bench.latency(prompts, cfg.output_len, cfg.concurrency)
    if "prefix" in cfg.scenarios:
        prefix = random_prompts(vocab, 1, 1000, cfg.seed + 4, avoid)[0]
        res["prefix"] = bench.prefix_reuse(prefix, random_prompts(vocab, 2, 16, cfg.seed + 5, avoid))
    if "speculative" in cfg.scenarios:
        res["speculative"] = run_speculative(bench.engine, None, cfg.output_len, cfg.num_prompts, cfg.repeats)
    res["peak_rss_mb"] = _peak_rss_mb()
    return res


METRICS = [("load_s", "load time (s)", False), ("decode_tok_s", "decode, 1 stream (tok/s)", True),
           ("sampled_tok_s", f"decode sampled, t {SAMPLED['temperature']} top-p {SAMPLED['top_p']} (tok/s)", True),
           ("prefill_tok_s", "prefill (tok/s)", True),
           ("long_decode_tok_s", "decode after a long prompt (tok/s)", True),
           ("throughput_tok_s", "batched output (tok/s)", True),
           ("decode_j_tok", "energy, decode (J per generated token)", False),
           ("prefill_j_tok", "energy, prefill (J per prompt token)", False),
           ("throughput_j_tok", "energy, batched (J per generated token)", False)]


def format_table(results: dict[str, dict[str, Any]], cfg: BenchConfig) -> str:
    names = list(results)
    head = ["metric", *names] + [f"miaotui / {n}" for n in names[1:]]
    rows = [head]
    for key, label, higher_better in METRICS:
        if key not in results["miaotui"]:
            continue
        if key == "prefill_tok_s":
            label = f"prefill {cfg.prefill_tokens} tokens (tok/s)"
        if key == "long_decode_tok_s":
            label = f"decode, 1 stream after {cfg.context_tokens} tokens (tok/s)"
        if key == "throughput_tok_s":
            label = f"{cfg.num_prompts} × ({cfg.input_len} in, {cfg.output_len} out) (tok/s)"
        vals = [results[n].get(key) for n in names]
        digits = 3 if key.endswith("_j_tok") else 1
        row = [label] + [f"{v:,.{digits}f}" if v is not None else "-" for v in vals]
        for v in vals[1:]:
            if v and vals[0]:
                ratio = vals[0] / v if higher_better else v / vals[0]
                row.append(f"{ratio:.2f}×")
            else:
                row.append("-")
        rows.append(row)
    lines = markdown_table(rows)
    m = results["miaotui"]
    if "energy_method" in m:
        lines.append(f"energy: {m['energy_method']}")
    if "latency" in m:
        lat = m["latency"]
        lines.append(f"\nmiaotui serving latency, {cfg.serve_requests} requests at concurrency {cfg.concurrency} "
                     f"({cfg.input_len} in, {cfg.output_len} out), ms:")
        for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
            lines.append(f"  {k[:-3]:<5} p50 {lat[k]['p50']:8.1f}  p90 {lat[k]['p90']:8.1f}  p99 {lat[k]['p99']:8.1f}")
    if "prefix" in m:
        p = m["prefix"]
        lines.append(f"prefix reuse (1,000-token shared prefix): TTFT cold {p['cold_ttft_ms']:.0f} ms, "
                     f"warm {p['warm_ttft_ms']:.0f} ms")
    if "speculative" in m:
        lines.append(format_speculative(m["speculative"]))
    if "speculative_llama_cpp" in m:
        lines.append(format_llama_cpp_lookup(m["speculative_llama_cpp"]))
    if "peak_rss_mb" in m:
        lines.append(f"miaotui peak resident memory: {m['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MiaotuiError("--plot needs matplotlib: pip install 'miaotui[bench]'") from None


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label, higher in METRICS if higher and k in results["miaotui"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, (k, label) in zip(axes if len(keys) > 1 else [axes], keys):
        names = [n for n in results if results[n].get(k)]
        ax.bar(names, [results[n][k] for n in names], color=["#c0392b"] + ["#7f8c8d"] * (len(names) - 1))
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(cfg: BenchConfig, compare: bool, json_path: str | None, plot_path: str | None,
         peers: tuple[str, ...] = ("llama.cpp", "transformers")) -> dict[str, Any]:
    from miaotui.bench.peers import LlamaCppBench, TransformersBench

    if plot_path:
        require_matplotlib()  # before a long run, not after it
    mt = MiaotuiBench(cfg)
    vocab = mt.engine.model_config.vocab_size
    avoid = set(mt.engine.tokenizer.stop_ids)
    acts = ", activations rounded to 8 bits" if mt.engine.config.activation_bits == 8 else ""
    setup = (f"{cfg.model}: {str(mt.engine.dtype).removeprefix('torch.')}, {mt.engine.quantization} weights{acts}, "
             f"{mt.engine.device}; {describe(mt.engine.config.activation_bits)}")
    print(f"benchmarking {setup}", file=sys.stderr)
    meter = EnergyMeter(str(mt.engine.device))
    results = {"miaotui": run_engine(mt, cfg, vocab, avoid, meter)}
    results["miaotui"]["setup"] = setup
    results["miaotui"]["energy_method"] = meter.method
    fastest = resolve_dtype("auto", mt.engine.device)  # each peer in its fastest dtype for this hardware
    if compare and "speculative" in cfg.scenarios and "llama.cpp" in peers and LlamaCppBench.available():
        print("benchmarking llama.cpp's prompt lookup", file=sys.stderr)  # its method nearest ours: ngram
        k = results["miaotui"]["speculative"]["k"]
        results["miaotui"]["speculative_llama_cpp"] = run_llama_cpp_lookup(mt.engine, k, cfg.output_len)
    if compare:
        # The peers load beside miaotui (its peak memory is taken above, before they do), and the shared scenarios
        # run again with the engines in turns: the ratios come from runs side by side in time.
        benches: dict[str, Any] = {"miaotui": mt}
        for peer in (LlamaCppBench, TransformersBench):
            if peer.name not in peers:
                continue
            if not peer.available():
                hint = "pip install llama-cpp-python" if peer is LlamaCppBench else "pip install 'miaotui[bench]'"
                print(f"{peer.name}: not installed, skipped ({hint})", file=sys.stderr)
                continue
            print(f"loading {peer.name}", file=sys.stderr)
            bench = peer(cfg, fastest) if peer is TransformersBench else peer(cfg)
            benches[bench.name] = bench
            results[bench.name] = {"load_s": bench.load_seconds}
        if len(benches) > 1:
            print(f"benchmarking {', '.join(benches)} in turns", file=sys.stderr)
            for name, figures in in_turns(benches, cfg, vocab, avoid, meter).items():
                results[name].update(figures)
        del benches
    del mt
    gc.collect()
    print(f"{setup}\n")
    print(format_table(results, cfg))
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2, default=str))
    if plot_path:
        plot(results, plot_path)
    return results
