"""`miaotui bench --scenarios speculative`: every task's prompts, plain and speculative back to back on one engine,
`--repeats` times, then the batch; the same tokens both ways (SmolLM2, the real texts, a few tokens each)."""

from __future__ import annotations


def test_speculative_scenario_runs_each_prompt_repeats_times_both_ways(smollm2_path, monkeypatch):
    from miaotui.bench import format_table, main, spec_bench
    from miaotui.bench.engine_bench import BenchConfig
    from miaotui.config import EngineConfig

    runs: list[tuple[bool, int]] = []
    real = spec_bench._run

    def recorded(engine, prompts, max_tokens):
        runs.append((engine.speculator is not None, len(prompts)))
        return real(engine, prompts, max_tokens)

    monkeypatch.setattr(spec_bench, "_run", recorded)
    cfg = BenchConfig(EngineConfig(model=str(smollm2_path), kv_cache_memory=64 * 2**20), output_len=12,
                      num_prompts=4, repeats=1, scenarios=("speculative",))
    results = main(cfg, compare=False, json_path=None, plot_path=None, peers=())
    spec = results["miaotui"]["speculative"]
    tasks = ("summarize", "qa", "code_edit", "chat")
    # a warm-up each way, then each task's prompts once each way (--repeats 1), then the batch of 4 once each way
    # (speculating?, prompts at once); the order alternates prompt by prompt within a task
    turns = ([(False, 1), (True, 1)], [(True, 1), (False, 1)])
    one_task = [run for u in range(spec_bench.PER_TASK) for run in turns[u % 2]]
    assert runs == [(False, 1), (True, 1), *one_task * len(tasks), (False, 4), (True, 4)]
    for task in (*tasks, "batch of 4"):
        assert spec[task]["same_tokens"] and spec[task]["plain_tok_s"] > 0 and spec[task]["speculative_tok_s"] > 0
    assert spec["qa"]["acceptance"] > 0.5  # the answer copies a sentence of the passage
    assert "speculative decoding (ngram" in format_table(results, cfg)
