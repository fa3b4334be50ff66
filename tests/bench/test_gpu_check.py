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
                           "smollm2-135m", "--standins", str(tmp_path / "standins"), "--out", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["models"]["smollm2-135m"]["weights"].startswith("stand-in")
    bench = result["bench"]["smollm2-135m"]
    for engine in ("miaotui", "transformers"):
        assert bench[engine]["decode_tok_s"] > 0 and bench[engine]["throughput_tok_s"] > 0, bench
    assert bench["ratio_throughput_tok_s"] > 0 and bench["weight_bytes"] > 0
    assert "targets" in result
