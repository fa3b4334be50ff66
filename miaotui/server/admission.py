"""What the server admits: requests beyond the queue's limit get 503 (with Retry-After), and a prompt plus
max_tokens must fit the context."""

from __future__ import annotations

from miaotui.server.errors import APIError


class Admission:
    def __init__(self, max_num_seqs: int, max_waiting: int, max_model_len: int):
        self.max_num_seqs, self.max_waiting, self.max_model_len = max_num_seqs, max_waiting, max_model_len
        self.inflight = 0  # admitted requests not yet finished; those beyond max_num_seqs are waiting

    def admit(self) -> None:
        if max(0, self.inflight - self.max_num_seqs) >= self.max_waiting:
            raise APIError(503, "the server is at capacity; retry shortly", "server_error",
                           headers={"Retry-After": "1"})
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def max_tokens(self, prompt_len: int, asked: int | None, default: int | None) -> int:
        """The request's max_tokens (or the default, else the rest of the context); 400 when it does not fit."""
        room = self.max_model_len - prompt_len
        max_tokens = asked if asked is not None else (default or room)
        if prompt_len + max_tokens > self.max_model_len:
            raise APIError(400, f"this model's context length is {self.max_model_len} tokens, but the prompt has "
                           f"{prompt_len} and max_tokens asks for {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens
