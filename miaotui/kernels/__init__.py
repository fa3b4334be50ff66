"""miaotui's own CPU kernels (cpu_ops.cpp, qmatmul.cpp), compiled once per machine on first use.

`cpu_ops()` returns the compiled module, or None where it cannot be built (no C++ compiler, MIAOTUI_KERNELS=0):
every caller then keeps its plain-torch path, so the kernels change speed, never results beyond rounding.
The build takes about 40 s here and is cached under ~/.cache/miaotui/kernels (or $MIAOTUI_CACHE/kernels), keyed
by the source, the flags, the torch installation and the host (the flags include -march=native).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "qmatmul.cpp")]
_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for runs serially without it
_module = None
_tried = False


def _build_dir() -> Path:
    """One folder per source, flags, host and torch installation: two virtual environments never rebuild each
    other's kernels in turn (torch's build files name the installation's headers and libraries)."""
    sources = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(sources + " ".join(_FLAGS).encode() + torch.__version__.encode() + torch.__file__.encode()
                         + sys.version.encode() + platform.node().encode()).hexdigest()[:16]
    root = Path(os.environ.get("MIAOTUI_CACHE", Path.home() / ".cache" / "miaotui"))
    path = root / "kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_ops():
    """The compiled kernels, or None (built at most once per process; a failed build warns once)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("MIAOTUI_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir()
        if not (build / "miaotui_cpu_ops.so").exists():
            log.warning("compiling miaotui's CPU kernels (once per machine, under a minute)")
        _module = load(name="miaotui_cpu_ops", sources=[str(p) for p in _SOURCES], extra_cflags=_FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler, no ninja, or a build error: plain torch keeps working
        warnings.warn(f"miaotui's CPU kernels could not be built ({type(e).__name__}: {e}); using plain torch ops",
                      stacklevel=2)
        _module = None
    return _module


def use_cpu_ops(*tensors: torch.Tensor):
    """The kernels when every tensor is on the CPU (and they are built), else None."""
    for t in tensors:  # a plain loop over `is_cpu`: this runs several times per layer per step
        if not t.is_cpu:
            return None
    return _module if _tried else cpu_ops()


def has_vnni() -> bool:
    """Whether the packed low-bit layout (quant/packed.py) has its integer kernel here."""
    ops = cpu_ops()
    return ops is not None and bool(ops.vnni)


def has_amx() -> bool:
    """Whether the AMX tile unit is there: products of 8 rows or more of a packed weight run on it (bf16, the
    weight widened 16 rows at a time), and every product of a bf16 weight kept in tile order (`TiledWeight`)."""
    ops = cpu_ops()
    return ops is not None and bool(ops.amx)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum of a float32 [rows, n] matrix (the first one; NaNs are never chosen by the
    kernel): the sampler's greedy pick, ~10x faster than torch's CPU argmax on a batch of logits."""
    if x.dim() == 2 and x.dtype == torch.float32 and (ops := use_cpu_ops(x)):
        return ops.argmax_rows(x)
    return x.argmax(dim=-1)
