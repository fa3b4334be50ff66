"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`), the one agent SDKs use: a request is
turned into a chat request (input items → messages, `instructions` → a system message, flat function tools →
chat tools, `text.format` → response_format) and runs through the same preparation as chat completions
(routes.prepare_chat: template, tool grammar, constraints, limits); its output comes back as Responses items —
`message` with `output_text`, `function_call` — with Responses usage, or streamed as the Responses event types.
Responses are stored (unless `store: false`) in a bounded, expiring store, so `previous_response_id` continues a
conversation."""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from miaotui.engine.sequence import RequestOutput
from miaotui.server.errors import APIError
from miaotui.server.protocol import ChatRequest, _Strict
from miaotui.server.routes import Server, chat_prompt, prepare_chat, server

router = APIRouter()
STORE_SIZE = 1024  # responses kept for previous_response_id, the oldest dropped first
STORE_SECONDS = 3600.0


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None  # auto: the oldest turns dropped to fit the context
    service_tier: Literal["auto", "default"] | None = None
    include: list[str] | None = None  # extra output data; agent SDKs send the list even when empty

    @field_validator("include")
    @classmethod
    def _nothing_extra(cls, v: list[str] | None):
        if v:
            raise ValueError(f"{v[0]!r} is not something this server can include (none is)")
        return v


class ResponseStore:
    """The conversations of recent responses (messages in, then the response's own output as messages)."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, tuple[float, list[dict], dict]] = OrderedDict()

    def put(self, rid: str, messages: list[dict], response: dict) -> None:
        self.items[rid] = (time.monotonic(), messages, response)
        while len(self.items) > STORE_SIZE:
            self.items.popitem(last=False)

    def get(self, rid: str) -> tuple[list[dict], dict] | None:
        found = self.items.get(rid)
        if found is None or time.monotonic() - found[0] > STORE_SECONDS:
            self.items.pop(rid, None)
            return None
        return found[1], found[2]


def _store(request: Request) -> ResponseStore:
    state = request.app.state
    if not hasattr(state, "responses"):
        state.responses = ResponseStore()
    return state.responses


def _messages(items: str | list[dict[str, Any]]) -> list[dict]:
    """Responses input items as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") not in ("input_text", "output_text", "text"):
                        raise APIError(400, f"input[{i}]: content part {part.get('type')!r} is not supported by "
                                       "this text model", param=f"input.{i}.content")
                    parts.append(part.get("text", ""))
                content = "".join(parts)
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"input[{i}]: unknown role {item.get('role')!r}", param=f"input.{i}.role")
            out.append({"role": item["role"], "content": content or ""})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output", ""))})
        else:
            raise APIError(400, f"input[{i}]: item type {kind!r} is not supported", param=f"input.{i}.type")
    return out


def _chat_request(req: ResponsesRequest, messages: list[dict]) -> ChatRequest:
    body: dict[str, Any] = {"model": req.model, "messages": messages, "temperature": req.temperature,
                            "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") != "function":
                raise APIError(400, f"tool type {t.get('type')!r} is not supported (function tools only)",
                               param="tools")
            tools.append({"type": "function", "function": {k: v for k, v in t.items() if k != "type"}})
        body["tools"] = tools
    if isinstance(req.tool_choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.get("name")}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    f = req.text.format if req.text else None
    if f is not None and f.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif f is not None and f.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": f.name or "output", "schema": f.schema_, "strict": f.strict}}
    return ChatRequest.translated(body)


def _fitted(s: Server, req: ResponsesRequest, messages: list[dict]) -> list[dict]:
    """truncation "auto" (OpenAI's: items dropped from the beginning of the conversation): the fewest oldest turns
    dropped — whole turns, so what is left starts at a user message; a leading system message stays — that let the
    prompt and max_output_tokens fit the context. Where even the last turn alone does not fit, it is returned and
    the request's 400 says why."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    cuts = [0, *(i for i, m in enumerate(rest) if i and m["role"] == "user")]

    def fits(j: int) -> bool:
        ids = chat_prompt(s, _chat_request(req, head + rest[cuts[j]:]))[0]
        try:
            s.admission.max_tokens(len(ids), req.max_output_tokens, None)
        except APIError:
            return False
        return True

    lo, hi = 0, len(cuts) - 1  # fits() is false below the answer, true from it on (fewer turns, shorter prompt)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return head + rest[cuts[lo]:]


def _usage(prompt: int, out: RequestOutput) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + out.completion_tokens}


def _message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _call_item(call: dict) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request):
    s = server(request)
    store = _store(request)
    history: list[dict] = []
    if req.previous_response_id is not None:
        found = store.get(req.previous_response_id)
        if found is None:
            raise APIError(404, f"previous response {req.previous_response_id!r} not found (responses are kept "
                           f"{STORE_SECONDS / 3600:g} h, {STORE_SIZE} at most)", param="previous_response_id")
        history = [m for m in found[0] if m["role"] != "system"]
    messages = history + _messages(req.input)
    if req.instructions:
        messages = [{"role": "system", "content": req.instructions}, *messages]
    if not messages:
        raise APIError(400, "input is empty", param="input")
    sent = _fitted(s, req, messages) if req.truncation == "auto" else messages
    job = await prepare_chat(s, _chat_request(req, sent))
    s.admission.admit()
    rid = f"resp_{uuid.uuid4().hex[:24]}"
    base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": job.model,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": req.tools or [],
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text and req.text.format else {"type": "text"}},
            "metadata": req.metadata or {}, "store": req.store, "truncation": req.truncation or "disabled",
            "error": None,
            "reasoning": None, "user": req.user}

    def finish(out: RequestOutput, output: list[dict]) -> dict:
        incomplete = out.finish_reason == "length"
        response = {**base, "status": "incomplete" if incomplete else "completed",
                    "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                    "output": output, "usage": _usage(len(job.ids), out)}
        if req.store:
            replies = [{"role": "assistant", "content": i["content"][0]["text"]} if i["type"] == "message" else
                       {"role": "assistant", "content": "", "tool_calls": [{"id": i["call_id"], "type": "function",
                        "function": {"name": i["name"], "arguments": i["arguments"]}}]} for i in output]
            store.put(rid, messages + replies, response)
        return response

    def items(text: str) -> list[dict]:
        content, calls = job.reply(text)
        return ([_message_item(content)] if content else []) + [_call_item(c) for c in calls]

    if not req.stream:
        finals = await s.collect(job.ids, job.params, rid)
        return finish(finals[0], items(finals[0].text))
    return StreamingResponse(_events(s.run(job.ids, job.params, rid), base, job, finish),
                             media_type="text/event-stream")


async def _events(outputs: AsyncIterator[RequestOutput], base: dict, job, finish) -> AsyncIterator[str]:
    """The Responses event stream: created, in_progress, per item added → deltas → done, completed."""
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"

    started = {**base, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    output: list[dict] = []
    text_item: dict | None = None
    text = ""
    stream = job.stream()
    placed: dict[int, int] = {}  # a call's index in the stream → its item's in `output`
    whole: list[dict] = []  # the stream's calls whose items are done

    def close_text():
        nonlocal text_item
        item = {**text_item, "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        index = len(output)
        output.append(item)
        text_item = None
        return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=item["content"][0]),
                event("response.output_item.done", output_index=index, item=item)]

    try:
        async for out in outputs:
            delta, calls = (stream.feed(out.delta, out.finished) if stream else (out.delta, []))
            if delta:
                if text_item is None:
                    text_item = _message_item("", "in_progress")
                    yield event("response.output_item.added", output_index=len(output), item=text_item)
                    yield event("response.content_part.added", item_id=text_item["id"], output_index=len(output),
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                text += delta
                yield event("response.output_text.delta", item_id=text_item["id"], output_index=len(output),
                            content_index=0, delta=delta)
            for d in calls:  # a call opens (its id and name), or more of its arguments come
                if "id" in d:
                    if text_item is not None:
                        for e in close_text():
                            yield e
                    placed[d["index"]] = len(output)
                    output.append({**_call_item(d), "arguments": "", "status": "in_progress"})
                    yield event("response.output_item.added", output_index=len(output) - 1, item=output[-1])
                index = placed[d["index"]]
                if args := d["function"].get("arguments"):
                    output[index]["arguments"] += args
                    yield event("response.function_call_arguments.delta", item_id=output[index]["id"],
                                output_index=index, delta=args)
            for call in stream.calls[len(whole):] if stream else []:  # calls now whole
                whole.append(call)
                index = placed[call["index"]]
                output[index] = item = {**output[index], "arguments": call["function"]["arguments"],
                                        "status": "completed"}
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            if out.finished:
                if text_item is not None:
                    for e in close_text():
                        yield e
                for index, item in enumerate(output):  # a call cut short (max_output_tokens)
                    if item["status"] == "in_progress":
                        output[index] = {**item, "status": "incomplete"}
                        yield event("response.output_item.done", output_index=index, item=output[index])
                yield event("response.completed", response=finish(out, output))
    except APIError as e:  # after the 200 went out: an error event, and the stream ends
        yield event("error", code=e.code or e.type, message=e.message, param=e.param)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    found = _store(request).get(response_id)
    if found is None:
        raise APIError(404, f"response {response_id!r} not found", param="response_id", code="not_found")
    return found[1]
