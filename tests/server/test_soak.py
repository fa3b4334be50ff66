"""A 1-minute soak of a real server under a mixed workload with injected faults and a SIGTERM restart
(`miaotui loadtest --soak`): nothing lost, no KV block leaked, memory flat, the engine loop alive."""

from __future__ import annotations

from miaotui.bench.soak import SoakConfig, run_soak


def test_one_minute_soak_with_faults(smollm2_path):
    # fp32: in bf16 on a CPU with bf16 units, oneDNN's state per product shape (bounded, dense.onednn_rows) still
    # arrives in steps for minutes, longer than a 1-minute soak can wait out; fp32 runs on the codes (+2.7% here).
    report = run_soak(SoakConfig(minutes=1, model=str(smollm2_path), concurrency=32, dtype="float32"))
    print(report.summary())
    assert not report.lost, report.lost[:5]
    assert report.counts["completed"] > 0 and report.counts["fault_seen"] > 0 and report.restarts == 1
    assert report.counts["fault_completed"] == 0
    assert report.kv_usage_end == 0 and report.running_end == 0
    assert report.rss_drift <= 0.05 and report.loop_alive  # growth would be a leak; a CI run once saw -8.5%
    assert report.ok
