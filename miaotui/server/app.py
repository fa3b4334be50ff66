"""The OpenAI-compatible HTTP server: FastAPI over one AsyncEngine. Every error is an OpenAI error body."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from miaotui.engine.async_engine import AsyncEngine
from miaotui.engine.sequence import RequestOutput
from miaotui.server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("miaotui.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = r = CollectorRegistry()
        e = engine.engine
        Gauge("miaotui_requests_running", "Sequences in the running batch", registry=r).set_function(
            lambda: len(e.scheduler.running))
        Gauge("miaotui_requests_waiting", "Sequences waiting to be scheduled", registry=r).set_function(
            lambda: len(e.scheduler.waiting))
        Gauge("miaotui_kv_cache_usage", "Fraction of KV-cache blocks in use", registry=r).set_function(
            lambda: e.kv.usage)
        Gauge("miaotui_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", registry=r).set_function(
            lambda: e.kv.prefix_hits / e.kv.prefix_queries if e.kv.prefix_queries else 0.0)
        self.prompt_tokens = Counter("miaotui_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("miaotui_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("miaotui_time_to_first_token_seconds", "Time to first token", registry=r)
        self.tpot = Histogram("miaotui_time_per_output_token_seconds", "Time per output token", registry=r,
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.e2e = Histogram("miaotui_e2e_request_latency_seconds", "End-to-end request latency", registry=r)


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_waiting: int = 256) -> FastAPI:
    app = FastAPI(title="miaotui", version="0.1.0")
    core = engine.engine
    tok = core.tokenizer
    metrics = Metrics(engine)
    served = {model_name, core.loaded.files.name}

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed JSON body", "invalid_request_error")
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", "invalid_request_error",
                              param)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or invalid API key", "authentication_error",
                                      code="invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return error_response(413, f"request body of {length} bytes exceeds the {max_body_bytes}-byte limit",
                                  "invalid_request_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name not in served:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    inflight = 0  # admitted requests not yet finished; those beyond max_num_seqs are waiting

    def admit() -> None:
        nonlocal inflight
        if max(0, inflight - core.config.max_num_seqs) >= max_waiting:
            raise APIError(503, "the server is at capacity; retry shortly", "server_error",
                           headers={"Retry-After": "1"})
        inflight += 1

    def budget(prompt_len: int, asked: int | None, default: int | None) -> int:
        room = core.max_model_len - prompt_len
        max_tokens = asked if asked is not None else (default or room)
        if prompt_len + max_tokens > core.max_model_len:
            raise APIError(400, f"this model's context length is {core.max_model_len} tokens, but the prompt has "
                           f"{prompt_len} and max_tokens asks for {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    async def run(ids: list[int], params, rid: str) -> AsyncIterator[RequestOutput]:
        """Generate for an admitted request; logs it, records its metrics and releases its admission."""
        nonlocal inflight
        start = time.perf_counter()
        first = None
        finals: dict[int, RequestOutput] = {}
        status = "aborted"
        try:
            async for out in engine.generate(ids, params, rid):
                if first is None:
                    first = time.perf_counter()
                    metrics.ttft.observe(first - start)
                if out.finished:
                    finals[out.index] = out
                yield out
            status = "ok"
        except ValueError as e:
            status = "error"
            raise APIError(400, str(e)) from None
        finally:
            inflight -= 1
            done = time.perf_counter()
            gen = sum(o.completion_tokens for o in finals.values())
            metrics.prompt_tokens.inc(len(ids))
            metrics.generated_tokens.inc(gen)
            metrics.e2e.observe(done - start)
            if first is not None and gen > 1:
                metrics.tpot.observe((done - first) / max(1, gen - len(finals)))
            log.info("%s prompt=%d completion=%d ttft=%s duration=%.0fms status=%s", rid, len(ids), gen,
                     f"{(first - start) * 1000:.0f}ms" if first else "-", (done - start) * 1000, status)

    async def collect(ids: list[int], params, rid: str) -> dict[int, RequestOutput]:
        """The final output of each of the request's samples (the non-streaming responses)."""
        finals: dict[int, RequestOutput] = {}
        async for out in run(ids, params, rid):
            if out.finished:
                finals[out.index] = out
        return finals

    def usage(prompt_len: int, outs: dict[int, RequestOutput]) -> dict:
        comp = sum(o.completion_tokens for o in outs.values())
        return {"prompt_tokens": prompt_len, "completion_tokens": comp, "total_tokens": prompt_len + comp}

    def lp_completion(out: RequestOutput) -> dict | None:
        if out.logprobs is None or not out.logprobs:
            return None
        return {"tokens": [tok.token_text(t.token_id) for t in out.logprobs],
                "token_logprobs": [t.logprob for t in out.logprobs],
                "top_logprobs": [{tok.token_text(i): v for i, v in t.top.items()} for t in out.logprobs]}

    def lp_chat(items) -> dict:
        return {"content": [{"token": tok.token_text(t.token_id), "logprob": t.logprob,
                             "bytes": list(tok.token_text(t.token_id).encode()),
                             "top_logprobs": [{"token": tok.token_text(i), "logprob": v,
                                               "bytes": list(tok.token_text(i).encode())}
                                              for i, v in t.top.items() if i != t.token_id or len(t.top) == 1]}
                            for t in items]}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # -- endpoints --------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse((files("miaotui.server") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "miaotui", "max_model_len": core.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if req.messages is not None:
            ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": core.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < core.model_config.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        ids = tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        params = req.sampling_params(budget(len(ids), req.max_tokens, 16), req.logprobs)
        admit()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prefix = (req.prompt if isinstance(req.prompt, str) else tok.decode(ids)) if req.echo else ""

        def choice(out: RequestOutput, text: str, finished: bool) -> dict:
            return {"index": out.index, "text": text, "logprobs": lp_completion(out) if finished else None,
                    "finish_reason": out.finish_reason if finished else None}

        if req.stream:
            async def stream():
                finals: dict[int, RequestOutput] = {}
                echoed: set[int] = set()
                async for out in run(ids, params, rid):
                    text = out.delta if out.index in echoed or not prefix else prefix + out.delta
                    echoed.add(out.index)
                    if out.finished:
                        finals[out.index] = out
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [choice(out, text, out.finished)]})
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(len(ids), finals)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        finals = await collect(ids, params, rid)
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [choice(o, prefix + o.text, True) for _, o in sorted(finals.items())],
                "usage": usage(len(ids), finals)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req.model)
        if not tok.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(budget(len(ids), req.max_completion_tokens or req.max_tokens, None), top)
        admit()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        if req.stream:
            async def stream():
                finals: dict[int, RequestOutput] = {}
                started: set[int] = set()
                sent_lp: dict[int, int] = {}
                async for out in run(ids, params, rid):
                    delta: dict[str, Any] = {}
                    if out.index not in started:
                        started.add(out.index)
                        delta["role"] = "assistant"
                    if out.delta:
                        delta["content"] = out.delta
                    c: dict[str, Any] = {"index": out.index, "delta": delta,
                                         "finish_reason": out.finish_reason if out.finished else None}
                    if req.logprobs:
                        n = sent_lp.get(out.index, 0)
                        c["logprobs"] = lp_chat(out.logprobs[n:])
                        sent_lp[out.index] = len(out.logprobs)
                    if out.finished:
                        finals[out.index] = out
                    yield sse({**base, "choices": [c]})
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({**base, "choices": [], "usage": usage(len(ids), finals)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        finals = await collect(ids, params, rid)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                             "logprobs": lp_chat(o.logprobs) if req.logprobs else None,
                             "finish_reason": o.finish_reason} for _, o in sorted(finals.items())],
                "usage": usage(len(ids), finals)}

    return app
