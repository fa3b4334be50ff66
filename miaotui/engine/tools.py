"""Tool calling in the two syntaxes chat templates teach their models.

Hermes / Qwen (Qwen2.5's template and many others) wrap each call in tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Llama 3.x style templates ask for the bare JSON object as the whole reply, `parameters` for the arguments, several
calls separated by `;`, optionally after a `<|python_tag|>` token:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

`syntax_for` picks the one the model's template uses. The tools are rendered by that template. `tool_choice`
"required" or a named function constrain the whole reply with a grammar (llguidance's Lark with inline JSON schemas:
the name is one of the tools', the arguments follow that tool's parameter schema); "auto" leaves prose free and
switches the grammar on where a call starts. The text is parsed into OpenAI's `tool_calls` after generation, or while
streaming by the syntax's stream, which holds back any text that may belong to a call, so no call syntax ever
reaches `content`.

Left free ("auto"), small models often drop the Hermes tags and answer with the bare call object, or with it in a
```json fence (Qwen2.5-Coder 0.5B and 1.5B did so on every weather question tried): a reply that is nothing but call
objects naming the given tools is read as those calls in either syntax, as llama.cpp's parsers do."""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from miaotui.engine.structured import JSON_WHITESPACE
from miaotui.sampling import StructuredOutput
from miaotui.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_BLANK = " \t\r\n"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)

Deltas = list[dict[str, Any]]


class ToolStream(ABC):
    """Streamed text in, content deltas and OpenAI tool-call deltas out, as OpenAI streams them: a call's first delta
    has its `index`, `id`, `type` and `function` name (and its arguments so far), later ones more of its arguments
    under the same `index`. `calls` holds each call once it is whole (with its `index`)."""

    calls: list[dict]
    parallel: bool  # False: the first call only (parallel_tool_calls)

    @abstractmethod
    def feed(self, delta: str, final: bool = False) -> tuple[str, Deltas]: ...

    def _emit(self, call: dict) -> Deltas:
        """A finished call as one delta (id, name and the whole arguments); none past the first unless parallel."""
        if self.calls and not self.parallel:
            return []
        self.calls.append({"index": len(self.calls), **call})
        return [self.calls[-1]]


class ToolSyntax(ABC):
    """How one family of chat templates writes tool calls: the grammar that enforces a tool_choice, the parser of a
    finished reply and the parser of a streamed one."""

    parser: ClassVar[str]  # its name among vLLM's --tool-call-parser choices

    @abstractmethod
    def grammar(self, tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutput | None:
        """The constraint for a tool_choice: None for "none"."""

    def parse(self, text: str, tools: list[dict], parallel: bool = True) -> tuple[str | None, list[dict]]:
        """The reply's prose (None if there is none) and its tool calls (`tools`: those the request gave; the first
        call only unless `parallel`: a grammar holds tagged calls to one, bare ones are read after the fact)."""
        content, calls = self._parse(text, tools)
        return content, calls if parallel else calls[:1]

    @abstractmethod
    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]: ...

    @abstractmethod
    def stream(self, tools: list[dict], parallel: bool = True) -> ToolStream: ...


def syntax_for(tokenizer: Tokenizer) -> ToolSyntax:
    """The syntax the model's chat template teaches: Hermes tags if the template names them, else Llama's JSON."""
    template = tokenizer.chat_template or ""
    specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    if OPEN in template:
        return HermesSyntax(tag_tokens=OPEN in specials)
    return JsonSyntax(key="parameters" if '"parameters"' in template else "arguments",
                      python_tag=PYTHON_TAG in specials)


