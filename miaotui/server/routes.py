"""The endpoints: OpenAI's completions, chat completions and models, tokenize/detokenize, health, metrics and the
web chat page. Each reads the server's state (`Server`, on app.state) and the engine through its public API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from miaotui.engine.async_engine import ServingEngine
from miaotui.engine.sequence import RequestOutput, TokenLogprob
from miaotui.engine.tools import ToolStream, ToolSyntax, syntax_for
from miaotui.errors import GrammarError, RequestFailed, ShuttingDown
from miaotui.sampling import SamplingParams, StructuredOutput
from miaotui.server.admission import Admission
from miaotui.server.errors import APIError
from miaotui.server.metrics import Metrics
from miaotui.server.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, GenerationRequest,
                                     TokenizeRequest)
from miaotui.server.streaming import stream_response, usage

log = logging.getLogger("miaotui.server")
router = APIRouter()
# what a chat template is rendered with by the server: chat_template_kwargs may not replace these
RESERVED_TEMPLATE_NAMES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


@dataclass
class Server:
    engine: ServingEngine
    model_name: str
    admission: Admission
    metrics: Metrics
    aliases: tuple[str, ...] = ()  # more names the model answers to (vLLM's --served-model-name A B ...)
    created: int = field(default_factory=lambda: int(time.time()))  # the models' `created`
    embedding_model: str | None = None  # the encoder's name, when one serves /v1/embeddings beside the model

    @functools.cached_property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: changes when the model, its weights' format or miaotui's version does
        (worked out once: reading the package's version touches the disk)."""
        e = self.engine
        key = f"{_version()}/{e.model_name}/{e.quantization}/{e.max_model_len}"
        return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]

    def check_model(self, name: str | None) -> str:
        """The name responses report: the one the request used, if the model answers to it (else 404)."""
        if name is None:
            return self.model_name
        if name not in (self.model_name, self.engine.model_name, *self.aliases):
            what = ("is the embedding model here (it serves /v1/embeddings)" if name == self.embedding_model
                    else "does not exist")
            raise APIError(404, f"model {name!r} {what}; this server generates with {self.model_name!r}",
                           param="model", code="model_not_found")
        return name

    async def constrain(self, req: GenerationRequest, params: SamplingParams,
                        tools: tuple[StructuredOutput, str] | None = None) -> None:
        """The request's output constraint (`tools`: the one its tool_choice implies), compiled before it is
        admitted: a bad one is a 400 naming its parameter (streamed requests too, since no response has started)."""
        if (named := params.out_of_vocabulary(self.engine.vocab_size)) is not None:
            raise APIError(400, f"{named[0]}: token id {named[1]} is outside the vocabulary", param=named[0])
        try:
            found = req.constraint()
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_constraint") from None
        if found is not None and tools is not None:
            raise APIError(400, f"{found[1]} cannot be combined with tool calls (tool_choice {tools[1]!r})",
                           param=found[1], code="invalid_constraint")
        found = found or (tools and (tools[0], "tool_choice"))
        if found is None:
            return
        params.structured_output, param = found
        try:
            await self.engine.compile_constraint(params.structured_output)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_constraint") from None

    async def run(self, ids: list[int], params: SamplingParams, rid: str) -> AsyncIterator[RequestOutput]:
        """Generate for an admitted request; logs it, records its metrics and releases its admission."""
        start = time.perf_counter()
        last: dict[int, RequestOutput] = {}
        status = "aborted"
        try:
            async for out in self.engine.generate(ids, params, rid):
                last[out.index] = out
                yield out
            status = "ok"
        except ValueError as e:  # the engine refused the request (prompt too long, bad token id)
            status = "error"
            raise APIError(400, str(e)) from None
        except ShuttingDown as e:
            status = "error"
            raise APIError(503, f"the server is shutting down: {e}", "server_error", code="server_shutting_down",
                           headers={"Retry-After": "1"}) from None
        except RequestFailed as e:  # processing it raised; the engine went on
            status = "error"
            raise APIError(500, f"the request failed: {e}", "server_error") from None
        finally:
            self.admission.release()
            seconds = time.perf_counter() - start
            self.metrics.record(len(ids), list(last.values()), seconds)
            ttft = min((o.metrics.ttft for o in last.values() if o.metrics.ttft is not None), default=None)
            log.info("%s prompt=%d completion=%d ttft=%s duration=%.0fms status=%s", rid, len(ids),
                     sum(o.completion_tokens for o in last.values()),
                     "-" if ttft is None else f"{ttft * 1000:.0f}ms", seconds * 1000, status)

    async def collect(self, ids: list[int], params: SamplingParams, rid: str) -> dict[int, RequestOutput]:
        """The final output of each of the request's samples (the non-streaming responses)."""
        finals: dict[int, RequestOutput] = {}
        async for out in self.run(ids, params, rid):
            if out.finished:
                finals[out.index] = out
        return finals


