"""Packed weights kept on disk: a GGUF file's blocks repacked into the kernels' layout once, read back on later loads.

Repacking is the largest part of a big model's load that is miaotui's own work, and reading its result back from the
OS page cache is a copy into the kernels' 2 MB pages (Qwen2.5-Coder-1.5B Q4_K_M, fresh processes alternated on an
Ice Lake Xeon: 1.70-1.81 s a load packing, 1.27-1.45 s reading back, llama.cpp 0.87-0.90 s; the rest is the GGUF's
vocabulary and the tokenizer built from it). The copy is kept, not mapped: weights streamed from 4 KB page-cache
pages decode ~7% slower (kernels/pages.py). Entries are safetensors files (any safetensors reader opens them) under
$MIAOTUI_HOME/packed/<file>-<key>/, one per packed matrix, keyed by the source file (path, size, modification
time) and the kernel build and Python that packed it (their sources and flags), so an edited file or a changed
packer packs afresh. Only files of `MIN_FILE_BYTES` or more are kept (smaller ones pack in a blink); a new folder
replaces those of older versions of its file and all but one other build's, and the least recently used go beyond
`MAX_BYTES`. `MIAOTUI_PACK_CACHE=0` turns it off. A cache that cannot be written (read-only home, full disk) warns
once and the load goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from miaotui.kernels import cpu_ops, pages
from miaotui.loader.sources import home
from miaotui.loader.tensors import RawBlocks

log = logging.getLogger(__name__)

MIN_FILE_BYTES = 64 << 20  # SmolLM2's 98 MB Q4_1 file: 0.49 -> 0.30 s a load (Ice Lake)
MAX_BYTES = 32 << 30
_DTYPES = {torch.uint8: "U8", torch.float16: "F16"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_CHUNK = 4 << 20
_warned: list[bool] = []
_pending: list[Future] = []
_lock = threading.Lock()
_PACKER = Path(__file__).with_name("packed.py")


def enabled() -> bool:
    return os.environ.get("MIAOTUI_PACK_CACHE", "1") != "0"


def root() -> Path:
    return home() / "packed"


def usage() -> int:
    """Bytes the cache holds on disk."""
    return sum(f.stat().st_size for f in root().glob("*/*") if f.is_file()) if root().is_dir() else 0


class Entry:
    """Where one packed matrix (the parts of one fused projection, packed at one width) is kept."""

    def __init__(self, folder: Path, source: dict, name: str):
        self.folder, self.source, self.path = folder, source, folder / f"{name}.safetensors"

    def read(self) -> dict | None:
        """{"data", "dm": tensors in 2 MB pages, "bits", "group": ints}, or None where there is no sound entry."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
                meta = header.pop("__metadata__")
                out: dict = {k: int(v) for k, v in meta.items()}
                for name in ("data", "dm"):
                    spec = header[name]
                    t = pages.empty(*spec["shape"], dtype=_BY_NAME[spec["dtype"]])
                    begin, end = spec["data_offsets"]
                    if end - begin != t.nbytes or not _read_into(f.fileno(), t, 8 + size + begin):
                        raise ValueError(f"{name} is cut short")
                    out[name] = t
            os.utime(self.folder)  # recently used: the last folder to be trimmed
            return out
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            log.warning("%s: unreadable packed-weight cache entry (%s); packing again", self.path, e)
            return None

    def write(self, data: torch.Tensor, dm: torch.Tensor, bits: int, group: int) -> None:
        """Keep a packed matrix, written on a thread of its own while the load goes on (Qwen2.5-1.5B's 1.1 GB took
        0.85 s more on its first load when written in line; the tensors are never changed after packing), to a
        temporary name, then renamed: a reader never sees half of it. The process waits for it at exit."""
        with _lock:
            _pending[:] = [f for f in _pending if not f.done()]
            _pending.append(_writer().submit(self._write, data, dm, bits, group))

    def _write(self, data: torch.Tensor, dm: torch.Tensor, bits: int, group: int) -> None:
        try:
            new = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            if new:
                (self.folder / "source.json").write_text(json.dumps(self.source))
                _trim(self.folder, self.source)
            header: dict = {"__metadata__": {"bits": str(bits), "group": str(group)}}
            offset = 0
            for name, t in (("data", data), ("dm", dm)):
                header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            text = json.dumps(header).encode()
            text += b" " * (-len(text) % 8)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text)
                for t in (data, dm):
                    f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy())
            tmp.replace(self.path)
        except OSError as e:
            if not _warned:
                _warned.append(True)
                log.warning("cannot keep packed weights under %s (%s); every load will pack them", self.folder, e)


