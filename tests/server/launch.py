"""Start a real `miaotui serve` process on a free loopback port and wait until it answers /health."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from miaotui.bench.serve_bench import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *flags: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: an undrained pipe fills and blocks the server
    proc = subprocess.Popen([sys.executable, "-m", "miaotui.cli", "serve", "--model", str(model), "--port",
                             str(port), "--kv-cache-memory", str(32 * 2**20), *flags],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout, log)
    return proc, base


def serving(model, *flags: str, timeout: float = 120) -> Iterator[str]:
    """For a module fixture (`yield from serving(...)`): a server on `--served-model-name m`; it must stop cleanly."""
    proc, url = start_server(model, "--served-model-name", "m", *flags, timeout=timeout)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
