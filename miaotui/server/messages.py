"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as vLLM's and llama.cpp's servers
serve it, for clients written against Anthropic's SDK (agents and coding tools that take a base URL). A request is
turned into a chat request (`system` → a system message, content blocks → messages: `tool_use` blocks → an
assistant's tool calls, `tool_result` blocks → tool messages; `tools` with `input_schema` → function tools) and runs
through the same preparation as chat completions (routes.prepare_chat: template, tool grammar, limits). The reply
comes back as content blocks (`text`, `tool_use`) with Anthropic's stop reasons and usage, or streamed as its events
(message_start, content_block_start / _delta / _stop, message_delta, message_stop), a tool call's input as
`input_json_delta`s while the model writes it. Errors on these paths have Anthropic's shape (server/errors.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator

from miaotui.engine.sequence import RequestOutput
from miaotui.server.errors import APIError, anthropic_type
from miaotui.server.protocol import ChatRequest, _Strict
from miaotui.server.routes import ChatJob, chat_prompt, prepare_chat, server

router = APIRouter()


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("a name goes with type 'tool', and only with it")
        return self


class Thinking(_Strict):
    type: Literal["disabled"]  # extended thinking needs a reasoning model: refused by name


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    format: OutputFormat | None = None  # structured output (`messages.parse`); `effort` is a reasoning model's


class MessagesRequest(_Strict):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint: this server reuses every prefix it can anyway


class CountRequest(_Strict):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined (cache_control and citations change nothing here); other blocks are 400s."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: a string or a list of text blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise APIError(400, f"{where}.{j}: content block of type {kind!r} is not supported here (this text "
                           "model takes text blocks)", param=f"{where}.{j}")
        parts.append(block["text"])
    return "".join(parts)


def _messages(req: MessagesRequest | CountRequest) -> list[dict]:
    """Anthropic's system and content blocks as chat messages."""
    out: list[dict] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages.{i}.role: {role!r} is not one of 'user', 'assistant'",
                           param=f"messages.{i}.role")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise APIError(400, f"messages.{i}.content: a string or a list of content blocks",
                           param=f"messages.{i}.content")
        text, calls = [], []
        for j, b in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_use" and role == "assistant":
                calls.append({"id": b.get("id"), "type": "function", "function": {
                    "name": b.get("name"), "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                result = _text(b.get("content") or "", f"{where}.content")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": f"Error: {result}" if b.get("is_error") else result})
            elif kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            else:
                raise APIError(400, f"{where}: content block of type {kind!r} is not supported here (this text "
                               f"model takes text, and {'tool_use' if role == 'assistant' else 'tool_result'} "
                               f"blocks in {role} messages)", param=where)
        if text or calls or not blocks:
            out.append({"role": role, "content": "".join(text), **({"tool_calls": calls} if calls else {})})
    return out


def _chat_request(req: MessagesRequest | CountRequest, messages: list[dict]) -> ChatRequest:
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if isinstance(req, MessagesRequest):
        body |= {"max_tokens": req.max_tokens, "temperature": req.temperature, "stop": req.stop_sequences}
        body |= {k: v for k, v in (("top_p", req.top_p), ("top_k", req.top_k)) if v is not None}
        if req.output_config and req.output_config.format:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": req.output_config.format.schema_}}
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") not in (None, "custom") or "input_schema" not in t:
                raise APIError(400, f"tool {t.get('name')!r}: only client tools with an input_schema are supported "
                               f"(not {t.get('type')!r})", param="tools")
            tools.append({"type": "function", "function": {"name": t.get("name"), "description":
                          t.get("description"), "parameters": t["input_schema"]}})
        body["tools"] = tools
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                               else {"auto": "auto", "any": "required", "none": "none"}[choice.type])
        body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return ChatRequest.translated(body)


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"] or "{}")}


def _stop(out: RequestOutput, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished output."""
    if called:
        return "tool_use", None
    if out.finish_reason == "length":
        return "max_tokens", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def _usage(job: ChatJob, out: RequestOutput) -> dict:
    return {"input_tokens": len(job.ids) - out.cached_tokens, "output_tokens": out.completion_tokens,
            "cache_read_input_tokens": out.cached_tokens, "cache_creation_input_tokens": 0}


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountRequest, request: Request):
    s = server(request)
    s.check_model(req.model)
    return {"input_tokens": len(chat_prompt(s, _chat_request(req, _messages(req)))[0])}


@router.post("/v1/messages")
async def create_message(req: MessagesRequest, request: Request):
    s = server(request)
    job = await prepare_chat(s, _chat_request(req, _messages(req)))
    s.admission.admit()
    rid = f"msg_{uuid.uuid4().hex[:24]}"
    base = {"id": rid, "type": "message", "role": "assistant", "model": job.model}
    if req.stream:
        return StreamingResponse(_events(s.run(job.ids, job.params, rid), base, job),
                                 media_type="text/event-stream")
    out = (await s.collect(job.ids, job.params, rid))[0]
    content, calls = job.reply(out.text)
    blocks = ([{"type": "text", "text": content}] if content else []) + [_tool_use(c) for c in calls]
    reason, sequence = _stop(out, bool(calls))
    return {**base, "content": blocks, "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(job, out)}


async def _events(outputs: AsyncIterator[RequestOutput], base: dict, job: ChatJob) -> AsyncIterator[str]:
    """Anthropic's event stream: message_start, each content block started, its deltas, stopped, then
    message_delta (stop reason, output tokens) and message_stop."""

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

    yield event("message_start", message={**base, "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": len(job.ids), "output_tokens": 0}})
    stream = job.stream()
    blocks = 0  # content blocks started; the last is open while `kind` names it
    kind: str | None = None
    placed: dict[int, int] = {}  # a tool call's index in the stream → its block's

    def start(block: dict) -> list[str]:
        nonlocal blocks, kind
        made = [event("content_block_stop", index=blocks - 1)] if kind else []
        made.append(event("content_block_start", index=blocks, content_block=block))
        blocks, kind = blocks + 1, block["type"]
        return made

    try:
        async for out in outputs:
            delta, calls = stream.feed(out.delta, out.finished) if stream else (out.delta, [])
            if delta:
                for e in start({"type": "text", "text": ""}) if kind != "text" else []:
                    yield e
                yield event("content_block_delta", index=blocks - 1, delta={"type": "text_delta", "text": delta})
            for d in calls:  # a call opens (its id and name), or more of its input comes
                if "id" in d:
                    for e in start({"type": "tool_use", "id": d["id"], "name": d["function"]["name"], "input": {}}):
                        yield e
                    placed[d["index"]] = blocks - 1
                if args := d["function"].get("arguments"):
                    yield event("content_block_delta", index=placed[d["index"]],
                                delta={"type": "input_json_delta", "partial_json": args})
            if out.finished:
                if kind:
                    yield event("content_block_stop", index=blocks - 1)
                reason, sequence = _stop(out, bool(stream and stream.calls))
                yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                            usage=_usage(job, out))
                yield event("message_stop")
    except APIError as e:  # after the 200 went out: an error event, and the stream ends
        yield event("error", error={"type": anthropic_type(e.status), "message": e.message})
