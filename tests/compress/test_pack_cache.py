"""The packed-weight cache (quant/pack_cache.py): a GGUF's matrices packed once, read back bit for bit on later loads,
packed afresh when the file changes, and never in the way of a load it cannot serve."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miaotui.kernels import cpu_ops, has_packed, pages
from miaotui.loader.gguf import iter_weights, read_config
from miaotui.loader.gguf_file import GGUFFile
from miaotui.quant import pack_cache
from miaotui.quant.packed import PackedWeight

# A llama q projection (rows rearranged on the way in), a fused gate|up and the tied embedding table.
NAMES = (["model.layers.0.self_attn.q_proj.weight"], ["model.layers.0.mlp.gate_proj.weight",
                                                       "model.layers.0.mlp.up_proj.weight"],
         ["model.embed_tokens.weight"])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    if not has_packed():
        pytest.skip("miaotui's kernels are not built here")
    monkeypatch.setattr(pack_cache, "home", lambda: tmp_path / "home")
    monkeypatch.setattr(pack_cache, "MIN_FILE_BYTES", 0)  # SmolLM2's 98 MB file is kept too
    monkeypatch.delenv("MIAOTUI_PACK_CACHE", raising=False)
    return tmp_path / "home" / "packed"


def pack_all(path) -> list[PackedWeight]:
    f = GGUFFile(path)
    weights = dict(iter_weights(f, read_config(f)))
    out = []
    for names in NAMES:
        parts = [b for n in names for b in weights[n].blocks()]
        out.append(PackedWeight.from_blocks(parts, weights[names[0]].shape[1], 8 if len(names) > 1 else None))
    pack_cache.flush()  # written in the background
    return out


def same(a: list[PackedWeight], b: list[PackedWeight]) -> bool:
    return all(torch.equal(x.data, y.data) and torch.equal(x.dm, y.dm) and (x.bits, x.group, x.shape)
               == (y.bits, y.group, y.shape) for x, y in zip(a, b, strict=True))


def test_packed_matrices_are_kept_and_read_back_exactly(cache, smollm2_path, monkeypatch):
    from safetensors import safe_open

    first = pack_all(smollm2_path)
    (folder,) = cache.iterdir()
    entries = sorted(folder.glob("*.safetensors"))
    assert len(entries) == len(NAMES)
    assert pack_cache.usage() == sum(f.stat().st_size for f in folder.iterdir())  # what `miaotui list` shows
    with safe_open(entries[0], "pt") as f:  # a plain safetensors file
        kept = {k: f.get_tensor(k) for k in f.keys()}
    assert any(torch.equal(kept["data"], w.data) and torch.equal(kept["dm"], w.dm) for w in first)

    def refuse(*args, **kwargs):
        raise AssertionError("packed again although the cache holds it")

    monkeypatch.setattr(cpu_ops(), "pack_blocks", refuse)
    assert same(pack_all(smollm2_path), first)


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    """Each file this process maps: the address ranges of its mappings."""
    out: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            a, b = (int(x, 16) for x in fields[0].split("-"))
            out.setdefault(fields[5], []).append((a, b))
    return out


@pytest.mark.skipif(not pages.GRANTED, reason="no transparent huge pages here: entries are copied")
def test_large_matrices_are_read_in_place_from_the_page_cache(cache, smollm2_path, caplog, monkeypatch):
    first = pack_all(smollm2_path)
    (folder,) = cache.iterdir()
    laid_out = {str(f) for f in folder.glob("*.safetensors") if f.stat().st_size % pages.PAGE == 0}
    assert len(laid_out) == 2  # gate|up (1.8 MB at 8 bits) and the embedding table; q's 0.2 MB is padded no further

    def where(huge: bool) -> list[bool]:
        """Which matrices a load uses where their files are mapped, the file system holding them in 2 MB folios
        or not (as this host's does: ext4 from Linux 6.16, xfs)."""
        monkeypatch.setattr(pack_cache, "_huge", {})
        monkeypatch.setattr(pages, "in_huge_pages", lambda t: huge)
        weights = pack_all(smollm2_path)
        assert same(weights, first)
        maps = mapped_files()
        return [any(a <= w.data.data_ptr() < b and a <= w.dm.data_ptr() < b for name in laid_out
                    for a, b in maps.get(name, ())) for w in weights]

    assert where(huge=True) == [False, True, True]  # q copied into `pages.empty`, the others used where mapped
    assert where(huge=False) == [False, False, False]  # from 4 KB pages a decode is slower: copied
    victim = Path(max(laid_out, key=lambda f: Path(f).stat().st_size))  # the table, cut short under a new inode
    cut = victim.with_suffix(".cut")  # (truncating a mapped one in place would fault its users on their next read)
    cut.write_bytes(victim.read_bytes()[:3 << 20])
    cut.replace(victim)
    monkeypatch.setattr(pages, "in_huge_pages", lambda t: True)
    with caplog.at_level(logging.WARNING):
        assert same(pack_all(smollm2_path), first)  # its length checked before any byte of it is touched
    assert "is cut short" in caplog.text


def test_a_damaged_entry_is_packed_again(cache, smollm2_path, caplog):
    first = pack_all(smollm2_path)
    (folder,) = cache.iterdir()
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])  # cut short, as by a full disk outside our rename
    with caplog.at_level(logging.WARNING):
        assert same(pack_all(smollm2_path), first)
    assert "unreadable packed-weight cache entry" in caplog.text
    assert same(pack_all(smollm2_path), first)  # and written whole again
    assert victim.stat().st_size > 1000


