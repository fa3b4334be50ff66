"""Server-sent events, shared by completions and chat: one chunk per engine output, then a usage chunk when the
client asked for it, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from miaotui.engine.sequence import RequestOutput
from miaotui.server.errors import APIError


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_len: int, outs: dict[int, RequestOutput]) -> dict:
    comp = sum(o.completion_tokens for o in outs.values())
    cached = max((o.cached_tokens for o in outs.values()), default=0)
    return {"prompt_tokens": prompt_len, "completion_tokens": comp, "total_tokens": prompt_len + comp,
            "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": 0}}


def stream_response(outputs: AsyncIterator[RequestOutput], base: dict,
                    choice: Callable[[RequestOutput], dict | list[dict]], prompt_len: int,
                    include_usage: bool) -> StreamingResponse:
    """`base` (id, object, created, model, system_fingerprint) on every chunk; `choice(out)` turns an output into
    its choice, or into several, each then a chunk of its own."""

    async def events() -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        try:
            async for out in outputs:
                if out.finished:
                    finals[out.index] = out
                made = choice(out)
                for c in made if isinstance(made, list) else [made]:
                    yield sse({**base, "choices": [c]})
        except APIError as e:  # after the 200 went out: the error travels as an event, then the stream ends
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_len, finals)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
