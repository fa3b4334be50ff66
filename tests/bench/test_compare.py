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
