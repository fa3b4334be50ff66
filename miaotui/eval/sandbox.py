"""Run model-written code apart from the evaluating process: a fresh `python -I` in a temporary directory with an
empty environment, CPU-time, memory and file-size limits, a wall-clock limit, and an audit hook
(PEP 578, which cannot be removed once set) that refuses writes outside that directory, network connections and
new processes. It stops accidents and careless code, as HumanEval's own harness asks for; it is not a boundary
against code written to escape (run untrusted evaluations in a container or VM as well).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Set first in the child, before the program runs: after it, the hook sees every open, socket and spawn.
_GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_DENIED = ("socket.connect", "socket.bind", "socket.sendto", "subprocess.Popen", "os.system", "os.exec",
           "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn", "ctypes.dlopen", "os.kill")
def _inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(_ROOT + os.sep)
    except (TypeError, ValueError):
        return False
def _guard(event, args):
    if event.startswith(_DENIED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        if writing and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.symlink",
                 "os.link", "shutil.rmtree") and args and not _inside(args[0]):
        raise PermissionError(f"sandbox: {event} on {args[0]!r} outside the sandbox")
sys.addaudithook(_guard)
del _guard
'''


@dataclass
class Limits:
    seconds: float = 10.0  # wall clock
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "failed: <last line of stderr>", "timed out"


def _limit(limits: Limits):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()  # its own process group: a timeout kills everything it started

    return apply


def run_python(program: str, limits: Limits | None = None) -> Outcome:
    """Run `program` under the guard and limits; passed when it exits 0."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="miaotui-sandbox-") as tmp:
        Path(tmp, "program.py").write_text(_GUARD + "\n" + program, encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", "program.py"], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=limits.seconds,
                                  preexec_fn=_limit(limits) if os.name == "posix" else None)
        except subprocess.TimeoutExpired:
            return Outcome(False, "timed out")
    if proc.returncode == 0:
        return Outcome(True, "passed")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return Outcome(False, "failed: " + (lines[-1] if lines else f"exit status {proc.returncode}"))
