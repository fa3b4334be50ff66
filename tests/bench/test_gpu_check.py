"""The GPU check script, dry-run on the CPU (stand-ins an eighth of the size, short runs): it must not be the first
thing to break when a GPU is finally lent for 15 minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run-cpu", "8", "--models",
                           "qwen2.5-coder-1.5b", "--standins", str(tmp_path / "standins"), "--out", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["models"]["qwen2.5-coder-1.5b"]["weights"].startswith("stand-in")
    bench = result["bench"]["qwen2.5-coder-1.5b"]
    for engine in ("miaotui", "transformers"):
        assert bench[engine]["decode_tok_s"] > 0 and bench[engine]["throughput_tok_s"] > 0, bench
    assert bench["ratio_throughput_tok_s"] > 0 and bench["weight_bytes"] > 0
    profile = bench["profile"]  # where a decode step's time goes, on the targets' model
    assert profile["step_ms_1_rows"] > 0 and profile["step_ms_64_rows"] > 0, profile
    assert "aten::" in profile["profile_10_steps_cpu"]
    assert "targets" in result
