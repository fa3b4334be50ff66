"""Our GGUF reader against gguf-py's on real files, and a clear one-line error for every kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType

from miaotui.errors import ModelFileError
from miaotui.loader import load
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import ModelFiles


def test_metadata_and_tensors_match_gguf_py(smollm2_path):
    ours, ref = GGUFFile(smollm2_path), GGUFReader(smollm2_path)
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    assert ours.get("llama.block_count") == ref.fields["llama.block_count"].contents()
    assert ours.get("tokenizer.ggml.tokens")[:100] == ref.fields["tokenizer.ggml.tokens"].contents()[:100]
    assert ours.get("tokenizer.chat_template") == ref.fields["tokenizer.chat_template"].contents()
    for t in ref.tensors[:20]:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        np.testing.assert_array_equal(ours.raw(t.name), t.data.reshape(-1).view(np.uint8))


def _tiny_gguf(path, arch="llama", qtype=None):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_context_length(64)
    data = np.zeros((4, 32), dtype=np.float32)
    if qtype is None:
        w.add_tensor("token_embd.weight", data)
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _error(path) -> str:
    with pytest.raises(ModelFileError) as e:
        load(ModelFiles("gguf", path, path.name))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_truncated_file(smollm2_path, tmp_path):
    cut = tmp_path / "half.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(smollm2_path.stat().st_size // 2))
    assert "truncated" in _error(cut)


def test_truncated_inside_header(smollm2_path, tmp_path):
    cut = tmp_path / "head.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(100_000))
    assert "truncated" in _error(cut)


def test_garbage_header(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a model at all, just some text" * 10)
    assert "not a GGUF file" in _error(bad)


def test_tiny_file(tmp_path):
    bad = tmp_path / "tiny.gguf"
    bad.write_bytes(b"GG")
    assert "too small" in _error(bad)


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_unsupported_architecture(tmp_path):
    assert "unsupported architecture 'mamba'" in _error(_tiny_gguf(tmp_path / "m.gguf", arch="mamba"))


def test_unsupported_tensor_type(tmp_path):
    msg = _error(_tiny_gguf(tmp_path / "q.gguf", qtype=GGMLQuantizationType.IQ2_XXS))
    assert "IQ2_XXS" in msg and "token_embd.weight" in msg
