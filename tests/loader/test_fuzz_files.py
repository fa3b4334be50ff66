"""Fuzzed model files: mutated and truncated GGUF files (header counts, string lengths, tensor dims, offsets and
types, alignment, config values), safetensors headers and tokenizer JSON. Each must load or fail with one line
naming the file, never another exception, a hang, or memory beyond the file's own size.

A bounded run in the suite; the long one: `MIAOTUI_FUZZ_EXAMPLES=1000 python -m pytest tests/loader/test_fuzz_files.py`.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from miaotui.errors import MiaotuiError
from miaotui.loader import load
from miaotui.loader.gguf_file import GGUFFile
from miaotui.loader.sources import ModelFiles

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("MIAOTUI_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
BYTES = sorted({0, 1, 2, 7, 0x7F, 0x80, 0xFF})
EXTREME = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]


def _tokens() -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary: the 256 byte symbols, a few merges, two special tokens."""
    from miaotui.tokenizer import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o"]
    return symbols + ["he", "ll", "hell", "hello", "<s>", "</s>"], merges


def tiny_llama(path: Path, heads: int = 4, merges: list[str] | None = None, block_count: int = 2) -> Path:
    """A complete 2-layer llama GGUF (tokenizer, chat template, F32 / F16 / Q8_0 tensors) of ~40 KB; the
    arguments forge its metadata."""
    tokens, good_merges = _tokens()
    merges = good_merges if merges is None else merges
    vocab, hidden, ffn, layers = len(tokens), 32, 64, 2
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(2)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(vocab, hidden).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", 16, hidden), ("attn_v", 16, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden),
                                 ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            w.add_tensor(f"blk.{i}.{name}.weight", q8_0(mat(rows, cols)), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q8_0(m: np.ndarray) -> np.ndarray:
    blocks = m.reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    q = np.round(blocks / np.where(scale == 0, 1, scale)).astype(np.int8)
    out = np.concatenate([scale.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(m.shape[0], -1)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> tuple[bytes, int]:
    path = tiny_llama(tmp_path_factory.mktemp("seed") / "tiny.gguf")
    f = GGUFFile(path)
    header_end = min(t.offset for t in f.tensors.values())
    return path.read_bytes(), header_end


@contextmanager
def time_limit(seconds: int):
    def _hang(*_):
        raise TimeoutError(f"loading took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def address_space_headroom(extra_bytes: int):
    """Caps this process's address space at what it maps now plus `extra_bytes`, so an allocation a forged count
    asks for fails at once (and fails the test) even where the kernel would overcommit it without touching a page."""
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def traced_peak(record: list[int]):
    """Appends the peak of Python and numpy allocations made inside the block."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        record.append(tracemalloc.get_traced_memory()[1] - before)


def check_loads_or_refuses(path: Path, kind: str = "gguf") -> None:
    """Loads, or raises MiaotuiError with one line that names the file; nothing else, within 20 s."""
    try:
        with time_limit(20):
            load(ModelFiles(kind, path, path.name))
    except MiaotuiError as e:
        msg = str(e)
        assert str(path) in msg or path.name in msg, msg
        assert "\n" not in msg, msg


def test_the_seed_file_loads_and_generates(seed_file, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(seed_file[0])
    loaded = load(ModelFiles("gguf", path, path.name))
    assert loaded.config.num_layers == 2 and loaded.tokenizer.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("forged, expected", [
    ({"heads": 0}, "bad llama hyper-parameters"),  # divided by before PR "fuzz: ..." (ZeroDivisionError)
    ({"heads": 3}, "do not split"),
    ({"block_count": 2**31}, "block_count is 2147483648 but the file holds blocks 0..1"),
    ({"merges": ["h"]}, "corrupt tokenizer"),  # a merge without its pair (a TypeError from tokenizers)
    ({"merges": ["x y"]}, "corrupt tokenizer"),  # a merge of tokens not in the vocabulary
])
def test_forged_metadata_found_by_fuzzing_is_refused(tmp_path, forged, expected):
    path = tiny_llama(tmp_path / "forged.gguf", **forged)
    with pytest.raises(MiaotuiError) as e:
        load(ModelFiles("gguf", path, path.name))
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


@st.composite
def mutations(draw, data: bytes, header_end: int):
    """Byte flips and forged 4/8-byte integers in the header, or a truncation anywhere."""
    kind = draw(st.sampled_from(["flip", "int64", "int32", "truncate"]))
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: draw(st.integers(0, len(buf) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(4, header_end - 8))
        if kind == "flip":
            buf[pos] = draw(st.sampled_from(BYTES))
        elif kind == "int64":
            buf[pos : pos + 8] = struct.pack("<Q", draw(st.sampled_from(EXTREME)))
        else:
            buf[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from(EXTREME)) & 0xFFFFFFFF)
    return bytes(buf)


def test_mutated_gguf_files(seed_file, tmp_path):
    data, header_end = seed_file
    rss_before = max_rss_mb()
    path = tmp_path / "fuzzed.gguf"
    peaks: dict[str, list[int]] = {"loaded": [], "refused": []}  # per file: the most held at once in Python
    # and numpy objects while loading it

    @FUZZ
    @given(mutations(data, header_end))
    def run(mutated: bytes):
        path.write_bytes(mutated)
        peak: list[int] = []
        try:
            with time_limit(20), traced_peak(peak):
                load(ModelFiles("gguf", path, path.name))
            peaks["loaded"] += peak
        except MiaotuiError as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
            peaks["refused"] += peak

    tracemalloc.start()
    try:
        path.write_bytes(data)
        seed_peak: list[int] = []
        for _ in range(2):  # the second load, once imports and caches are warm, is the reference
            with traced_peak(seed_peak):
                load(ModelFiles("gguf", path, path.name))
        with address_space_headroom(2 << 30):  # a forged count asking for gigabytes raises, not overcommits
            run()
    finally:
        tracemalloc.stop()
    largest = {k: max(v, default=0) for k, v in peaks.items()}
    print(f"mutated GGUF files of {len(data)} bytes: {len(peaks['loaded'])} loaded, {len(peaks['refused'])} "
          f"refused; largest traced peak {largest} bytes (the intact file: {seed_peak[-1]})")
    assert peaks["refused"] and peaks["loaded"]
    # A forged count or length makes the loader parse at most what the file holds before refusing it: gguf's
    # reader spends a few Python objects per element parsed (~5x the bytes), never what the count asks for,
    assert largest["refused"] <= 8 * len(data), f"a refused {len(data)}-byte file held {largest['refused']} bytes"
    # a file that loads holds no more than the intact one does,
    assert largest["loaded"] <= 1.25 * seed_peak[-1], f"{largest['loaded']} bytes against {seed_peak[-1]}"
    # and, counting torch's allocations too, peak memory grows by little more than loading the model needs.
    assert max_rss_mb() - rss_before < 256, f"peak memory grew by {max_rss_mb() - rss_before:.0f} MB"


@st.composite
def safetensors_headers(draw):
    """A safetensors file whose JSON header lies: sizes, offsets, dtypes, shapes, or the length prefix."""
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}}
    entry = header["model.embed_tokens.weight"]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "length", "json"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F64", "I4", "??", "", "F8_E4M3"]))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.sampled_from(EXTREME[:6] + [-1]), max_size=4))
    elif field == "data_offsets":
        entry["data_offsets"] = draw(st.lists(st.sampled_from(EXTREME[:6] + [-5]), min_size=0, max_size=3))
    raw = json.dumps(header).encode()
    if field == "json":
        raw = raw[: draw(st.integers(0, len(raw)))]
    length = len(raw)
    if field == "length":
        length = draw(st.sampled_from(EXTREME))
    return struct.pack("<Q", length) + raw + bytes(128)


def test_mutated_safetensors_and_tokenizer_json(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
        "num_attention_heads": 1, "num_hidden_layers": 1, "vocab_size": 8, "max_position_embeddings": 32}))
    tokens, merges = _tokens()

    @FUZZ
    @given(safetensors_headers(), st.sampled_from(["ok", "truncated", "not json", "wrong shape"]))
    def run(st_bytes: bytes, tok_kind: str):
        (folder / "model.safetensors").write_bytes(st_bytes)
        tok = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                                           "merges": merges}}
        text = json.dumps(tok)
        text = {"ok": text, "truncated": text[: len(text) // 2], "not json": "<html>",
                "wrong shape": json.dumps({"model": 5})}[tok_kind]
        (folder / "tokenizer.json").write_text(text)
        try:
            with time_limit(20):
                load(ModelFiles("hf", folder, folder.name))
        except MiaotuiError as e:
            assert str(folder) in str(e) and "\n" not in str(e), str(e)

    run()
