"""Tool calling in the Hermes / Qwen syntax the chat templates of Qwen2.5 (and many others) teach their models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The tools are rendered by the model's own chat template. `tool_choice` "required" or a named function constrain the
output with a grammar (llguidance's Lark with inline JSON schemas: the name is one of the tools', the arguments
follow that tool's parameter schema); "auto" constrains a reply that starts a call and leaves prose free. The text
is parsed into OpenAI's `tool_calls` after generation, or while streaming by `ToolCallStream`, which holds back any
text that may be the start of a tag, so no tag ever reaches `content`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from miaotui.engine.structured import JSON_WHITESPACE
from miaotui.sampling import StructuredOutput
from miaotui.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def tags_are_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tags are tokens of their own (Qwen2.5's are): the grammar then names those tokens."""
    return any(t.content == OPEN for t in tokenizer.backend.get_added_tokens_decoder().values())


def tool_grammar(tools: list[dict], choice: str | dict, parallel: bool, tag_tokens: bool) -> StructuredOutput | None:
    """The constraint for a tool_choice: None for "none"; calls only for "required" or a named function; for
    "auto", free prose (not starting with a tag) or calls."""
    if choice == "none":
        return None
    open_, close = (OPEN, CLOSE) if tag_tokens else (f'"{OPEN}"', f'"{CLOSE}"')
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    options = [t["function"] for t in tools if named is None or t["function"]["name"] == named]
    schema = {"oneOf": [{"type": "object", "properties": {
        "name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for f in options],
        "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    calls = "call+" if parallel else "call"
    lark = (f"start: {calls}\n"
            f'call: {open_} "\\n" %json {json.dumps(schema)} "\\n" {close} "\\n"?\n')
    if choice == "auto":
        lark = lark.replace("start:", "start: TEXT |", 1) + "TEXT: /[^<](.|\\n)*/\n"
    return StructuredOutput(grammar=lark)


def _call(body: str) -> dict | None:
    """One OpenAI tool call from the JSON between the tags, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def parse(text: str) -> tuple[str | None, list[dict]]:
    """The reply's prose (None if there is none) and its tool calls."""
    calls = [c for m in _CALL.finditer(text) if (c := _call(m.group(1))) is not None]
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


@dataclass
class ToolCallStream:
    """Turns streamed text into content deltas and tool-call deltas (`index`, `id`, `function.name`, then the
    arguments), holding back text that may be the start of a tag."""

    pending: str = ""  # text not yet sent: a possible tag start, or an open call
    calls: list[dict] = field(default_factory=list)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        self.pending += delta
        content, deltas = "", []
        while self.pending:
            start = self.pending.find(OPEN)
            if start == -1:
                keep = 0 if final else _tag_prefix(self.pending)
                content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            end = self.pending.find(CLOSE, start)
            if end == -1:
                self.pending = self.pending[start:]
                if final:  # an unfinished call at the end: it was never a call; hand it back as text
                    content += self.pending
                    self.pending = ""
                break
            call = _call(self.pending[start + len(OPEN): end].strip())
            self.pending = self.pending[end + len(CLOSE):].lstrip("\n")
            if call is None:
                continue
            index = len(self.calls)
            self.calls.append(call)
            deltas.append({"index": index, "id": call["id"], "type": "function",
                           "function": {"name": call["function"]["name"], "arguments": ""}})
            deltas.append({"index": index, "function": {"arguments": call["function"]["arguments"]}})
        if self.calls and not content.strip():  # the line breaks between and after calls
            content = ""
        return content, deltas


def _tag_prefix(text: str) -> int:
    """Length of the longest end of `text` that begins the open tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
