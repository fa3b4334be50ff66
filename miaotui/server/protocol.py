"""OpenAI-compatible request bodies (pydantic), validated once; errors name the parameter."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from miaotui.sampling import SamplingParams, StructuredOutput
from miaotui.server.errors import APIError

MAX_STOP = 16  # stop strings per request (OpenAI takes 4; agents' clients often send a few more)
MAX_STOP_CHARS = 256
MAX_INT = 2**63 - 1


class _Strict(BaseModel):
    """A field we do not know is refused with a 400 naming it, never dropped."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (the same fields as its older `guided_*` parameters)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class GenerationRequest(_Strict):
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
    service_tier: Literal["auto", "default"] | None = None  # one tier here; "flex", "priority" are refused
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1, le=MAX_INT)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT)
    stop_token_ids: list[int] | None = Field(default=None, max_length=1024)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured outputs, in its current and its older spelling
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None  # llama-server's spelling of the grammar constraint (GBNF; Lark is taken too)

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
    def _token_biases(cls, v: dict[str, float] | None):
        for key, bias in (v or {}).items():
            if not key.isdigit() or int(key) > MAX_INT:
                raise ValueError(f"keys must be token ids, got {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias}")
        if v and len(v) > 1024:
            raise ValueError(f"at most 1024 biased tokens, got {len(v)}")
        return v

    def constraint(self) -> tuple[StructuredOutput, str] | None:
        """The requested output constraint and the parameter that asked for it (ValueError if several do)."""
        found: list[tuple[StructuredOutput, str]] = []
        f = self.response_format
        if f is not None and f.type == "json_object":
            found.append((StructuredOutput(json_object=True), "response_format"))
        elif f is not None and f.type == "json_schema":
            if f.json_schema is None or f.json_schema.schema_ is None:
                raise ValueError("response_format: json_schema needs {'name': ..., 'schema': {...}}")
            found.append((StructuredOutput(json=f.json_schema.schema_), "response_format"))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            found.append((StructuredOutput(json=so.json_, json_object=bool(so.json_object), regex=so.regex,
                                           choice=so.choice, grammar=so.grammar), "structured_outputs"))
        for name, field in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar"), ("grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append((StructuredOutput(**{field: value}), name))
        if len(found) > 1:
            raise ValueError(f"only one output constraint per request, got {', '.join(p for _, p in found)}")
        return found[0] if found else None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; APIError (400) where min_tokens exceeds the max_tokens that applies."""
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                           param="min_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              seed=self.seed, n=self.n, stop=stop, stop_token_ids=list(self.stop_token_ids or ()),
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
                              skip_special_tokens=self.skip_special_tokens,
                              logit_bias={int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt (text or token ids), or a batch of them
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # the text after the completion: the model fills the gap (code models' FIM tokens)

    def prompts(self) -> list[str | list[int]]:
        """The batch's prompts (one, unless `prompt` lists texts or token lists)."""
        batch = isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        return list(self.prompt) if batch else [self.prompt]


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer to that call
    # OpenAI's other message fields, as clients send back the assistant messages they were given (by another server
    # too): a refusal is what the assistant said; annotations are citations about its text, not in it; audio and
    # the deprecated function_call are refused unless null.
    refusal: str | None = None
    annotations: list[dict] | None = None
    audio: Any = None
    function_call: Any = None

    @field_validator("audio", "function_call")
    @classmethod
    def _null_only(cls, v: Any, info):
        if v is not None:
            use = "; use tool_calls" if info.field_name == "function_call" else ""
            raise ValueError(f"{info.field_name} is not supported by this server{use}")
        return v

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

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments as objects (templates serialize them)."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text() or self.refusal or ""}
        if self.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatTemplating(_Strict):
    """What the chat template renders besides the messages: the tools and vLLM's template controls; shared by chat
    and /tokenize, whose count of a conversation is chat's."""

    tools: list[Tool] | None = Field(default=None, max_length=128)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class ChatRequest(GenerationRequest, ChatTemplating):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    store: bool | None = None  # OpenAI's; false (its default) is what this server does
    modalities: list[Literal["text"]] | None = None  # OpenAI's; text (its default) is all this server makes

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server keeps no chat completions: store must be false")
        return value

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # (OpenAI's rule; 0 asks for nothing either way)
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @classmethod
    def translated(cls, body: dict[str, Any]) -> ChatRequest:
        """The chat request another API's request was turned into (Responses, Anthropic's Messages); a value chat
        does not take is answered as a request's own fields are (errors.py: a 400 naming the field)."""
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    def tool_choice_resolved(self) -> str | dict:
        """tool_choice with OpenAI's default ("auto" with tools, else "none"); ValueError if it cannot be met."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'function'!r} needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools or ()}:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
            return choice.model_dump()
        return choice


class TokenizeRequest(ChatTemplating):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for the prompt
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default True (vLLM's)
    add_special: bool | None = None  # llama.cpp's name for it

    @model_validator(mode="after")
    def _one_input(self):
        given = [n for n in ("prompt", "content", "messages") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of prompt, content or messages, not {' and '.join(given)}")
        if self.add_special is not None and self.add_special_tokens is not None:
            raise ValueError("give add_special_tokens or llama.cpp's add_special, not both")
        chat_only = sorted(self.model_fields_set & ChatTemplating.model_fields.keys())
        if chat_only and self.messages is None:
            raise ValueError(f"{', '.join(chat_only)} apply to messages, and none were given")
        return self

    def special(self) -> bool:
        return next((v for v in (self.add_special_tokens, self.add_special) if v is not None), True)

    def chat(self) -> ChatRequest:
        """The chat request whose prompt these messages make."""
        return ChatRequest(model=self.model, messages=self.messages,
                           **{name: getattr(self, name) for name in ChatTemplating.model_fields})


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings request; `truncate_prompt_tokens` is vLLM's (cut inputs past N tokens, -1: the model's
    limit) — without it an input longer than the model takes is a 400, as OpenAI answers."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)

    @field_validator("input")
    @classmethod
    def _bounded(cls, v):
        items = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}")
        return v

    def inputs(self) -> list[str] | list[list[int]]:
        v = self.input
        return [v] if isinstance(v, str) or isinstance(v[0], int) else v  # type: ignore[return-value]
