"""Connection-level guards under the app, in uvicorn's HTTP protocol: a client must send its whole request (head and
body) within a deadline, so a slow sender (slowloris) cannot hold a connection open forever, and connections past a
cap are refused with an OpenAI-style 503 instead of piling up. uvicorn's own keep-alive timer is reset by every byte
and its concurrency limit answers in plain text, hence this subclass."""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_WAITING_FOR_CLIENT = (h11.IDLE, h11.SEND_BODY)


def _raw_response(status: int, reason: str, message: str, type_: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def guarded_protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request to arrive and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.write(_raw_response(503, "Service Unavailable", "too many open connections; retry shortly",
                                              "server_error"))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state not in _WAITING_FOR_CLIENT:  # the request is in: the app takes its time
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in _WAITING_FOR_CLIENT:
                return
            if self.conn.their_state is h11.SEND_BODY or self.conn.trailing_data[0]:  # part of a request came
                self.transport.write(_raw_response(408, "Request Timeout", f"the request did not arrive within "
                                                   f"{read_timeout:g} s", "invalid_request_error"))
            self.transport.close()

    return GuardedH11Protocol
