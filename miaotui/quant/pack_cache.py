"""Packed weights kept on disk: a GGUF file's blocks repacked into the kernels' layout once, read back on later loads.

Repacking is the largest part of a big model's load that is miaotui's own work. Read back, a matrix is mapped from
the OS page cache and used where it lies, where the file system keeps the file in 2 MB folios (ext4 from Linux 6.16,
xfs): the entry is laid out for it (the file ends on a 2 MB boundary, padded by at most half its matrix), and each
2 MB of it is then one huge page, as fast to stream as `pages.empty`'s, with no copy and no fresh memory to zero
(a 2-core VM's first touch of new memory is slow and varies). Elsewhere, and for the small matrices that are not
padded, it is copied into `pages.empty`: from 4 KB page-cache pages a decode runs ~7% slower (kernels/pages.py).
Qwen2.5-Coder-1.5B Q4_K_M, fresh processes alternated on an Ice Lake Xeon (ext4, Linux 6.18): 1.95-2.24 s a load
copying, 0.64-1.04 s mapping (llama.cpp 0.9-1.4 s); the rest is the GGUF's vocabulary and the tokenizer built from
it. Processes loading the same model share the mapped pages.

Entries are safetensors files (any safetensors reader opens them) under $MIAOTUI_HOME/packed/<file>-<key>/, one per
packed matrix, keyed by the source file (path, size, modification time) and the kernel build and Python that packed
it (their sources and flags, the entries' `LAYOUT`), so an edited file or a changed packer packs afresh. Only files of
`MIN_FILE_BYTES` or more are kept (smaller ones pack in a blink); a new folder replaces those of older versions of its
file and all but one other build's, and the least recently used go beyond `MAX_BYTES`. `MIAOTUI_PACK_CACHE=0` turns
it off. A cache that cannot be written (read-only home, full disk) warns once and the load goes on. An entry is
replaced by renaming, never rewritten in place: a mapped file cut short would fault its readers.
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
LAYOUT = 2  # of an entry's file (in the folder's key): 2 lays matrices out to be mapped
_DTYPES = {torch.uint8: "U8", torch.float16: "F16"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_CHUNK = 4 << 20
_HEAD = 4096  # an entry's JSON header fits in this
_warned: list[bool] = []
_huge: dict[Path, bool] = {}
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
        """{"data", "dm": tensors in 2 MB pages, "bits", "group": ints}, or None where there is no sound entry. Where
        huge pages are granted the file is mapped, its header read through the mapping (a `read` would bring its first
        2 MB into the page cache in small folios), and an entry laid out for it (`_write`) used in place; others are
        copied into `pages.empty`."""
        try:
            with open(self.path, "rb", buffering=0) as f:
                total = os.fstat(f.fileno()).st_size
                whole = pages.map_file(f.fileno(), total) if pages.GRANTED and total else None
                at = ((lambda o, n: whole[o:o + n].numpy().tobytes()) if whole is not None
                      else (lambda o, n: os.pread(f.fileno(), n, o)))
                (size,) = struct.unpack("<Q", at(0, 8))
                start = 8 + size
                if start > total:
                    raise ValueError("the header is cut short")
                header = _header(at(8, min(size, _HEAD)), lambda: at(8, size))
                meta = header.pop("__metadata__")
                out: dict = {k: int(v) for k, v in meta.items()}
                specs = {name: header[name] for name in ("data", "dm")}
                for name, spec in specs.items():
                    begin, end = spec["data_offsets"]
                    want = torch.Size(spec["shape"]).numel() * _BY_NAME[spec["dtype"]].itemsize
                    if end - begin != want or start + end > total:
                        raise ValueError(f"{name} is cut short")
                in_place = (total % pages.PAGE == 0 and start % pages.ALIGN == 0  # as `_write` lays it out
                            and whole is not None and _maps_huge(self.folder, whole))
                for name, spec in specs.items():
                    begin, end = spec["data_offsets"]
                    dtype = _BY_NAME[spec["dtype"]]
                    if whole is not None:
                        t = whole[start + begin:start + end].view(dtype).view(spec["shape"])
                        out[name] = t if in_place else pages.copy(t)
                        continue
                    out[name] = t = pages.empty(*spec["shape"], dtype=dtype)
                    if not _read_into(f.fileno(), t, start + begin):
                        raise ValueError(f"{name} is cut short")
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
            for name, t in (("dm", dm), ("data", data)):
                header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            text = json.dumps(header).encode()
            # to be mapped in place the file ends on a 2 MB boundary (every 2 MB of it then a whole folio of the
            # page cache, mapped in one huge page), where that pads it by at most half its matrix's bytes
            content = dm.nbytes + data.nbytes
            pad = -(8 + len(text) + content) % pages.PAGE
            if pad > content // 2 or dm.nbytes % pages.ALIGN or data.nbytes % pages.ALIGN:
                pad = -(8 + len(text)) % pages.ALIGN  # copied on reading
            text += b" " * pad
            head = struct.pack("<Q", len(text)) + text + _bytes(dm).tobytes()
            cut = -len(head) % pages.PAGE  # the first write ends on a 2 MB boundary, so its folios are whole too
            body = _bytes(data)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(head + body[:cut].tobytes())
                f.write(body[cut:])
            tmp.replace(self.path)
        except OSError as e:
            if not _warned:
                _warned.append(True)
                log.warning("cannot keep packed weights under %s (%s); every load will pack them", self.folder, e)


def _maps_huge(folder: Path, whole: torch.Tensor) -> bool:
    """Whether `folder`'s files map in huge pages (their file system keeps them in 2 MB folios: ext4 from Linux 6.16,
    xfs from 5.18), as the first of them this process maps shows; where they do not, entries are copied: from 4 KB
    pages a decode runs ~7% slower (kernels/pages.py)."""
    if folder not in _huge:
        _huge[folder] = pages.in_huge_pages(whole)
    return _huge[folder]


def _header(first: bytes, whole) -> dict:
    """The JSON header from its first bytes (it ends there; up to 2 MB of padding follow), else from all of it."""
    try:
        return json.JSONDecoder().raw_decode(first.decode())[0]
    except ValueError:
        return json.loads(whole())


def _bytes(t: torch.Tensor):
    return t.contiguous().view(torch.uint8).reshape(-1).numpy()


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
    layout = f"{Path(ops.__file__).parent.name} {hashlib.sha256(_PACKER.read_bytes()).hexdigest()[:16]} {LAYOUT}"
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