def flush() -> None:
    """Wait for every matrix being written."""
    with _lock:
        pending = list(_pending)
        _pending.clear()
    for f in pending:
        f.result()


@functools.cache
def _writer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="miaotui-pack-cache-writer")


def _read_into(fd: int, t: torch.Tensor, offset: int) -> bool:
    """Fill `t` from the file at `offset`, in chunks read on every thread torch uses: a fresh process's first
    touch of new memory is most of a read from the page cache, and on 2 cores two readers took 0.2-0.5 s for
    Qwen2.5-1.5B's 1.1 GB where one took 0.5-2.2 (Ice Lake VM, fresh processes)."""
    view = t.view(torch.uint8).reshape(-1).numpy()
    spans = [(view[i:i + _CHUNK], offset + i) for i in range(0, view.nbytes, _CHUNK)]
    return sum(_readers().map(lambda s: os.preadv(fd, [s[0]], s[1]), spans)) == view.nbytes


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="miaotui-pack-cache")


def entry(parts: list[RawBlocks], k: int, min_bits: int | None) -> Entry | None:
    """The cache entry of these parts packed for `k` inputs at `min_bits`, or None where they are not kept (the
    cache off, no kernels, parts not read from one large enough file)."""
    ops = cpu_ops()
    files = {p.source[0] for p in parts if p.source is not None}
    if not enabled() or ops is None or len(files) != 1 or any(p.source is None for p in parts):
        return None
    (source,) = files
    try:
        stat = source.stat()
    except OSError:
        return None
    if stat.st_size < MIN_FILE_BYTES:
        return None
    name, version = _folder(source, stat.st_size, stat.st_mtime_ns, ops)
    h = hashlib.sha256(f"{k} {min_bits}".encode())
    for p in parts:
        h.update(f"|{p.source[1]} {p.type} {p.num_rows}".encode())
        if p.rows is not None:
            h.update(p.rows.to(torch.int64).numpy().tobytes())
    return Entry(root() / name, version, h.hexdigest()[:24])


@functools.cache
def _folder(source: Path, size: int, mtime_ns: int, ops) -> tuple[str, dict]:
    """The folder's name for one version of a file packed by this build, and the version as its source.json records it
    (worked out once a load, not once a matrix). What decides the packed bytes besides the file: the kernel build
    (named by its class and a hash of its sources and flags) and the Python that picks each matrix's widths
    (packed.py)."""
    version = {"path": str(source.resolve()), "size": size, "mtime_ns": mtime_ns}
    layout = f"{Path(ops.__file__).parent.name} {hashlib.sha256(_PACKER.read_bytes()).hexdigest()[:16]}"
    key = hashlib.sha256(f"{json.dumps(version)} {layout}".encode()).hexdigest()[:16]
    return f"{source.stem}-{key}", version


def _trim(new: Path, source: dict) -> None:
    """Drop the folders of other versions of `new`'s file (`source`), those whose file is gone, all but the most
    recently used other build's of the same version (two classes' kernels, as tests force, share a file without
    repacking it at every load), then the least recently used beyond MAX_BYTES."""
    kept: list[tuple[float, int, Path]] = []
    same: list[tuple[float, Path]] = []
    for folder in new.parent.iterdir():
        if folder == new or not folder.is_dir():
            continue
        try:
            other = json.loads((folder / "source.json").read_text())
        except (OSError, ValueError):
            continue  # another process's folder, a moment old: left alone
        if other == source:
            same.append((folder.stat().st_mtime, folder))
        elif other.get("path") == source["path"] or not Path(other.get("path", "")).exists():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            kept.append((folder.stat().st_mtime, sum(f.stat().st_size for f in folder.iterdir()), folder))
    for _, folder in sorted(same)[:-1]:
        shutil.rmtree(folder, ignore_errors=True)
    total = sum(size for _, size, _ in kept)
    for _, size, folder in sorted(kept):
        if total <= MAX_BYTES:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
