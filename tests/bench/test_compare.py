"""`miaotui bench --compare`: the engines load side by side and run in turns, run by run, the order rotating, so
that a host whose speed drifts weighs on every engine alike (real engines: miaotui and transformers on SmolLM2)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_compare_runs_the_engines_in_turns(smollm2_path, monkeypatch):
    from miaotui.bench import main
    from miaotui.bench.engine_bench import BenchConfig, MiaotuiBench
    from miaotui.bench.peers import TransformersBench
    from miaotui.config import EngineConfig

    calls: list[tuple[str, str]] = []
    for cls in (MiaotuiBench, TransformersBench):
        for method in ("decode", "prefill"):
            real = getattr(cls, method)

            def recorded(self, *args, _real=real, _method=method, **kwargs):
                calls.append((self.name.split("-")[0], _method))
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, recorded)
    cfg = BenchConfig(EngineConfig(model=str(smollm2_path), kv_cache_memory=64 * 2**20), decode_tokens=8,
                      prefill_tokens=32, repeats=3, scenarios=("decode", "prefill"))
    results = main(cfg, compare=True, json_path=None, plot_path=None, peers=("transformers",))
    # miaotui alone first (a warm-up and 3 runs a scenario), then both: a warm-up each, then rounds whose order
    # rotates
    m, t = "miaotui", "transformers"
    for method in ("decode", "prefill"):
        mine = [who for who, what in calls if what == method]
        assert mine[4:] == [m, t, m, t, t, m, m, t], (method, mine)
    peer = next(n for n in results if n.startswith("transformers"))
    for name in ("miaotui", peer):
        assert results[name]["decode_tok_s"] > 0 and results[name]["prefill_tok_s"] > 0
        assert results[name]["load_s"] > 0


def test_long_scenario_decodes_after_a_long_prompt(smollm2_path, monkeypatch):
    """`long`: single-stream decode after a prompt of `context_tokens` (every run the same prompt, so each engine
    may reuse its cache), reported in the table under its own label."""
    from miaotui.bench import format_table, main
    from miaotui.bench.engine_bench import BenchConfig, MiaotuiBench
    from miaotui.config import EngineConfig

    prompts: list[int] = []
    real = MiaotuiBench.decode

    def recorded(self, prompt, n, sampled=False):
        prompts.append(len(prompt))
        return real(self, prompt, n, sampled)

    monkeypatch.setattr(MiaotuiBench, "decode", recorded)
    cfg = BenchConfig(EngineConfig(model=str(smollm2_path), kv_cache_memory=64 * 2**20), decode_tokens=6,
                      context_tokens=300, repeats=2, scenarios=("long",))
    results = main(cfg, compare=False, json_path=None, plot_path=None, peers=())
    assert prompts == [300, 300, 300]  # a warm-up, then the runs
    assert results["miaotui"]["long_decode_tok_s"] > 0 and "decode_tok_s" not in results["miaotui"]
    assert "decode, 1 stream after 300 tokens (tok/s)" in format_table(results, cfg)
