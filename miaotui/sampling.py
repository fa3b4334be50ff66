"""SamplingParams: how to pick each next token and when to stop, validated once with errors naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class StructuredOutput:
    """A constraint on the output, exactly one of: a JSON schema (`json`, a dict or its JSON text), any JSON object
    (`json_object`), a regular expression, a choice among fixed strings, or a grammar: Lark (llguidance's dialect)
    or llama.cpp's GBNF (`root ::= ...`). The names follow vLLM's `structured_outputs`."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None and not all(isinstance(c, str) and c for c in self.choice):
            raise ValueError("structured output choices must be non-empty strings")

    @property
    def kind(self) -> str:
        return next(n for n in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, n))

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached under."""
        value: Any = getattr(self, self.kind)
        return self.kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text) at the end of the text
    ignore_eos: bool = False
    min_tokens: int = 0  # no end-of-sequence, stop token or stop string before this many tokens (vLLM's)
    logprobs: int | None = None  # number of top alternatives to return with each sampled token's logprob
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's; no prefix reuse)
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None
    logit_bias: dict[int, float] | None = None  # token id → added to its logit, in [-100, 100] as in OpenAI's API

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        checks = [
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be non-negative"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1, 0 (off) or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be positive"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("n", self.n >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             f"must be in [0, max_tokens ({self.max_tokens})]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
        ]
        if self.logit_bias:
            checks.append(("logit_bias", all(isinstance(t, int) and t >= 0 and -100 <= b <= 100
                                             for t, b in self.logit_bias.items()),
                           "maps token ids to biases in [-100, 100]"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def out_of_vocabulary(self, vocab_size: int) -> tuple[str, int] | None:
        """The first token id a parameter names outside a vocabulary of this size, with the parameter's name."""
        for name, ids in (("logit_bias", self.logit_bias or ()), ("stop_token_ids", self.stop_token_ids)):
            for t in ids:
                if not 0 <= t < vocab_size:
                    return name, t
        return None
