"""Energy per token in `miaotui bench`: RAPL counters read as the kernel lays them out (wrap-around undone,
sub-domains not counted twice), the CPU-time estimate where there is no counter, labelled as one, and the figures
in a real benchmark run's table."""

from __future__ import annotations

import time

from miaotui.bench.energy import WATTS_PER_CORE, EnergyMeter, RaplCounters


def powercap(root, packages: dict[str, tuple[int, int]]):
    """A /sys/class/powercap tree: intel-rapl:N/{name, energy_uj, max_energy_range_uj} plus a core sub-domain."""
    for i, (energy, limit) in packages.items():
        d = root / f"intel-rapl:{i}"
        d.mkdir()
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{limit}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("5\n")
    return root


def test_rapl_packages_summed_and_wraps_undone(tmp_path):
    root = powercap(tmp_path, {"0": (1_000_000, 10_000_000), "1": (9_500_000, 10_000_000)})
    rapl = RaplCounters(root)
    assert len(rapl.domains) == 2  # the core sub-domain is inside package 0's figure
    before = rapl.read()
    (root / "intel-rapl:0" / "energy_uj").write_text("3500000\n")  # +2.5 J
    (root / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped: +1.0 J
    assert abs(rapl.joules(before, rapl.read()) - 3.5) < 1e-9
    meter = EnergyMeter("cpu", root)
    assert meter.method.startswith("measured: RAPL")


def test_unreadable_or_missing_counters_fall_back_to_a_labelled_estimate(tmp_path):
    root = powercap(tmp_path, {"0": (1, 10)})
    (root / "intel-rapl:0" / "energy_uj").write_text("not a number\n")
    meter = EnergyMeter("cpu", root)
    assert meter.method.startswith("estimate:") and f"{WATTS_PER_CORE:g} W per busy core" in meter.method
    token = meter.start()
    end = time.process_time() + 0.3
    while time.process_time() < end:  # one busy core for 0.3 s of CPU time
        pass
    span = meter.stop(token)
    assert 0.3 * WATTS_PER_CORE <= span.joules < 0.6 * WATTS_PER_CORE, span
    assert span.method == meter.method


def test_bench_reports_joules_per_token_with_the_method(smollm2_path, capsys):
    from miaotui.bench import main
    from miaotui.bench.engine_bench import BenchConfig
    from miaotui.config import EngineConfig

    cfg = BenchConfig(EngineConfig(model=str(smollm2_path), kv_cache_memory=64 * 2**20), decode_tokens=8,
                      prefill_tokens=32, num_prompts=2, input_len=8, output_len=4, repeats=1,
                      scenarios=("decode", "sampled", "prefill", "throughput"))
    results = main(cfg, compare=False, json_path=None, plot_path=None)["miaotui"]
    for key in ("decode_j_tok", "prefill_j_tok", "throughput_j_tok", "sampled_tok_s"):
        assert results[key] > 0, key
    out = capsys.readouterr().out
    assert "decode sampled, t 0.8 top-p 0.95 (tok/s)" in out
    assert "energy, decode (J per generated token)" in out and f"energy: {results['energy_method']}" in out
