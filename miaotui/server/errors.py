"""Errors as OpenAI's API returns them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status (and
as Anthropic's does on its Messages API's paths)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("miaotui.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


# Anthropic's error types by status, for its Messages API's paths (server/messages.py).
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ANTHROPIC.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None, path: str = "") -> JSONResponse:
    """OpenAI's error body; on the Messages API's paths (`path`), Anthropic's, which its SDK reads."""
    if path.startswith("/v1/messages"):
        body: dict = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    else:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Every error the app raises, and every malformed body, answered with an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        path = request.url.path
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed JSON body", "invalid_request_error", path=path)
        # pydantic names the union member it tried ("literal['a','b']", "NamedToolChoice"): not part of the field
        loc = [str(x) for x in first.get("loc", []) if x != "body" and not _union_member(str(x))]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unsupported parameter: {param}", "invalid_request_error", param,
                                  code="unsupported_parameter", path=path)
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")[:200]  # (a validator's own)
        return error_response(400, f"{param or 'body'}: {msg}", "invalid_request_error", param, path=path)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):  # unknown route, wrong method
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404 and not request.url.path.startswith("/v1"):
            message += " (the OpenAI API is under /v1)"
        return error_response(e.status_code, message, "invalid_request_error" if e.status_code < 500 else
                              "server_error", headers=getattr(e, "headers", None), path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a fault of ours, not of the request: logged, 500
        log.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error", path=request.url.path)


def _union_member(part: str) -> bool:
    return "[" in part or part[:1].isupper()
