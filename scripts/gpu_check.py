"""The GPU check: one run on a bare CUDA machine (torch there, no network), in under 8 minutes, one JSON report.

    python3 scripts/gpu_check.py --out report.json            # from the repository root
    (with the device tool: carry `.whl` holding the gguf wheel, see --help's epilog)

1. The machine: GPU, torch, which low-bit CUDA kernels this torch has, the measured device-to-device copy
   bandwidth (the decode roof).
2. The models: the real files where the model cache has them, else same-shape stand-ins with random weights
   (miaotui/bench/standins.py: the GPU machines cannot fetch or carry the real files).
3. The CUDA-marked tests (tests/gpu): greedy tokens against miaotui's CPU fp32 path, bf16 logits, CUDA graphs and
   FlexAttention against the eager and SDPA paths, int8/int4 products.
4. The benchmark, miaotui against transformers on the same GPU and weights, bf16: decode of one stream, a 512-token
   prefill, and 64 concurrent requests × (128 in, 256 out), with NVML joules per token; for Qwen2.5-Coder-1.5B
   also the share of the bandwidth roof that batch-1 decode reaches (weights' bytes × tokens/s / copy bandwidth),
   and where a decode step's time goes (a captured step replayed alone against an engine step; the profiler's top
   kernels and host operations).
Targets (issue 21): decode ≥ 60% of the roof on the 1.5B model; batched ≥ 3× transformers' batched generate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
ROOF_MODEL = "qwen2.5-coder-1.5b"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    import torch

    from miaotui.quant.recipe import CUDA_KERNELS, cuda_kernel

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    # The decode roof: a device-to-device copy of 4 GiB, bytes read plus written per second (median of 5).
    src = torch.empty(2**30, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    copy = sorted(times[1:])[2]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "cuda_kernels": {m: cuda_kernel(m) for m in CUDA_KERNELS},
            "copy_bandwidth_gb_s": round(2 * 4 * 2**30 / copy / 1e9, 1)}


def models(standins: Path, names: list[str], scale: int = 1) -> dict[str, dict]:
    from miaotui.bench.standins import build_standin, source

    out = {}
    for alias in names:
        start = time.perf_counter()
        if scale > 1:  # a scaled-down dry run
            path, real = build_standin(alias, standins / f"{alias}-{scale}", scale=scale), False
        else:  # the tests look in the same folder
            path, real = source(alias, standins / alias)
        out[alias] = {"path": str(path), "weights": "real" if real else "stand-in (same shapes, random)",
                      "build_s": round(time.perf_counter() - start, 1)}
        log(f"{alias}: {out[alias]['weights']}")
    return out


def tests(standins: Path, report_dir: Path, limit_s: float) -> dict:
    """The CUDA-marked tests in a child process, its output in gpu_tests.log beside the report; stopped after
    `limit_s` seconds (each test after half of that, where pytest-timeout is installed) so that a hang cannot eat
    the lease and the benchmark still runs."""
    import importlib.util

    junit, log_path = report_dir / "gpu_tests.xml", report_dir / "gpu_tests.log"
    env = dict(os.environ, MIAOTUI_STANDINS=str(standins), PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "pytest", "-v", "--durations=0", "-m", "cuda", "tests/gpu", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={int(limit_s / 2)}")
    start = time.perf_counter()
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = "timed out"
    tail = log_path.read_text(errors="replace")[-6000:]
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line and ("passed" in line or
                                                                                       "failed" in line)), "")
    return {"returncode": returncode, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": tail}


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every matrix once (the output head included), as stored."""
    from miaotui.layers.linear import Linear

    formats = [m.format for m in model.modules() if isinstance(m, Linear)]
    total = sum(f.nbytes for f in formats)
    if not any(model.head is f for f in formats):
        total += model.head.nbytes
    return total


