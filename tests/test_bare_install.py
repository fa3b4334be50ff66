"""Every CLI command on the README's install (`pip install -e .`, no extras): `--help` works for each, and the
commands a user runs first work, or say in one line which extra to install — never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from miaotui.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(sub.choices)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A fresh virtual environment with torch's CPU wheel and miaotui alone (pip's cache makes it quick)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    for args in ([f"torch=={torch_version}"], ["-e", str(ROOT)]):
        r = subprocess.run(pip + args, capture_output=True, text=True)
        if r.returncode != 0:
            if "Could not find a version" in r.stderr or "connection" in r.stderr.lower():
                pytest.skip(f"the package index is unreachable: {r.stderr[-300:]}")
            pytest.fail(r.stderr[-2000:])
    return venv / "bin" / "miaotui"


def run(bare: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bare), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # `run` would read a piped stdin


def test_no_extras_are_installed(bare):
    r = subprocess.run([str(bare.parent / "python"), "-c", "import transformers"], capture_output=True)
    assert r.returncode != 0


@pytest.mark.parametrize("command", subcommands())
def test_help_of_every_command(bare, command):
    r = run(bare, command, "--help")
    assert r.returncode == 0 and "usage: miaotui" in r.stdout, r.stderr


def test_first_commands_work(bare, smollm2_path):
    assert run(bare, "list").returncode == 0
    r = run(bare, "info", str(smollm2_path))
    assert r.returncode == 0 and "llama" in r.stdout.lower(), r.stderr
    r = run(bare, "run", "-m", str(smollm2_path), "--max-tokens", "4", "Hello")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_loadtest_and_peers_fail_in_one_line(bare, smollm2_path):
    r = run(bare, "loadtest", "--url", "http://127.0.0.1:9", "--requests", "1", "--concurrency", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    r = run(bare, "bench", "-m", str(smollm2_path), "--compare", "--peers", "transformers", "--scenarios", "decode",
            "--decode-tokens", "4", "--repeats", "1")
    assert "Traceback" not in r.stderr, r.stderr
    assert "pip install" in r.stdout + r.stderr
    r = run(bare, "eval", "tasks", "-m", str(smollm2_path), "--tasks", "translate-zh-en", "--limit", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'miaotui[eval]'" in r.stderr, r.stderr
