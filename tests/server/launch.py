"""Start a real `miaotui serve` process on a free loopback port and wait until it answers /health."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *flags: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "miaotui.cli", "serve", "--model", str(model), "--port",
                             str(port), "--kv-cache-memory", str(32 * 2**20), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, timeout)
    return proc, base


def wait_healthy(proc: subprocess.Popen, base: str, seconds: float = 120) -> None:
    """Until /health answers 200; kills the process and raises if it exits or takes too long."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.terminate()  # SIGTERM first: a server starting replicas stops its Ray processes too
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    raise RuntimeError("miaotui serve did not start")


def serving(model, *flags: str, timeout: float = 120) -> Iterator[str]:
    """For a module fixture (`yield from serving(...)`): a server on `--served-model-name m`; it must stop cleanly."""
    proc, url = start_server(model, "--served-model-name", "m", *flags, timeout=timeout)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
