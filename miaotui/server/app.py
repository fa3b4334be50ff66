"""The OpenAI-compatible HTTP server: FastAPI over one AsyncEngine. `create_app` wires the parts together: the
request guard (API key, body size), OpenAI error bodies (errors.py), admission (admission.py), metrics
(metrics.py) and the endpoints (routes.py)."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request

from miaotui.engine.async_engine import AsyncEngine
from miaotui.server import errors
from miaotui.server.admission import Admission
from miaotui.server.errors import error_response
from miaotui.server.metrics import Metrics
from miaotui.server.routes import Server, router


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_waiting: int = 256) -> FastAPI:
    app = FastAPI(title="miaotui", version="0.1.0")
    app.state.miaotui = Server(engine, model_name, Admission(engine.max_num_seqs, max_waiting, engine.max_model_len),
                               Metrics(engine))
    errors.install(app)

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

    app.include_router(router)
    return app
