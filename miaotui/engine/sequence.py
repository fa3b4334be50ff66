"""One request as the engine tracks it, and what it hands back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from miaotui.sampling import SamplingParams
from miaotui.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the most likely alternatives (token id → logprob), the chosen one included


@dataclass(slots=True)
class RequestMetrics:
    """When a request arrived, was first scheduled, got its first token and finished (time.monotonic seconds),
    recorded once by the scheduler and read by the CLI, the server's metrics and the benchmark alike."""

    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    proposed_tokens: int = 0  # speculative decoding: tokens proposed for this request and checked
    accepted_tokens: int = 0  # of which the model agreed with
    verify_steps: int = 0  # steps that checked proposals

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        """Seconds from the first token to the last."""
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time


@dataclass(slots=True)
class Sequence:
    """A request's tokens and progress. The scheduler's one rule: compute tokens until num_computed catches up
    with len(token_ids); when it does, sample one more token."""

    request_id: str
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    priority: int = 0
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # (hash, tokens) of the full blocks of token_ids so far, chained: a full block's tokens never change
    block_hashes: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    num_committed: int = 0  # blocks of block_table the prefix cache has been offered (KVCacheManager.commit)
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the engine failed this sequence (finish_reason "error")
    text: str = ""
    emitted: int = 0  # characters of `text` already handed to the caller
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # params.prompt_logprobs: per prompt position, the logprob of its token given those before (None at 0)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    generator: torch.Generator | None = None
    index: int = 0  # which of the request's n samples
    matcher: Any = None  # llguidance's LLMatcher of a constrained request, advanced with every token it takes
    draft: list[int] = field(default_factory=list)  # tokens proposed for this step (speculative decoding)
    spec: Any = None  # the speculator's per-request state (its adaptive k)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(slots=True)
class Position:
    """A sequence as it would be after taking the first `j` of its proposed tokens: what the sampler and its
    processors read (penalties the tokens, a grammar mask the matcher's state) to score that position."""

    params: SamplingParams
    token_ids: list[int]
    num_prompt: int
    generator: torch.Generator | None
    matcher: Any = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @classmethod
    def of(cls, seq: Sequence) -> list[Position | Sequence]:
        """The sequence itself, then one position per proposed token."""
        views: list[Position | Sequence] = [seq]
        for j in range(1, len(seq.draft) + 1):
            matcher = None
            if seq.matcher is not None:
                matcher = seq.matcher.deep_copy()
                matcher.consume_tokens(seq.draft[:j])
            views.append(cls(seq.params, seq.token_ids + seq.draft[:j], seq.num_prompt, seq.generator, matcher))
        return views


@dataclass(slots=True)
class RequestOutput:
    """What a caller sees after a step: the text so far, what is new since last time, and why it ended."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    metrics: RequestMetrics
    stop_reason: str | int | None = None
    error: str | None = None  # set when finish_reason is "error": the request failed, the engine went on
    tool_calls: list[dict] | None = None  # LLM.chat with tools: the calls parsed out of the text (OpenAI's shape)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # SamplingParams.prompt_logprobs: one a prompt token

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