def profile_decode(mt, vocab: int, avoid: set[int], device: str) -> dict:
    """Where a decode step's time goes: one captured step replayed alone (its GPU time, for 1, 8 and 64 rows)
    against an engine step's wall time, and the profiler's top kernels and host operations over a few steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from miaotui import SamplingParams
    from miaotui.bench import random_prompts

    engine = mt.engine
    out: dict = {}
    graphs = engine.runner.graphs
    if graphs is not None:
        replay_ms = {}
        for size in (1, 8, 64):
            if size not in graphs.graphs:
                continue
            graph = graphs.graphs[size]
            run = (lambda g=graph: g.replay()) if graph is not None else (lambda s=size: graphs._step(s))
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                run()
            if device == "cuda":
                torch.cuda.synchronize()
            replay_ms[size] = round((time.perf_counter() - start) / 20 * 1e3, 3)
        out["graph_replay_ms"] = replay_ms
        engine.kv.reset_prefix_cache()  # the replays wrote keys into the last step's slots: reuse none of them
    prompt = random_prompts(vocab, 1, 32, 7, avoid)[0]
    for rows in (1, 64):
        steps = []
        for _ in range(rows):
            engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        out[f"step_ms_{rows}_rows"] = round(statistics.median(steps[2:]) * 1e3, 3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    engine.add_request(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for _ in range(4):  # past the prompt
        engine.step()
    with profile(activities=activities) as prof:
        for _ in range(10):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    keys = prof.key_averages()
    out["profile_10_steps_cpu"] = keys.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    if device == "cuda":
        out["profile_10_steps_cuda"] = keys.table(sort_by="self_cuda_time_total", row_limit=15,
                                                  max_name_column_width=60)
    return out


def bench(alias: str, path: str, roof_gb_s: float | None, quick: bool, device: str = "cuda",
          profile: bool = False) -> dict:
    import torch

    from miaotui.bench import run_engine
    from miaotui.bench.energy import EnergyMeter
    from miaotui.bench.engine_bench import BenchConfig, MiaotuiBench
    from miaotui.bench.peers import TransformersBench
    from miaotui.config import EngineConfig

    dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = BenchConfig(engine=EngineConfig(model=path, device=device, dtype=dtype, quantization="none",
                                          max_num_seqs=64, max_num_batched_tokens=8192),
                      decode_tokens=16 if quick else 128, prefill_tokens=64 if quick else 512,
                      num_prompts=8 if quick else 64, input_len=16 if quick else 128, output_len=16 if quick else 256,
                      repeats=1 if quick else 3, scenarios=("decode", "prefill", "throughput"))
    meter = EnergyMeter(device)
    start = time.perf_counter()
    mt = MiaotuiBench(cfg)
    engine = mt.engine
    res: dict = {"energy_method": meter.method}
    graphs = engine.runner.graphs
    res["graphs"] = None if graphs is None else {"sizes": len(graphs.sizes), "largest": graphs.sizes[-1]}
    res["attention"] = engine.runner.backend.name
    vocab, avoid = engine.model_config.vocab_size, set(engine.tokenizer.stop_ids)
    res["miaotui"] = run_engine(mt, cfg, vocab, avoid, meter)
    res["miaotui"]["setup_s"] = round(time.perf_counter() - start, 1)
    if graphs is not None:
        res["graphs"]["replays"] = graphs.replays
    if profile:
        try:
            res["profile"] = profile_decode(mt, vocab, avoid, device)
        except Exception as e:  # noqa: BLE001 - a diagnosis that fails must not cost the figures
            res["profile"] = {"error": f"{type(e).__name__}: {e}"}
    nbytes = weight_bytes(engine.loaded.model)
    res["weight_bytes"] = nbytes
    if roof_gb_s:
        res["decode_share_of_roof"] = round(res["miaotui"]["decode_tok_s"] * nbytes / (roof_gb_s * 1e9), 3)
    del mt, engine, graphs  # the graphs hold the runner, and with it the KV cache
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        tf = TransformersBench(cfg, getattr(torch, dtype))
        res["transformers"] = run_engine(tf, cfg, vocab, avoid, meter)
        del tf
    except Exception as e:  # noqa: BLE001 - the peer's failure is reported, the check goes on
        res["transformers"] = {"error": f"{type(e).__name__}: {e}"}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for key in ("decode_tok_s", "prefill_tok_s", "throughput_tok_s"):
        peer = res["transformers"].get(key)
        if peer:
            res[f"ratio_{key}"] = round(res["miaotui"][key] / peer, 2)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="With the device tool, from a machine with pip: `echo /.whl/ >> "
                                ".git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: "
                                "--python-version 3.12 -d .whl gguf==0.19.0`; then run with carry ['.whl'] and "
                                "`pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
                                "PYTHONPATH=/tmp/site python3 scripts/gpu_check.py --out $OUT/gpu_report.json`.")
    p.add_argument("--out", default="gpu_report.json", help="where the JSON report goes")
    p.add_argument("--standins", default="/tmp/miaotui-standins", help="where stand-in models are built")
    p.add_argument("--quick", action="store_true", help="shorter batched outputs (64 tokens), for a second try")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--tests-limit", type=float, default=240, help="seconds the CUDA tests may take in all")
    p.add_argument("--budget", type=float, default=480,
                   help="seconds after which no further model is benchmarked (the 1.5B model goes first)")
    p.add_argument("--models", default=",".join(BENCH_MODELS), help="which models to benchmark")
    p.add_argument("--dry-run-cpu", type=int, default=0, metavar="SCALE",
                   help="check this script on a CPU: stand-ins 1/SCALE wide and deep, short runs, no tests")
    args = p.parse_args()
    names = args.models.split(",")

    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node()}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2, default=str))

    dry = args.dry_run_cpu > 0
    if not torch.cuda.is_available() and not dry:
        report["error"] = "no CUDA device"
        save()
        log("no CUDA device: nothing to check")
        return 2
    begin = time.perf_counter()
    report["machine"] = {"cpu dry run": True} if dry else machine()
    log(f"machine: {report['machine']}")
    standins = Path(args.standins)
    report["models"] = models(standins, names, max(1, args.dry_run_cpu))
    save()
    if not args.skip_tests and not dry:
        log("CUDA tests")
        report["tests"] = tests(standins, out.parent, args.tests_limit)
        log(f"tests: {report['tests']['summary']} ({report['tests']['seconds']} s)")
        save()
    report["bench"] = {}
    for alias in sorted(names, key=lambda a: a != ROOF_MODEL):  # the targets' model first
        if time.perf_counter() - begin > args.budget:
            report["bench"][alias] = {"skipped": f"past the --budget of {args.budget:.0f} s"}
            continue
        log(f"bench {alias}")
        try:
            report["bench"][alias] = bench(alias, report["models"][alias]["path"],
                                           report["machine"].get("copy_bandwidth_gb_s"), args.quick or dry,
                                           "cpu" if dry else "cuda", profile=alias == ROOF_MODEL)
        except Exception as e:  # noqa: BLE001 - one model's failure is reported, the others still run
            report["bench"][alias] = {"error": f"{type(e).__name__}: {e}"}
        # a failure's traceback held the engine and its KV cache until here: free them for the next model
        gc.collect()
        if not dry:
            torch.cuda.empty_cache()
        log(f"{alias}: {json.dumps(report['bench'][alias], default=str)[:600]}")
        save()
    roof = report["bench"].get(ROOF_MODEL, {})
    report["targets"] = {
        "decode_share_of_roof_1.5b (>= 0.60)": roof.get("decode_share_of_roof"),
        "batched_vs_transformers_1.5b (>= 3.0)": roof.get("ratio_throughput_tok_s"),
        "tests_passed": report.get("tests", {}).get("returncode") == 0,
    }
    report["seconds"] = round(time.perf_counter() - begin, 1)
    save()
    log(f"targets: {report['targets']}; {report['seconds']} s; report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