def _version() -> str:
    try:
        return importlib.metadata.version("miaotui")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "source"


def server(request: Request) -> Server:
    return request.app.state.miaotui


def lp_completion(tok, items: list[tuple[int, TokenLogprob | None]], start: int) -> dict:
    """Legacy completions' logprobs of (token id, logprob) pairs: each token's text, logprob, its top alternatives
    with the token itself (up to n + 1, as OpenAI's), and where its text starts in the choice's text, counted from
    `start` by the tokens' texts. An echoed prompt's first token has no logprob (None), as in OpenAI's."""
    texts = [tok.token_text(i) for i, _ in items]
    offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=start)) if texts else []
    return {"tokens": texts, "token_logprobs": [t and t.logprob for _, t in items],
            "top_logprobs": [t and {tok.token_text(i): v for i, v in t.top.items()} for _, t in items],
            "text_offset": offsets}


def lp_chat(tok, items, n: int) -> dict:
    """Chat's logprobs: each token's `top_logprobs` are the n most likely tokens, the chosen one among them only
    where it is one of those (the engine's `top` also holds the chosen token, as legacy completions report it)."""
    def entry(i: int, v: float) -> dict:
        text = tok.token_text(i)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    return {"content": [{**entry(t.token_id, t.logprob),
                         "top_logprobs": [entry(i, v) for i, v in sorted(t.top.items(), key=lambda e: -e[1])[:n]]}
                        for t in items]}


