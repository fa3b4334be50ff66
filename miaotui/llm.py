"""The offline API in the shape users know from vLLM: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from miaotui.config import DEFAULT_MODEL, EngineConfig
from miaotui.engine.embedder import Embedder, EmbeddingOutput
from miaotui.engine.engine import Engine
from miaotui.engine.sequence import RequestOutput
from miaotui.engine.tools import syntax_for
from miaotui.errors import EncoderModelError, MiaotuiError
from miaotui.sampling import SamplingParams

Prompt = str | list[int] | dict[str, Any]  # text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
Message = dict[str, Any]


_EMBEDDER_OPTIONS = ("device", "dtype", "threads", "max_batch_tokens", "pooling")


class LLM:
    """A language model (`generate`, `chat`) or an embedding model (`embed`), whichever the files hold."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        model = model or DEFAULT_MODEL
        self.embedder: Embedder | None = None
        if "max_batch_tokens" in kwargs:  # an embedding-only option: no language model is tried
            self.embedder = self._embedder(model, kwargs)
            return
        try:
            self.engine = Engine(EngineConfig(model=model, **kwargs))
        except EncoderModelError:  # the loader found an encoder where it read the file's metadata
            self.embedder = self._embedder(model, kwargs)
            return
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        """The API over an engine built elsewhere (the benchmarks build theirs from a whole `EngineConfig`)."""
        llm = cls.__new__(cls)
        llm.embedder, llm.engine, llm.tokenizer = None, engine, engine.tokenizer
        return llm

    @staticmethod
    def _embedder(model: str, kwargs: dict[str, Any]) -> Embedder:
        unknown = sorted(set(kwargs) - set(_EMBEDDER_OPTIONS))
        if unknown:
            raise MiaotuiError(f"{model} is an embedding model: {unknown[0]!r} does not apply to it (it takes "
                               f"{', '.join(_EMBEDDER_OPTIONS)})")
        return Embedder(model, **kwargs)

    def embed(self, inputs: str | Seq[str], dimensions: int | None = None,
              truncate: int | None = None) -> list[EmbeddingOutput]:
        """One unit-length vector per text (`.embedding`, `.prompt_tokens`), in input order; `dimensions` cuts
        Matryoshka models' vectors shorter, `truncate` cuts inputs to that many tokens (-1: the model's limit)
        instead of refusing inputs longer than the model takes."""
        if self.embedder is None:
            raise MiaotuiError("this is a language model; embed with an embedding model, e.g. "
                               "LLM('all-minilm-l6-v2').embed(...)")
        return self.embedder.embed([inputs] if isinstance(inputs, str) else list(inputs), dimensions, truncate)

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs come back in prompt order (n per
        prompt when `n` > 1)."""
        self._generative()
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([self._prompt_ids(p) for p in prompts], params, use_tqdm)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if len(prompt) != 1 or not {"prompt", "prompt_token_ids"} >= prompt.keys():
                raise ValueError(f"a prompt dict holds 'prompt' (text) or 'prompt_token_ids', got {sorted(prompt)}")
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt is a text, a list of token ids or a dict of either, got {type(prompt).__name__}")

    def chat(self, conversations: list[Message] | list[list[Message]],
             params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             tool_choice: str | dict = "auto") -> list[RequestOutput]:
        """Chat turns through the model's template. With `tools` (OpenAI's function format) the template renders
        them, `tool_choice` ("auto", "required", "none" or {"type": "function", "function": {"name": ...}}) is
        enforced as on the server, and each output carries the parsed `tool_calls` with its prose as `text`."""
        self._generative()
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        for c in conversations:
            if not isinstance(c, list) or not c or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                           for m in c):
                raise TypeError("chat takes a conversation — a list of messages like {'role': 'user', 'content': "
                                f"'...'}} — or a list of conversations; got {_shape(c)}")
        rendered = tools if tools and tool_choice != "none" else None
        if rendered and "tools" not in (self.tokenizer.chat_template or ""):
            raise ValueError("this model's chat template does not take tools")
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt, tools=rendered)  # type: ignore[arg-type]
               for c in conversations]
        if not rendered:
            return self._run(ids, params, use_tqdm)
        syntax = syntax_for(self.tokenizer)
        grammar = syntax.grammar(rendered, tool_choice, True)
        plist = [params] * len(ids) if params is None or isinstance(params, SamplingParams) else list(params)
        plist = [replace(p or SamplingParams(), structured_output=grammar, skip_special_tokens=False) for p in plist]
        outs = self._run(ids, plist, use_tqdm)
        for out in outs:
            content, calls = syntax.parse(out.text, rendered)
            if calls:
                out.text, out.tool_calls, out.finish_reason = content or "", calls, "tool_calls"
        return outs

    def infill(self, prefix: str, suffix: str, params: SamplingParams | None = None,
               use_tqdm: bool = False) -> RequestOutput:
        """The code that fills the gap between `prefix` and `suffix` (OpenAI's completions `suffix`), from a code
        model trained to fill gaps (its vocabulary's FIM tokens; ValueError for a model without them)."""
        self._generative()
        ids, ends = self.tokenizer.encode_infill(prefix, suffix)
        p = params or SamplingParams()
        return self._run([ids], [replace(p, stop_token_ids=[*p.stop_token_ids, *ends])], use_tqdm)[0]

    def _generative(self) -> None:
        if self.embedder is not None:
            raise MiaotuiError(f"{self.embedder.model_name} is an embedding model: use LLM.embed()")

    def _run(self, prompts: list[list[int]], params, use_tqdm: bool) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if isinstance(params, dict | str) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError(f"params are a SamplingParams or a list of them (one a prompt), got {_shape(params)}")
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        order = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[tuple[str, int], RequestOutput] = {}
        total = sum(sp.n for sp in params)
        bar = tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start, prompt_tokens, out_tokens = time.perf_counter(), sum(map(len, prompts)), 0
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[(out.request_id, out.index)] = out
                        out_tokens += out.completion_tokens
                        bar.update(1)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"in {prompt_tokens / elapsed:.0f} tok/s, out {out_tokens / elapsed:.0f}"
                                            " tok/s", refresh=False)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[(rid, i)] for rid, sp in zip(order, params) for i in range(sp.n)]


def _shape(value: Any) -> str:
    """What an argument was, for an error: its type, and a list's first item's."""
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {type(value[0]).__name__}" if value else f"an empty {type(value).__name__}"
    return type(value).__name__
