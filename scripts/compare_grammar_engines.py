"""llguidance against xgrammar on miaotui's three tokenizers: tokenizer setup, schema compile time, and the mask time
per token while walking the tokens of a valid document. Needs `pip install xgrammar transformers` (neither is a
miaotui dependency). Run from the repository root: python scripts/compare_grammar_engines.py"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import llguidance as llg
import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parents[1]))
from miaotui.engine.structured import JSON_WHITESPACE  # noqa: E402
from miaotui.loader import read_model  # noqa: E402
from miaotui.loader.sources import resolve  # noqa: E402
from tests.engine.test_structured import PERSON  # noqa: E402

DOC = {"name": "Ann Lee", "age": 41, "height_m": 1.7, "email": "ann@mail.com", "role": "admin",
       "tags": ["a", "bb"], "address": {"city": "Oslo", "zip": "01234"}, "active": True}
SCHEMAS = [PERSON, {"type": "object"},
           {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(30)}}]


def summary(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"p50 {statistics.median(s) * 1e3:.3f} ms, p99 {s[int(len(s) * 0.99)] * 1e3:.3f} ms"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def llguidance_row(tok, vocab: int, ids: list[int]) -> str:
    lltok, setup = timed(lambda: llg.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=sorted(tok.stop_ids)))
    compile_s = [timed(lambda s=s: llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(
        s, defaults={"whitespace_pattern": JSON_WHITESPACE}), log_level=0))[1] for s in SCHEMAS for _ in range(5)]
    matcher = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(PERSON), log_level=0)
    mask = torch.empty(1, (vocab + 31) // 32, dtype=torch.int32)
    mask_s = []
    for token in ids:
        mask_s.append(timed(lambda: matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4))[1])
        assert matcher.consume_token(token), matcher.get_error()
    return f"llguidance: tokenizer {setup:.2f} s; compile {summary(compile_s)}; mask/token {summary(mask_s)}"


def xgrammar_row(tok, vocab: int, ids: list[int]) -> str:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    compiler, setup = timed(lambda: xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=vocab, stop_token_ids=sorted(tok.stop_ids)), max_threads=2, cache_enabled=False))
    compile_s = [timed(lambda s=s: compiler.compile_json_schema(json.dumps(s)))[1] for s in SCHEMAS for _ in range(5)]
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(PERSON)))
    mask = xgr.allocate_token_bitmask(1, vocab)
    mask_s = []
    for token in ids:
        mask_s.append(timed(lambda: matcher.fill_next_token_bitmask(mask))[1])
        assert matcher.accept_token(token)
    return f"xgrammar:   tokenizer {setup:.2f} s; compile {summary(compile_s)}; mask/token {summary(mask_s)}"


if __name__ == "__main__":
    for name in ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]:
        cfg, tok, _ = read_model(resolve(name))
        ids = tok.encode(json.dumps(DOC), add_special_tokens=False)
        for row in (llguidance_row, xgrammar_row):
            print(f"{name} (vocabulary {cfg.vocab_size}) {row(tok, cfg.vocab_size, ids)}", flush=True)
