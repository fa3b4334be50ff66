"""miaotui's own CPU kernels (ops.cpp, qmatmul.cpp, stack.cpp), compiled once per machine and CPU class on first use.

One build per CPU class, from the same sources with that class's compiler flags (vec.h and qmatmul.cpp pick their
code from them): `generic` (portable C++, any CPU, ARM included), `avx2` (+ FMA, F16C), `avx512` (+ BW, VL, DQ,
VNNI) and `amx` (+ the AMX tile unit). The CPU's best class runs; `MIAOTUI_ISA=generic|avx2|avx512|amx` forces a
lower one (so every class the host can execute is testable on it), `MIAOTUI_KERNELS=0` none at all. `cpu_ops()`
returns the built module, or None where it cannot be built (no C++ compiler): every caller then keeps its
plain-torch path, so the kernels change speed, never results beyond rounding.

A build takes about half a minute on 2 cores and is cached under $MIAOTUI_HOME/kernels (default
~/.cache/miaotui/kernels, beside the models), keyed by the sources, the flags, the torch installation, the Python and
the host.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from miaotui.errors import MiaotuiError

log = logging.getLogger(__name__)

ISAS = ("generic", "avx2", "avx512", "amx")  # lowest to highest
_X86 = platform.machine() in ("x86_64", "AMD64")
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"]
FLAGS = {  # what each class's build may use; -fopenmp: at::parallel_for runs serially without it
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": _AVX512,
    "amx": _AVX512 + ["-mavx512bf16", "-mavx512vbmi", "-mamx-tile", "-mamx-bf16"],
}
_REQUIRES = {  # /proc/cpuinfo flags each class needs
    "generic": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"},
    "amx": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile",
            "amx_bf16"},
}
_SOURCES = [Path(__file__).with_name(n) for n in ("ops.cpp", "qmatmul.cpp", "attention.cpp", "stack.cpp",
                                                         "bindings.cpp")]
_HEADERS = [Path(__file__).with_name(n) for n in ("ops.h", "stack.h", "vec.h", "dp.h")]
_modules: dict[str, object | None] = {}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


@functools.cache
def cpu_model() -> str:
    """The processor as /proc/cpuinfo names it, with its family and model numbers on x86: a cloud VM's name ("AMD
    EPYC") hides the generation, the numbers do not (AMD family 25 is Zen 3 / Zen 4, 26 Zen 5), and a speed figure
    is only worth as much as the machine it names."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (x86 family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_isas() -> list[str]:
    """The classes this CPU can run, lowest first (only `generic` off x86)."""
    if not _X86:
        return ["generic"]
    flags = _cpu_flags()
    return [isa for isa in ISAS if _REQUIRES[isa] <= flags]


def isa() -> str:
    """The class the kernels run as: the CPU's best, or a lower one MIAOTUI_ISA asks for."""
    runnable = cpu_isas()
    forced = os.environ.get("MIAOTUI_ISA")
    if not forced:
        return runnable[-1]
    if forced not in ISAS:
        raise MiaotuiError(f"MIAOTUI_ISA={forced!r} is not a CPU class; use one of {', '.join(ISAS)}")
    if forced not in runnable:
        raise MiaotuiError(f"MIAOTUI_ISA={forced} asks for a class this CPU cannot run (it runs {', '.join(runnable)})")
    return forced


