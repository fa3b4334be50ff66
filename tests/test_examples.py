"""The examples run as a user runs them, on the default model (Python API) and one through the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str, *args: str, input: str | None = None) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), "--max-tokens", "40", *args], capture_output=True,
                       text=True, timeout=300, input=input, cwd=EXAMPLES, env={**os.environ})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_question_answering(smollm2_path):
    assert "Ming" in run("question_answering.py")


def test_summarize(smollm2_path):
    out = run("summarize.py")
    assert len(out.split()) >= 5 and "library" in out.lower()


def test_translate(smollm2_path):
    out = run("translate.py", "Good morning, my friend.")  # English in, Chinese out (the 135M model is rough)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in out), out


def test_chatbot_keeps_history(smollm2_path):
    out = run("chatbot.py", input="Hello! My name is Ada.\nWhat did I just tell you?\n")
    assert "(2 turns)" in out and out.count("> ") == 2


@pytest.mark.parametrize("example", ["translate.py"])
def test_through_the_server(example, smollm2_path):
    from tests.server.launch import start_server

    proc, base = start_server(smollm2_path, "--served-model-name", "smollm2-135m")
    try:
        assert run(example, "--server", base, "Good morning").strip()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_extract_json_gives_a_valid_record_per_summary(smollm2_path):
    lines = run("extract_json.py", "--count", "2", "--max-tokens", "200").splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)["record"]
        assert set(record) == {"subject", "kind", "year", "country", "keywords"}, record
