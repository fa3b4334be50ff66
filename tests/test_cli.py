"""The `miaotui` command as a user runs it: streamed answers, model info, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def miaotui(*args: str, env: dict | None = None, input: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "miaotui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=input,
                          stdin=subprocess.DEVNULL if input is None else None)  # `run` reads a piped stdin


def assert_clean_error(r, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("miaotui: error:"), r.stderr
    for n in needles:
        assert n in lines[0]


def test_run_streams_an_answer(smollm2_path):
    r = miaotui("run", "What is the capital of France?", "--temperature", "0", "--max-tokens", "24", "-v",
                "--dtype", "float32")  # bf16 and 4-bit arithmetic answer "L'Étoile…" (llama.cpp too)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "KV cache" in r.stderr


def test_run_raw_completion(smollm2_path):
    r = miaotui("run", "--raw", "1, 2, 3, 4,", "-t", "0", "-n", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" 5, 6")


def test_run_reads_piped_text_before_the_prompt(smollm2_path):
    text = "Ada Lovelace wrote the first program in 1843."
    r = miaotui("run", "Who wrote the first program?", "-t", "0", "-n", "16", "--dtype", "float32", input=text)
    assert r.returncode == 0, r.stderr
    assert "Ada Lovelace" in r.stdout
    alone = miaotui("run", "--raw", "-t", "0", "-n", "8", "--dtype", "float32", input="1, 2, 3, 4,\n")
    assert alone.returncode == 0 and alone.stdout.startswith(" 5, 6"), alone.stdout
    assert_clean_error(miaotui("run", "-n", "8"), "give a prompt")


def test_chat_keeps_history_and_resets(smollm2_path):
    script = "My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n/exit\n"
    r = miaotui("chat", "-t", "0", "-n", "20", input=script)
    assert r.returncode == 0, r.stderr
    turns = r.stdout.split("\n> ")
    assert len(turns) == 6 and turns[3] == "(history cleared)\n", r.stdout
    first, second, _, after_reset = (t.strip() for t in turns[1:5])
    assert first and second and after_reset
    assert second != after_reset  # the same question gets another answer once the history is gone


@pytest.mark.parametrize("typed, message", [
    (['"""', "line one", "", "line two", '"""'], "line one\n\nline two"),
    (['"""line one', 'line two"""'], "line one\nline two"),
    (['"""all on one line"""'], "all on one line"), (["plain"], "plain"),
])
def test_chat_reads_a_message_of_several_lines_between_triple_quotes(monkeypatch, typed, message):
    from miaotui.cli import _read_turn

    feed = iter(typed)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed))
    assert _read_turn() == message and next(feed, None) is None


def test_chat_answers_a_pasted_block_once(smollm2_path):
    r = miaotui("chat", "-t", "0", "-n", "8", input='"""\nMy name is Ada.\nWhat is my name?\n"""\n/exit\n')
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split("\n> ")) == 3, r.stdout  # the banner, one answer, the prompt /exit was typed at


def test_info(smollm2_path):
    r = miaotui("info", str(smollm2_path))
    assert r.returncode == 0, r.stderr
    for needle in ("llama", "134.5 M", "Q4_1", "8192", "chat template      yes"):
        assert needle in r.stdout


def test_info_of_embedding_and_code_models():
    from tests.conftest import model_path

    r = miaotui("info", str(model_path("all-minilm-l6-v2").parent))
    assert r.returncode == 0, r.stderr
    for needle in ("bert (embedding model", "22.7 M", "input tokens       256", "pooling            mean, unit length"):
        assert needle in r.stdout
    r = miaotui("info", str(model_path("nomic-embed-text-v1.5")))
    assert r.returncode == 0 and "dimensions         64, 128, 256, 512, 768" in r.stdout, r.stderr
    r = miaotui("info", str(model_path("qwen2.5-coder-0.5b")))
    assert r.returncode == 0 and "fill-in-middle     yes" in r.stdout, r.stderr
    assert "fill-in-middle     no" in miaotui("info", str(model_path("smollm2-135m"))).stdout


def test_list_shows_cached(smollm2_path):
    r = miaotui("list")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout


def test_unknown_alias_lists_known():
    assert_clean_error(miaotui("run", "--model", "nosuchmodel", "hi"), "nosuchmodel", "smollm2-135m", "gemma3-270m")


@pytest.mark.parametrize("command", [["chat", "nosuchmodel"], ["serve", "--port", "0", "nosuchmodel"],
                                     ["bench", "nosuchmodel", "--scenarios", "decode"]])
def test_the_model_may_be_the_first_word(command):
    assert_clean_error(miaotui(*command), "nosuchmodel", "smollm2-135m")


def test_a_model_named_twice_is_refused():
    r = miaotui("serve", "gemma3-270m", "--model", "nosuchmodel")
    assert r.returncode == 2 and "named twice" in r.stderr


def test_missing_file(tmp_path):
    assert_clean_error(miaotui("info", str(tmp_path / "gone.gguf")), "gone.gguf", "no such file")


def test_truncated_file(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(smollm2_path.stat().st_size // 2))
    assert_clean_error(miaotui("run", "--model", str(cut), "hi"), "cut.gguf", "truncated")


def test_garbage_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_clean_error(miaotui("info", str(bad)), "bad.gguf", "not a GGUF file")


def test_bad_sampling_parameter(smollm2_path):
    assert_clean_error(miaotui("run", "hi", "--top-p", "1.5"), "top_p")


def test_unknown_bench_scenario_is_refused_before_loading():
    assert_clean_error(miaotui("bench", "--scenarios", "decode,sampeld"), "unknown scenario 'sampeld'", "sampled")


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--dtype", "float8"]])
def test_bad_engine_flags(args):
    assert_clean_error(miaotui("run", "hi", *args))


@pytest.mark.parametrize("model, parser, needle", [("smollm2-135m", "hermes", "takes no tools"),
                                                   ("qwen2.5-coder-0.5b", "llama3_json", "writes hermes")])
def test_a_tool_call_parser_the_template_does_not_write_is_refused(model, parser, needle):
    r = miaotui("serve", model, "--tool-call-parser", parser, "--port", "1")  # (serve logs its load above)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("miaotui: error: --tool-call-parser") and needle in r.stderr


def test_a_busy_port_a_missing_server_or_a_missing_text_is_a_one_line_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = miaotui("serve", "smollm2-135m", "--port", str(port), timeout=60)
    assert_clean_error(r, f"cannot listen on 127.0.0.1:{port}")
    assert_clean_error(miaotui("loadtest", "--url", f"http://127.0.0.1:{port}"), "no server answers")  # closed now
    assert_clean_error(miaotui("eval", "ppl", "smollm2-135m", "--text", str(tmp_path / "nope.txt")), "nope.txt")
    r = miaotui("serve", "smollm2-135m", "--port", "99999")
    assert r.returncode == 2 and "a TCP port is 0 to 65535" in r.stderr
