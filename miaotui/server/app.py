"""The OpenAI-compatible HTTP server: FastAPI over one engine (this process's AsyncEngine, or replicas on Ray).
`create_app` wires the parts together: the request guard (API key, body size), OpenAI error bodies (errors.py),
admission (admission.py), metrics (metrics.py) and the endpoints (routes.py)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from miaotui.engine.async_engine import ServingEngine
from miaotui.server import errors
from miaotui.server.admission import Admission
from miaotui.server.embeddings import EmbeddingService
from miaotui.server.embeddings import router as embeddings_router
from miaotui.server.errors import error_response
from miaotui.server.messages import router as messages_router
from miaotui.server.metrics import Metrics
from miaotui.server.responses import router as responses_router
from miaotui.server.routes import Server, router

OPEN_PATHS = ("/", "/health", "/metrics")  # answered without the API key: the page asks for it itself
LOOPBACK_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"  # `--allowed-origins localhost`: any port


@dataclass
class ServerLimits:
    """What one request may ask of the server; beyond these it gets a 4xx, never a 5xx."""

    max_body_bytes: int = 1 << 20
    max_waiting: int = 256  # queued requests past the running batch; more get 503
    max_prompt_tokens: int | None = None  # default: the context length
    max_request_tokens: int | None = None  # n × max_tokens; default: n × the context length
    allowed_origins: tuple[str, ...] = ()  # browser origins (CORS) that may call the API; "*" for any,
    # "localhost" for pages served from this machine on any port
    allow_credentials: bool = False  # CORS answers carry Allow-Credentials (and name the origin instead of "*")
    allowed_methods: tuple[str, ...] = ("*",)  # methods and request headers a preflight may ask for
    allowed_headers: tuple[str, ...] = ("*",)
    protect_metrics: bool = False  # /metrics asks for the API key too
    default_max_tokens: int | None = None  # for requests without max_tokens (default: 16 on completions, as
    # OpenAI's; the rest of the context on chat)


class BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or sent chunked without one: the body
    is read (up to the limit) before the app sees it, then replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send, length.decode("latin-1"))
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending
                return
            body.append(message.get("body", b""))
            size += len(body[-1])
            if size > self.max_bytes:
                return await self._refuse(send, f"more than {self.max_bytes}")
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response watches for

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        response = error_response(413, f"request body of {size} bytes exceeds the {self.max_bytes}-byte limit",
                                  "invalid_request_error", code="request_too_large")
        await response({"type": "http"}, _no_body, send)


class CORS(CORSMiddleware):
    """Starlette's CORS, except that a refused preflight (an origin, method or header not allowed) is answered 200
    without the grant it asked for, as llama-server, Django's and Go's CORS handlers answer, not 400. The browser
    blocks the call either way; with a 200 its console names the real cause ("No 'Access-Control-Allow-Origin'
    header", "Method DELETE is not allowed") instead of "It does not have HTTP ok status"."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            response.status_code = 200
        return response


class CanonicalHeaderNames:
    """Response header names in their usual spelling (`Content-Type`, `Access-Control-Allow-Origin`), as most
    servers write them. Names are case-insensitive in HTTP, but clients that copy headers into a plain dict look
    them up by that spelling (llama.cpp's server tests do); Starlette writes them in lower case."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_canonical(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(b"-".join(w.capitalize() for w in name.split(b"-")), value)
                                                  for name, value in message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, send_canonical)


class AnswerWhenCancelled:
    """A request still running when uvicorn's grace period ends is cancelled, and uvicorn answers it with a bare
    text/plain 500. The drain timer fails running requests with a 503 first, but an engine step that outlasts the
    margin (a starved CPU) can miss it: this answers such a request with the same OpenAI 503 instead."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            if started:  # mid-stream: nothing to answer with; the connection closes
                raise
            response = error_response(503, "the server is shutting down: grace period over", "server_error",
                                      code="server_shutting_down", headers={"Retry-After": "1"})
            await response(scope, receive, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def create_app(engine: ServingEngine, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None, embeddings: EmbeddingService | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    limits = limits or ServerLimits()
    app = FastAPI(title="miaotui", version="0.1.0")
    prompt_cap = min(limits.max_prompt_tokens or engine.max_model_len, engine.max_model_len)
    app.state.miaotui = Server(engine, model_name,
                               Admission(engine.max_num_seqs, limits.max_waiting, engine.max_model_len, prompt_cap,
                                         limits.max_request_tokens, limits.default_max_tokens),
                               Metrics(engine), aliases, embedding_model=embeddings.name if embeddings else None)
    app.state.embeddings = embeddings
    errors.install(app)
    open_paths = tuple(p for p in OPEN_PATHS if not (limits.protect_metrics and p == "/metrics"))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key and request.url.path not in open_paths:
            # OpenAI's clients send the key as a bearer token, Anthropic's in x-api-key
            given = request.headers.get("authorization") or f"Bearer {request.headers.get('x-api-key', '')}"
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or invalid API key", "authentication_error",
                                      code="invalid_api_key", path=request.url.path)
        return await call_next(request)

    app.add_middleware(AnswerWhenCancelled)  # inside CORS and header spelling, so its 503 gets both
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if limits.allowed_origins:  # outermost: a preflight is answered before authentication, as browsers need
        exact = [o for o in limits.allowed_origins if o != "localhost"]
        app.add_middleware(CORS, allow_origins=exact, allow_methods=list(limits.allowed_methods),
                           allow_headers=list(limits.allowed_headers), allow_credentials=limits.allow_credentials,
                           max_age=600,
                           allow_origin_regex=LOOPBACK_ORIGIN if "localhost" in limits.allowed_origins else None)
    app.add_middleware(CanonicalHeaderNames)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(messages_router)
    app.include_router(embeddings_router)
    return app