def _call_schema(tools: list[dict], choice: str | dict, key: str) -> str:
    """One JSON schema for a call to any of the allowed tools: a oneOf over the tools, each with its name as a const
    and its parameter schema under `key`."""
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    options = [t["function"] for t in tools if named is None or t["function"]["name"] == named]
    schema = {"oneOf": [{"type": "object", "properties": {
        "name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
        "required": ["name", key], "additionalProperties": False} for f in options],
        "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return json.dumps(schema)


def _call(obj: Any) -> dict | None:
    """One OpenAI tool call from a parsed call object, or None if it is not one (its arguments must be an object,
    or a string holding one, as some models write them: clients parse `arguments` as a JSON object)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args)}}


def _bare_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """The calls when `text` is nothing but call objects naming given tools, each bare or in a ```json fence, apart
    by `;` or blank space; None if it is anything else."""
    names = {t["function"]["name"] for t in tools}
    decoder, calls, at = json.JSONDecoder(), [], 0
    while (at := _skip(text, at, ";" + _BLANK)) < len(text):
        fenced = text.startswith("```", at)
        if fenced:
            at = _skip(text, at + 3 + 4 * text.startswith("json", at + 3), _BLANK)
        doubled = text.startswith("{{", at)  # as a template that shows its call example in doubled braces teaches
        try:
            obj, at = decoder.raw_decode(text, at + doubled)
        except json.JSONDecodeError:
            return None
        if doubled:
            if not text.startswith("}", at):
                return None
            at += 1
        if (call := _call(obj)) is None or call["function"]["name"] not in names:
            return None
        calls.append(call)
        if fenced:
            at = _skip(text, at, _BLANK)
            if not text.startswith("```", at):
                return None
            at += 3
    return calls or None


def _skip(text: str, at: int, chars: str) -> int:
    while at < len(text) and text[at] in chars:
        at += 1
    return at


def _opens_call(text: str) -> bool | None:
    """Whether a reply that begins with `text` begins as a bare call (`{"name":`, maybe after a ```json fence
    line): True, False, or None while `text` is too short to tell."""
    at = _skip(text, 0, _BLANK)

    def cut(word: str) -> bool:  # the text ends inside `word`
        return len(text) - at < len(word) and word.startswith(text[at:])

    if cut("```"):
        return None
    if text.startswith("```", at):
        at += 3
        if cut("json"):
            return None
        at = _skip(text, at + 4 * text.startswith("json", at), _BLANK)
    for word in ("{", '"name"', ":"):
        if cut(word):
            return None
        if not text.startswith(word, at):
            return False
        at = _skip(text, at + len(word) + (word == "{" and text.startswith("{{", at)), _BLANK)
    return True


def _loads(body: str) -> Any:
    """A call's JSON; also in doubled braces, `{{"name": ...}}`, as Qwen2.5-Coder-1.5B's own template shows the
    call format (its tool instructions print `{{\"name\": <function-name>, ...}}` verbatim) and the model writes."""
    for text in (body, body[1:-1]) if body.startswith("{{") and body.endswith("}}") else (body,):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return None


@dataclass(frozen=True)
class HermesSyntax(ToolSyntax):
    """`<tool_call>` JSON `</tool_call>`; the tags are tokens of their own in Qwen2.5's vocabulary, and a grammar
    must then name the tokens (text lexemes never produce special tokens)."""

    tag_tokens: bool = True
    parser: ClassVar[str] = "hermes"  # vLLM's --tool-call-parser name for it

    def grammar(self, tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutput | None:
        if choice == "none":
            return None
        open_, close = (OPEN, CLOSE) if self.tag_tokens else (f'"{OPEN}"', f'"{CLOSE}"')
        rules = (f'call: {open_} body\n'
                 f'body: "\\n" %json {_call_schema(tools, choice, "arguments")} "\\n" {close} "\\n"?\n')
        more = "call*" if parallel else ""
        if choice != "auto":
            return StructuredOutput(grammar=f"start: call {more}\n" + rules)
        # auto: free prose, or prose followed by calls. The prose lexeme cannot produce a tag token, so the tag ends
        # it; written as text, a lazy lexeme ends at the first tag instead.
        if self.tag_tokens:
            start = f"start: TEXT | TEXT? call {more}\n"
        else:
            start = f"start: TEXT | prose_open body {more}\nprose_open[lazy]: /(.|\\n)*{re.escape(OPEN)}/\n"
        return StructuredOutput(grammar=start + rules + "TEXT: /(.|\\n)+/\n")

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
        calls = [c for m in _CALL.finditer(text) if (c := _call(_loads(m.group(1)))) is not None]
        if not calls:
            bare = _bare_calls(text, tools)
            return (None, bare) if bare else (text, [])
        content = _CALL.sub("", text).strip()
        return content or None, calls

    def stream(self, tools: list[dict], parallel: bool = True) -> ToolStream:
        return HermesStream(tools, parallel)


# The head of a tagged call up to its arguments' opening brace, from which they stream (doubled braces included).
_HEAD = re.compile(r'\s*\{\{?\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*\{')


@dataclass
class _LiveCall:
    """A tagged call whose arguments are streaming: where they start in the call's text, and how far a scan of
    their JSON has got (strings and nesting), so that exactly the arguments object is sent, not what follows it."""

    index: int | None  # None: a call past the first without parallel_tool_calls, not sent
    name: str
    start: int
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    scanned: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False

    def scan(self, args: str) -> str:
        """The arguments' text newly seen in `args` (the call's text from their opening brace), up to their end."""
        at = self.scanned
        while at < len(args) and not self.done:
            ch = args[at]
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            at += 1
        new, self.scanned = args[self.scanned:at], at
        return new


@dataclass
class HermesStream(ToolStream):
    """Holds back text that may be the start of a tag; a tagged call streams its name once its head is complete and
    then its arguments as they come (a call whose head does not read so goes whole at its closing tag); a reply
    that opens as a bare call is held to its end."""

    tools: list[dict]
    parallel: bool = True
    pending: str = ""  # text not yet sent: a possible tag start, or an open call
    calls: list[dict] = field(default_factory=list)
    bare: bool | None = None  # whether the reply opens as a bare call (None: too soon to tell)
    live: _LiveCall | None = None  # the open call, once its head has been read

    def feed(self, delta: str, final: bool = False) -> tuple[str, Deltas]:
        self.pending += delta
        if self.bare is None:
            self.bare = _opens_call(self.pending)
        if self.bare is not False and not final:
            return "", []
        if self.bare and (bare := _bare_calls(self.pending, self.tools)):
            self.pending = ""
            return "", [d for call in bare for d in self._emit(call)]
        content, deltas = "", []
        while self.pending:
            start = self.pending.find(OPEN)
            if start == -1:
                keep = 0 if final else _tag_prefix(self.pending, OPEN)
                content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            content += self.pending[:start]
            self.pending = self.pending[start:]
            end = self.pending.find(CLOSE)
            body = self.pending[len(OPEN): None if end == -1 else end]
            deltas += self._stream(body)
            if end == -1:
                if final:  # cut short (max_tokens): a call not begun in the deltas was never one, and is text
                    if self.live is None or self.live.index is None:
                        content += self.pending
                    self.pending, self.live = "", None
                break
            self.pending = self.pending[end + len(CLOSE):].lstrip("\n")
            deltas += self._close(body)
        if (self.calls or deltas) and not content.strip():  # the line breaks between and after calls
            content = ""
        return content, deltas

    def _stream(self, body: str) -> Deltas:
        """The deltas of an open call's text so far: its head once complete, then its arguments as they come."""
        out: Deltas = []
        if self.live is None:
            head = _HEAD.match(body)
            try:
                name = json.loads(f'"{head.group(1)}"') if head else None
            except json.JSONDecodeError:  # a bad escape in the name: read whole at the close (and refused there)
                name = None
            if name is None:
                return out
            index = None if self.calls and not self.parallel else len(self.calls)
            self.live = _LiveCall(index, name, head.end() - 1)
            if index is not None:
                out.append({"index": index, "id": self.live.id, "type": "function",
                            "function": {"name": self.live.name, "arguments": ""}})
        live = self.live
        if live.index is not None and (args := live.scan(body[live.start:])):
            if out:  # one entry per call in a chunk, as OpenAI sends them (clients read a chunk's first entry)
                out[0]["function"]["arguments"] = args
            else:
                out.append({"index": live.index, "function": {"arguments": args}})
        return out

    def _close(self, body: str) -> Deltas:
        """At a call's closing tag: a streamed call is whole; one whose head never read so is read whole now."""
        live, self.live = self.live, None
        if live is None:
            call = _call(_loads(body.strip()))
            return [] if call is None else self._emit(call)
        if live.index is not None:
            self.calls.append({"index": live.index, "id": live.id, "type": "function", "function": {
                "name": live.name, "arguments": body[live.start: live.start + live.scanned]}})
        return []


@dataclass(frozen=True)
class JsonSyntax(ToolSyntax):
    """The reply is the call: a JSON object with `name` and `key` (Llama 3.x: `parameters`), several separated by
    `;`, optionally after Llama's `<|python_tag|>` token. A reply that does not start with `{` is prose."""

    key: str = "parameters"
    python_tag: bool = False
    parser: ClassVar[str] = "llama3_json"

    def grammar(self, tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutput | None:
        if choice == "none":
            return None
        more = '(";" " "? call)*' if parallel else ""
        tag = f"{PYTHON_TAG}? " if self.python_tag else ""
        rules = f"calls: {tag}call {more}\ncall: %json {_call_schema(tools, choice, self.key)}\n"
        if choice != "auto":
            return StructuredOutput(grammar="start: calls\n" + rules)
        return StructuredOutput(grammar="start: TEXT | calls\n" + rules + "TEXT: /[^{](.|\\n)*/\n")

    def _parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
        calls = _bare_calls(text.strip().removeprefix(PYTHON_TAG), tools)
        return (None, calls) if calls else (text, [])

    def stream(self, tools: list[dict], parallel: bool = True) -> ToolStream:
        return JsonStream(self, tools, parallel)


@dataclass
class JsonStream(ToolStream):
    """Prose streams as it comes; a reply that starts like a call is held to the end and parsed whole."""

    syntax: JsonSyntax
    tools: list[dict]
    parallel: bool = True
    pending: str = ""
    holding: bool | None = None  # None until the reply's first visible characters decide
    calls: list[dict] = field(default_factory=list)

    def feed(self, delta: str, final: bool = False) -> tuple[str, Deltas]:
        self.pending += delta
        if self.holding is None:
            head = self.pending.lstrip()
            if head.startswith(PYTHON_TAG):
                self.holding = True
            elif not PYTHON_TAG.startswith(head):
                self.holding = _opens_call(head)
        if self.holding is False or (final and self.holding is None):
            content, self.pending = self.pending, ""
            return content, []
        if not final:
            return "", []
        content, calls = self.syntax.parse(self.pending, self.tools)
        self.pending = ""
        return content or "", [d for call in calls for d in self._emit(call)]


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
