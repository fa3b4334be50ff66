"""What the server admits: requests beyond the queue's limit get 503 (with Retry-After); a prompt plus max_tokens
must fit the context, the prompt the prompt limit, and n × max_tokens the per-request limit (each a 400)."""

from __future__ import annotations

from miaotui.server.errors import APIError


class Admission:
    def __init__(self, max_num_seqs: int, max_waiting: int, max_model_len: int, max_prompt_tokens: int | None = None,
                 max_request_tokens: int | None = None, default_max_tokens: int | None = None):
        self.max_num_seqs, self.max_waiting, self.max_model_len = max_num_seqs, max_waiting, max_model_len
        self.max_prompt_tokens = max_prompt_tokens or max_model_len
        self.max_request_tokens = max_request_tokens
        self.default_max_tokens = default_max_tokens  # the operator's, for requests that set none
        self.inflight = 0  # admitted requests not yet finished; those beyond max_num_seqs are waiting

    def admit(self) -> None:
        if max(0, self.inflight - self.max_num_seqs) >= self.max_waiting:
            raise APIError(503, "the server is at capacity; retry shortly", "server_error",
                           headers={"Retry-After": "1"})
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def max_tokens(self, prompt_len: int, asked: int | None, default: int | None, n: int = 1,
                   prompt_param: str = "messages") -> int:
        """The request's max_tokens (or the server's default, else the endpoint's, else the rest of the context);
        400 when it does not fit."""
        room = self.max_model_len - prompt_len
        if room < 1 or prompt_len > self.max_prompt_tokens:
            limit = min(self.max_prompt_tokens, self.max_model_len - 1)
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server takes at most {limit} (the "
                           f"context length is {self.max_model_len})", param=prompt_param,
                           code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(self.default_max_tokens or default or room, room)
        if prompt_len + max_tokens > self.max_model_len:
            raise APIError(400, f"this model's context length is {self.max_model_len} tokens, but the prompt has "
                           f"{prompt_len} and max_tokens asks for {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        if self.max_request_tokens is not None and n * max_tokens > self.max_request_tokens:
            raise APIError(400, f"n × max_tokens = {n} × {max_tokens} exceeds this server's limit of "
                           f"{self.max_request_tokens} tokens per request", param="max_tokens")
        return max_tokens
