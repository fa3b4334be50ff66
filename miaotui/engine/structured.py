"""Structured output: JSON schemas, regular expressions, choice lists and Lark grammars compiled by llguidance
against the model's tokenizer, and applied each step as a bitmask of the tokens each constrained row may take.

Why llguidance and not xgrammar (both measured on an AVX2 EPYC, 2 cores, on our three tokenizers, walking
the tokens of a valid document: scripts/compare_grammar_engines.py): llguidance compiles a typical schema in 1.0-1.9 ms (p50) where xgrammar
takes 12-66 ms, because xgrammar precomputes per-schema token tables; xgrammar's masks are faster (~0.005 ms against
0.03-0.06 ms p50 per row), but both are small beside a decode step of 5-50 ms, while compile time is paid by every
new schema an agent sends. llguidance's Lark dialect with inline JSON schemas also makes tool-call grammars one
rule, it bounds its own work (parser limits) so a hostile grammar cannot stall the engine, and it pulls in no
further packages (xgrammar brings triton).

The compiled grammars are cached by their text; compiling runs on a worker thread with a time limit, so a server
compiles before it admits a request and the engine loop never waits on a compiler. Each request gets its own matcher
(a copy of the cached one), advanced by the scheduler with every token it books. The masks of a step are computed on
a worker thread while the model's forward pass runs, and applied to the logits in the sampler's processor hook.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from miaotui.errors import GrammarError
from miaotui.sampling import StructuredOutput
from miaotui.tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance

    from miaotui.engine.sequence import Sequence

# JSON between tokens: a space, or one line break and an indent of up to 16 (runaway newlines and spaces are the
# most reported failure of JSON-constrained small models); enough for an indented document.
JSON_WHITESPACE = r"(\x20|\x0D?\x0A[\x20\x09]{0,16})?"
COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 256


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a core dependency; only a broken install lacks it
        raise GrammarError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


class Grammars:
    """Compiles constraints against one tokenizer: a cache of compiled matchers, one worker thread, a time limit."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, timeout_s: float = COMPILE_TIMEOUT_S):
        self.tokenizer, self.vocab_size, self.timeout_s = tokenizer, vocab_size, timeout_s
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miaotui-grammar")
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for `spec` (GrammarError if it does not compile, or not within the time limit)."""
        with self._lock:
            cached = self._cache.get(spec.key)
            if cached is not None:
                self._cache.move_to_end(spec.key)
                return cached.deep_copy()
        future = self._pool.submit(self._compile, spec)
        try:
            return future.result(timeout=self.timeout_s).deep_copy()
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"the {spec.kind} constraint did not compile within {self.timeout_s:g} s") from None

    async def compile_async(self, spec: StructuredOutput) -> None:
        """Compile (or find cached) off the event loop, so the engine's own `compile` is then a cache hit."""
        await asyncio.get_running_loop().run_in_executor(None, self.compile, spec)

    def warm_up(self) -> None:
        """Build the tokenizer's trie (about a second for a large vocabulary) before the first request needs it."""
        self._pool.submit(self._tokenizer)

    def executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        return self._executor

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            llg = _llguidance()
            self._lltok = llg.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=sorted(self.tokenizer.stop_ids) or None)
        return self._lltok

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        with self._lock:
            if spec.key in self._cache:
                return self._cache[spec.key]
        llg = _llguidance()
        try:
            matcher = llg.LLMatcher(self._tokenizer(), _grammar(llg, spec), log_level=0)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"invalid {spec.kind} constraint: {e}") from None
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind} constraint: {matcher.get_error()}")
        with self._lock:
            self._cache[spec.key] = matcher
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher


def _grammar(llg, spec: StructuredOutput) -> str:
    from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

    M = llg.LLMatcher
    options = {"whitespace_pattern": JSON_WHITESPACE}
    try:
        if spec.json is not None:
            return M.grammar_from_json_schema(spec.json, defaults=options)
        if spec.json_object:
            return M.grammar_from_json_schema({"type": "object"}, defaults=options)
        if spec.regex is not None:
            return M.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return M.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in spec.choice))
        return M.grammar_from_lark(any_to_lark(spec.grammar))  # GBNF (llama.cpp's) becomes Lark; Lark stays
    except (ValueError, GbnfToLarkError) as e:  # a schema that is not a JSON object, GBNF that does not parse
        raise GrammarError(f"invalid {spec.kind} constraint: {e}") from None


def _lark_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass(slots=True)
class _MaskArgs:
    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)], filled by the future
    done: concurrent.futures.Future


class GrammarMask:
    """The sampler's processor for constrained rows: -inf on every token the row's matcher does not allow."""

    def __init__(self, grammars: Grammars) -> None:
        self.grammars = grammars
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="miaotui-mask")
        self._shifts = torch.arange(32, dtype=torch.int32)

    def prepare(self, seqs: list[Sequence], device: torch.device) -> _MaskArgs | None:
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        words = (self.grammars.vocab_size + 31) // 32
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        matchers = [(seqs[i].matcher, j) for j, i in enumerate(rows)]
        done = self._pool.submit(self.grammars.executor().unsafe_compute_mask_ptr, matchers, bitmask.data_ptr(),
                                 words * 4, len(rows))
        return _MaskArgs(rows, bitmask, done)

    def __call__(self, logits: torch.Tensor, a: _MaskArgs) -> torch.Tensor:
        a.done.result()
        bits = (a.bitmask.unsqueeze(-1) >> self._shifts) & 1  # [R, words, 32], token 32*w + b at [w, b]
        allowed = bits.view(len(a.rows), -1)[:, : logits.shape[1]].to(device=logits.device, dtype=torch.bool)
        rows = torch.tensor(a.rows, device=logits.device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return logits
