"""OpenAI-compatible request bodies (pydantic), validated once; errors name the parameter."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from miaotui.sampling import SamplingParams

MAX_STOP = 16  # stop strings per request (OpenAI takes 4; agents' clients often send a few more)
MAX_STOP_CHARS = 256
MAX_INT = 2**63 - 1


class _Strict(BaseModel):
    """A field we do not know is refused with a 400 naming it, never dropped."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1 - 16)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1, le=MAX_INT)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    ignore_eos: bool = False
    # OpenAI fields taken only where they ask for nothing (the structured-output work gives them meaning)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v: str | list[str] | None):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        for s in stops:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None):
        if v:
            raise ValueError("logit_bias is not supported yet")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None):
        if v and v != {"type": "text"}:
            raise ValueError(f"response_format {v.get('type')!r} is not supported yet (only 'text')")
        return v

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=self.seed, n=self.n, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v: str | list[dict] | None):
        for part in v if isinstance(v, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r} is not supported by this text model "
                                 "(only {'type': 'text', 'text': ...})")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None):
        if v:
            raise ValueError("tools are not supported yet")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: str | dict | None):
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported yet (no tools)")
        return v


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
