"""The sandbox that runs model-written code: a passing program passes, a failing one fails with its error, and
it refuses (rather than suffers) writes outside its directory, new processes, connections and endless loops."""

from __future__ import annotations

import os

from miaotui.eval.sandbox import Limits, run_python


def test_passing_and_failing_programs():
    assert run_python("x = sum(range(10))\nassert x == 45\n").passed
    out = run_python("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not out.passed and "AssertionError: arithmetic" in out.reason


def test_writes_inside_its_directory_only(tmp_path):
    target = tmp_path / "escaped.txt"
    inside = run_python("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n")
    assert inside.passed, inside.reason
    out = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert not out.passed and "outside the sandbox" in out.reason and not target.exists()
    victim = tmp_path / "keep.txt"
    victim.write_text("mine")
    out = run_python(f"import os\nos.remove({str(victim)!r})\n")
    assert not out.passed and victim.read_text() == "mine"


def test_no_processes_or_connections():
    for program in ("import os\nos.system('true')\n", "import subprocess\nsubprocess.run(['true'])\n",
                    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"):
        out = run_python(program)
        assert not out.passed and "sandbox:" in out.reason, (program, out)


def test_endless_loops_and_memory_hogs_are_stopped():
    out = run_python("while True:\n    pass\n", Limits(seconds=2, cpu_seconds=5))
    assert out == out.__class__(False, "timed out")
    out = run_python("x = bytearray(4 << 30)\n", Limits(memory_bytes=512 << 20))
    assert not out.passed and "MemoryError" in out.reason


def test_the_environment_is_empty():
    os.environ["MIAOTUI_SANDBOX_SECRET"] = "x"
    try:
        assert run_python("import os\nassert 'MIAOTUI_SANDBOX_SECRET' not in os.environ\n").passed
    finally:
        del os.environ["MIAOTUI_SANDBOX_SECRET"]