def test_a_changed_file_packs_afresh_and_its_old_entries_go(cache, smollm2_path, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, path)
    pack_all(path)
    (old,) = cache.iterdir()
    os.utime(path, ns=(1, 1))  # a new version of the file, as far as anything can tell without reading it
    pack_all(path)
    (new,) = cache.iterdir()
    assert new != old


def test_folders_of_deleted_files_go_and_the_least_recently_used_beyond_the_limit(cache, smollm2_path, tmp_path,
                                                                                   monkeypatch):
    a, b, c = (tmp_path / f"{n}.gguf" for n in "abc")
    for path in (a, b, c):
        shutil.copyfile(smollm2_path, path)
    pack_all(a)
    pack_all(b)
    a.unlink()
    pack_all(c)  # a's folder goes with its file
    assert sorted(f.name.split("-")[0] for f in cache.iterdir()) == ["b", "c"]
    monkeypatch.setattr(pack_cache, "MAX_BYTES", 1)
    pack_all(c)  # reads: nothing is trimmed
    assert len(list(cache.iterdir())) == 2
    os.utime(c, ns=(1, 1))
    pack_all(c)  # c's new version: its old folder and, beyond the limit, b's go
    assert [f.name.split("-")[0] for f in cache.iterdir()] == ["c"]


def test_off_or_unwritable_the_load_goes_on(cache, smollm2_path, monkeypatch, tmp_path, caplog):
    first = pack_all(smollm2_path)
    monkeypatch.setenv("MIAOTUI_PACK_CACHE", "0")
    monkeypatch.setattr(pack_cache, "home", lambda: tmp_path / "other")
    assert same(pack_all(smollm2_path), first) and not (tmp_path / "other").exists()
    monkeypatch.delenv("MIAOTUI_PACK_CACHE")
    (tmp_path / "blocked").write_text("a file where the cache's folder would go")
    monkeypatch.setattr(pack_cache, "home", lambda: tmp_path / "blocked")
    monkeypatch.setattr(pack_cache, "_warned", [])
    with caplog.at_level(logging.WARNING):
        assert same(pack_all(smollm2_path), first)
    assert caplog.text.count("cannot keep packed weights") == 1


def test_miaotui_list_shows_the_space_it_takes(cache, smollm2_path):
    pack_all(smollm2_path)
    r = subprocess.run([sys.executable, "-m", "miaotui.cli", "list"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MIAOTUI_HOME": str(cache.parent)}, check=False)
    assert r.returncode == 0, r.stderr
    assert f"packed weights kept for faster loads: {pack_cache.usage() / 1e6:.1f} MB in {cache}" in r.stdout