@router.get("/", include_in_schema=False)
async def chat_page():
    return HTMLResponse((files("miaotui.server") / "static" / "index.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request):
    if not server(request).engine.alive:
        return Response('{"status": "engine loop stopped"}', status_code=503, media_type="application/json")
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request):
    m = server(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/models", include_in_schema=False)
@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": _model_cards(request)}


@router.get("/models/{model_id:path}", include_in_schema=False)
@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    """OpenAI's retrieve: one model's card (an id may hold slashes, as Hugging Face names do)."""
    card = next((c for c in _model_cards(request) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
    return card


def _model_cards(request: Request) -> list[dict]:
    s = server(request)
    base = {"object": "model", "created": s.created, "owned_by": "miaotui"}
    data = [{"id": name, **base, "max_model_len": s.engine.max_model_len} for name in (s.model_name, *s.aliases)]
    if (e := request.app.state.embeddings) is not None:
        data.append({"id": e.name, **base, "max_model_len": e.embedder.max_tokens,
                     "dimensions": e.embedder.dimensions})
    return data


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    s = server(request)
    s.check_model(req.model)
    tok = s.engine.tokenizer
    if req.messages is not None:
        ids = chat_prompt(s, req.chat())[0]
    else:
        text = req.prompt if req.prompt is not None else req.content  # `content`: llama.cpp's name for it
        ids = tok.encode(text or "", add_special_tokens=req.special())
    return {"tokens": ids, "count": len(ids), "max_model_len": s.engine.max_model_len}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """vLLM's tokenizer description (tokenizer_config.json's fields and the context length), by which lm-eval's
    API models find /tokenize and /detokenize and need no tokenizer files of their own."""
    s = server(request)
    return {**s.engine.tokenizer.config(), "model_max_length": s.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    s = server(request)
    s.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < s.engine.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
    text = s.engine.tokenizer.decode(req.tokens)
    return {"prompt": text, "content": text}  # vLLM's name and llama.cpp's


@router.post("/completions", include_in_schema=False)  # served without /v1 too, as llama.cpp and others do
@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    """One prompt, or a batch of them (OpenAI's list of strings or of token lists): prompt j's n samples are
    choices j * n .. j * n + n - 1, run as the engine's requests side by side and streamed as they come."""
    s = server(request)
    model = s.check_model(req.model)
    tok = s.engine.tokenizer
    prompts = req.prompts()
    jobs: list[tuple[list[int], SamplingParams]] = []
    for j, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {j}"
        ends: list[int] = []
        if req.suffix is not None:
            if not isinstance(prompt, str):
                raise APIError(400, "suffix needs a text prompt (the code before the gap)", param="suffix")
            try:
                ids, ends = tok.encode_infill(prompt, req.suffix)
            except ValueError as e:
                raise APIError(400, str(e), param="suffix") from None
        else:
            ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{name} is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < s.engine.vocab_size]
        if bad:
            raise APIError(400, f"{name}: token id {bad[0]} is outside the vocabulary (size {s.engine.vocab_size})",
                           param="prompt")
        params = req.sampling_params(s.admission.max_tokens(len(ids), req.max_tokens, 16, req.n, "prompt"),
                                     req.logprobs)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens are scored too
            params.prompt_logprobs = req.logprobs
        params.stop_token_ids = [*params.stop_token_ids, *ends]
        await s.constrain(req, params)
        jobs.append((ids, params))
    limit, asked = s.admission.max_request_tokens, req.n * sum(p.max_tokens for _, p in jobs)
    if len(jobs) > 1 and limit is not None and asked > limit:
        raise APIError(400, f"{len(jobs)} prompts × n × max_tokens = {asked} tokens exceeds this server's limit of "
                       f"{limit} tokens per request", param="max_tokens")
    admitted = 0
    try:
        for _ in jobs:
            s.admission.admit()
            admitted += 1
    except APIError:
        for _ in range(admitted):
            s.admission.release()
        raise
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": s.fingerprint}
    prefixes = [(p if isinstance(p, str) else tok.decode(ids)) if req.echo else "" for p, (ids, _) in
                zip(prompts, jobs)]
    prompt_len = sum(len(ids) for ids, _ in jobs)
    sent: dict[int, tuple[int, int]] = {}  # per choice: the logprobs reported, and where the next one's text starts

    def choice(out: RequestOutput, text: str, finished: bool) -> dict:
        lp = None
        if req.logprobs is not None:  # the tokens not reported yet: a streamed chunk's own, or all of them
            done, start = sent.get(out.index, (0, 0))
            items = [(t.token_id, t) for t in out.logprobs[done:]]
            if req.echo and out.index not in sent:  # the echoed prompt first
                items = list(zip(out.prompt_token_ids, out.prompt_logprobs or [])) + items
            lp = lp_completion(tok, items, start)
            sent[out.index] = (len(out.logprobs), start + sum(map(len, lp["tokens"])))
            lp = lp if lp["tokens"] else None
        return {"index": out.index, "text": text, "logprobs": lp,
                "finish_reason": out.finish_reason if finished else None}

    def runs() -> list[AsyncIterator[RequestOutput]]:
        """Each prompt's run, its outputs' indices made the batch's choice indices."""
        async def run(j: int, ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
            async with contextlib.aclosing(s.run(ids, params, rid if len(jobs) == 1 else f"{rid}-{j}")) as outs:
                async for out in outs:
                    yield out if j == 0 else replace(out, index=j * req.n + out.index)
        return [run(j, ids, params) for j, (ids, params) in enumerate(jobs)]

    if req.stream:
        echoed: set[int] = set()

        def chunk(out: RequestOutput) -> dict:
            prefix = prefixes[out.index // req.n]
            text = out.delta if out.index in echoed or not prefix else prefix + out.delta
            echoed.add(out.index)
            return choice(out, text, out.finished)

        include = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(merged(runs()), base, chunk, prompt_len, include)
    finals: dict[int, RequestOutput] = {}
    async for out in merged(runs()):
        if out.finished:
            finals[out.index] = out
    return {**base, "choices": [choice(o, prefixes[i // req.n] + o.text, True) for i, o in sorted(finals.items())],
            "usage": usage(prompt_len, finals)}


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[RequestOutput]:
    """Several runs' outputs as they come; the first error ends them all, and so does the reader's going away
    (each run's own cleanup then aborts its request). One run passes straight through."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def drain(stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream) as outs:
                async for out in outs:
                    await queue.put(out)
            await queue.put(None)
        except Exception as e:  # (a cancellation is not caught: it ends the task)
            await queue.put(e)

    tasks = [asyncio.ensure_future(drain(st)) for st in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChatJob:
    """A chat request made ready to run: its prompt ids, sampling parameters (constraint compiled), and the tools
    with the syntax that parses their calls (tools None when tool_choice is "none")."""

    ids: list[int]
    params: SamplingParams
    tools: list[dict] | None
    syntax: ToolSyntax
    model: str  # the name to report
    parallel: bool = True  # parallel_tool_calls

    def reply(self, text: str) -> tuple[str | None, list[dict]]:
        """A finished reply's prose and tool calls (all prose without tools), for every API's answer."""
        return self.syntax.parse(text, self.tools, self.parallel) if self.tools else (text, [])

    def stream(self) -> ToolStream | None:
        """A streamed reply's reader of tool calls (None without tools), one per sample."""
        return self.syntax.stream(self.tools, self.parallel) if self.tools else None


async def prepare_chat(s: Server, req: ChatRequest) -> ChatJob:
    """Everything a chat request needs before admission, shared by chat completions and the Responses API; every
    problem is a 400 naming its parameter."""
    model = s.check_model(req.model)
    ids, tools, tool_choice = chat_prompt(s, req)
    tok = s.engine.tokenizer
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(s.admission.max_tokens(len(ids), req.max_completion_tokens or req.max_tokens, None,
                                                          req.n), top)
    syntax = syntax_for(tok)
    grammar = syntax.grammar(tools, tool_choice, req.parallel_tool_calls) if tools else None
    if tools:
        params.skip_special_tokens = False  # the tags may be special tokens: the parser must see them
    await s.constrain(req, params, (grammar, tool_choice if isinstance(tool_choice, str) else "function")
                      if grammar else None)
    return ChatJob(ids, params, tools, syntax, model, req.parallel_tool_calls)


def chat_prompt(s: Server, req: ChatRequest) -> tuple[list[int], list[dict] | None, str | dict]:
    """The conversation's prompt ids as the model's template renders it (with the tools unless tool_choice is
    "none"), the tools and the resolved tool_choice; shared by chat and /tokenize, so a count is the chat's."""
    tok = s.engine.tokenizer
    if not tok.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        tool_choice = req.tool_choice_resolved()
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if tool_choice != "none" else None
    if tools and "tools" not in tok.chat_template:
        raise APIError(400, "this model's chat template does not take tools", param="tools")
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true (set "
                       "add_generation_prompt to false to continue the final message)", param="continue_final_message")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise APIError(400, "continue_final_message needs an assistant message last", param="continue_final_message")
    extra = req.chat_template_kwargs or {}
    reserved = sorted(set(extra) & RESERVED_TEMPLATE_NAMES)
    if reserved:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(reserved)}", param="chat_template_kwargs")
    try:
        ids = tok.encode_chat([m.for_template() for m in req.messages], req.add_generation_prompt,
                              req.continue_final_message, tools=tools, **extra)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return ids, tools, tool_choice


@router.post("/chat/completions", include_in_schema=False)
@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request):
    s = server(request)
    job = await prepare_chat(s, req)
    ids, params, tools, tok = job.ids, job.params, job.tools, s.engine.tokenizer
    s.admission.admit()
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    if req.stream:
        started: set[int] = set()
        sent_lp: dict[int, int] = {}
        calls: dict[int, ToolStream] = {}

        def chunk(out: RequestOutput) -> list[dict]:
            """OpenAI's shape: a role-only first chunk, content (and tool-call) chunks, a last chunk with only the
            finish reason."""
            made = []
            if out.index not in started:
                started.add(out.index)
                made.append({"index": out.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            text, call_deltas = out.delta, []
            if tools:
                stream = calls.setdefault(out.index, job.stream())
                text, call_deltas = stream.feed(out.delta, out.finished)
            delta: dict[str, Any] = {}
            if text:
                delta["content"] = text
            if call_deltas:
                delta["tool_calls"] = call_deltas
            lp = None
            if req.logprobs and len(out.logprobs) > sent_lp.get(out.index, 0):
                lp = lp_chat(tok, out.logprobs[sent_lp.get(out.index, 0):], req.top_logprobs or 0)
                sent_lp[out.index] = len(out.logprobs)
            if delta or lp:
                made.append({"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": None})
            if out.finished:
                finish = out.finish_reason
                if tools and calls[out.index].calls:
                    finish = "tool_calls"
                made.append({"index": out.index, "delta": {}, "logprobs": None, "finish_reason": finish})
            return made

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": job.model,
                "system_fingerprint": s.fingerprint}
        include = bool(req.stream_options and req.stream_options.include_usage)
        return stream_response(s.run(ids, params, rid), base, chunk, len(ids), include)
    finals = await s.collect(ids, params, rid)

    def message(o: RequestOutput) -> tuple[dict, str | None]:
        content, tool_calls = job.reply(o.text)
        msg = {"role": "assistant", "content": content, "refusal": None, "annotations": []}  # OpenAI's fields
        if not tool_calls:
            return msg, o.finish_reason
        return {**msg, "tool_calls": tool_calls}, "tool_calls"

    choices = []
    for _, o in sorted(finals.items()):
        msg, finish = message(o)
        lp = lp_chat(tok, o.logprobs, req.top_logprobs or 0) if req.logprobs else None
        choices.append({"index": o.index, "message": msg, "logprobs": lp, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion", "created": created, "model": job.model,
            "system_fingerprint": s.fingerprint, "choices": choices, "usage": usage(len(ids), finals)}