def _build_dir(name: str, flags: list[str]) -> Path:
    """One folder per source, flags, host and torch build (its version and commit, not its path): a new virtual
    environment with the same torch imports the kernels another one built instead of compiling them again (a
    built module binds to the torch the process has already loaded)."""
    sources = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    build = f"{torch.__version__} {torch.version.git_version} {sys.version} {platform.node()}"
    key = hashlib.sha256(sources + " ".join(flags).encode() + build.encode()).hexdigest()[:16]
    root = Path(os.environ.get("MIAOTUI_HOME", Path.home() / ".cache" / "miaotui"))
    path = root / "kernels" / f"{name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(cls: str):
    """The kernels built for class `cls` (once per process; a failed build warns once and gives None)."""
    if cls in _modules:
        return _modules[cls]
    _modules[cls] = None
    if os.environ.get("MIAOTUI_KERNELS", "1") == "0":
        return None
    name = f"miaotui_kernels_{cls}"
    flags = ["-O3", "-fopenmp", *FLAGS[cls]]
    try:
        folder = _build_dir(name, flags)
        built = folder / f"{name}.so"
        if built.exists():  # the folder's key names its sources and flags: import it as it is
            try:
                _modules[cls] = _import(name, built)
                return _modules[cls]
            except ImportError:  # a build cut short: let torch build it again
                pass
        from torch.utils.cpp_extension import load as build  # (imports setuptools: ~0.2 s a process)

        if not built.exists():
            log.warning("compiling miaotui's %s CPU kernels (once per machine, about half a minute)", cls)
        _modules[cls] = build(name=name, sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as e:  # no compiler, no ninja, or a build error: plain torch keeps working
        warnings.warn(f"miaotui's {cls} CPU kernels could not be built ({type(e).__name__}: {e}); using plain "
                      "torch ops", stacklevel=2)
    return _modules[cls]


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_default: list = []


def cpu_ops():
    """The kernels of the class this process runs as, or None."""
    if not _default:
        _default.append(None if os.environ.get("MIAOTUI_KERNELS", "1") == "0" else load(isa()))
    return _default[0]


def use_cpu_ops(*tensors: torch.Tensor):
    """The kernels when every tensor is on the CPU (and they are built), else None."""
    for t in tensors:  # a plain loop over `is_cpu`: this runs several times per layer per step
        if not t.is_cpu:
            return None
    return _default[0] if _default else cpu_ops()


def has_packed() -> bool:
    """Whether the packed low-bit layout (quant/packed.py) has miaotui's integer kernel here."""
    return cpu_ops() is not None


@contextlib.contextmanager
def row_exact(on: bool = True) -> Iterator[None]:
    """Within it (this thread), products of packed codes take a lone row's arithmetic at any row count: the integer
    kernel, never AMX tiles, a dense copy or a prompt-sized float product. The runner sets it for steps that score
    speculative proposals, so their rows give the logits plain one-row decode steps give (in bf16 too)."""
    ops = cpu_ops() if on else None
    if ops is None:
        yield
        return
    before = ops.set_row_exact(True)
    try:
        yield
    finally:
        ops.set_row_exact(before)


def has_amx() -> bool:
    """Whether the AMX tile unit is there: products of 8 bf16 rows or more of a packed weight run on it (the
    weight widened 16 rows at a time), and every product of a bf16 weight kept in tile order (`TiledWeight`)."""
    ops = cpu_ops()
    return ops is not None and bool(ops.amx)


def describe(activation_bits: int = 16) -> str:
    """The CPU class and the kernel path this process runs, for logs and benchmarks (at 8-bit activations prompts
    stay on the integer kernel where, at 16, a CPU with bf16 units and no tiles takes its `vdpbf16ps` product and
    an AVX-512 CPU without them miaotui's fp32 FMA kernel for groups other than 32; without VNNI prompts are
    multiplied in fp32: that kernel on AVX2, except 4-bit codes at 8 bits, and torch's GEMM in the portable
    build)."""
    ops = cpu_ops()
    if ops is None:
        return f"{isa() if _X86 else 'generic'} CPU, plain torch (miaotui's kernels off); {cpu_model()}"
    if ops.amx:
        extra = ", AMX tiles"
    elif ops.bf16_gemm and activation_bits == 16:
        extra = ", bf16 GEMM for prefill"
    elif ops.fp32_rows(8, act_bits=activation_bits):  # the build's own rule, asked for 8-bit codes and 4-bit ones
        how = "torch's fp32 GEMM" if ops.qmatmul_path == "generic" else "fp32 FMA"
        extra = f", {how} for prefill" + ("" if ops.fp32_rows(4, act_bits=activation_bits) else " of 6/8-bit codes")
    else:
        extra = ""
    return f"{isa()} kernels (integer products: {ops.qmatmul_path}{extra}); {cpu_model()}"


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum of a float32 [rows, n] matrix (the first one; NaNs are never chosen by the
    kernel): the sampler's greedy pick, ~10x faster than torch's CPU argmax on a batch of logits."""
    if x.dim() == 2 and x.dtype == torch.float32 and (ops := use_cpu_ops(x)):
        return ops.argmax_rows(x)
    return x.argmax(dim=-1)


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values and their ids, largest first, of a float32 [rows, n] matrix (equal values in id
    order): the sampler's top-k / top-p candidates, 4-13x faster than torch's CPU topk for the 64 best of a
    vocabulary (3.6x for 32 rows). The kernel prunes by the maxima of blocks of 4 vectors, so a k of more than one
    per block (where that prunes nothing and torch's sort is faster) goes to torch.topk."""
    ops = use_cpu_ops(x) if x.dim() == 2 and x.dtype == torch.float32 else None
    if ops is not None and k <= x.shape[1] // (4 * ops.vector_width):
        return ops.topk_rows(x, k)
    return x.topk(k, dim=-1)
