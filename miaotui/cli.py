"""The `miaotui` command: run, chat, pull, list, info."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from miaotui.config import DEFAULT_MODEL, POOLINGS, QUANTIZATIONS, EngineConfig
from miaotui.errors import MiaotuiError
from miaotui.loader.sources import ALIASES

log = logging.getLogger("miaotui")


def _model_positional(p: argparse.ArgumentParser) -> None:
    """The model as the word after the command too (`miaotui serve qwen2.5-coder-1.5b`, as `vllm serve` takes it);
    main() puts it in --model. Not for `run`, whose word is the prompt: argparse cannot split two words that flags
    stand between (`run MODEL --raw PROMPT`)."""
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model, as --model")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"alias, .gguf file or model folder "
                   f"(default {DEFAULT_MODEL}; aliases: {', '.join(ALIASES)})")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default auto: bf16 where "
                   "the hardware has it)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                   "at most 8192)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="KV cache size: bytes, or a fraction of free memory when <= 1")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    g.add_argument("--quantization", "-q", default="auto", choices=list(QUANTIZATIONS),
                   help="weight format at load time: none (dense), int8, int4, native (the file's own codes: 4-bit "
                   "blocks as int4, wider ones as int8) or auto (default: native for quantized files on the CPU; "
                   "int4 decode beside dense bf16 weights for 4-bit files where the CPU has bf16 units)")
    g.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache precision (default auto: the model's dtype; int8 halves a bf16 cache)")
    g.add_argument("--activation-bits", type=int, default=16, choices=[16, 8],
                   help="activations of the low-bit products on the CPU: 16 (default: two int8 terms, ~15 bits, the "
                   "reference's tokens) or 8 (one term, as llama.cpp: faster batches and speculative checks, the "
                   "text drifts from the reference's)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling")
    g.add_argument("--speculative-config", default=None, metavar="JSON", type=_json_object,
                   help='speculative decoding, as in vLLM: \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                   "(methods ngram, suffix, draft_model with \"model\"; off by default)")
    g.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template (file or text) in "
                   "place of the model's own")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: launch every decode step op by "
                   "op (graphs are captured at start on CUDA; no effect on a CPU)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N", help="split every layer over "
                   "N processes (torch.distributed: gloo on CPU, NCCL on CUDA), each with cores / N threads")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.2, help="0 for greedy (default 0.2)")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--verbose", "-v", action="store_true", help="print load time, KV cache size and tokens/s")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, got {text!r}")
    return int(text)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's configuration from the engine flags, for every command that runs one."""
    kv = args.kv_cache_memory
    if kv is not None and kv > 1:
        kv = int(kv)
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=kv, enable_prefix_caching=not args.no_prefix_caching, threads=args.threads,
                        seed=args.seed, quantization=args.quantization, group_size=args.group_size,
                        kv_cache_dtype=args.kv_cache_dtype, activation_bits=args.activation_bits,
                        chat_template=args.chat_template,
                        speculative=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size,
                        enforce_eager=args.enforce_eager)


def _engine(args: argparse.Namespace):
    from miaotui.engine.engine import Engine

    engine = Engine(engine_config(args))
    log.info("loaded %s (%s, %s on %s, quantization %s) in %.2f s", engine.loaded.files.name,
             engine.model_config.architecture, str(engine.dtype).removeprefix("torch."), engine.device,
             engine.quantization, engine.load_seconds)
    return engine


def _params(args: argparse.Namespace):
    from miaotui.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sample_seed)


def _stream(engine, ids: list[int], params, write: Callable[[str], None]) -> tuple[str, int, float]:
    """Generate one answer, writing text as it comes and a newline after it (before the stats line, which goes to
    stderr); Ctrl-C stops this answer (the request is aborted)."""
    rid = engine.add_request(ids, params)
    text, tokens, last = "", 0, None
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                write(out.delta)
                text, tokens, last = out.text, out.completion_tokens, out
    except KeyboardInterrupt:
        engine.abort(rid)
        write("\n[stopped]")
    write("\n")
    rate = 0.0
    if last is not None and last.metrics.ttft is not None:
        decode = (last.metrics.finished_time or time.monotonic()) - last.metrics.first_token_time
        rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
        log.info("time to first token %.0f ms, %d tokens, %.1f tok/s decode", last.metrics.ttft * 1000, tokens, rate)
    return text, tokens, rate


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


def _prompt(args: argparse.Namespace) -> str:
    """The prompt: text piped or redirected into stdin, then the argument after a blank line (`cat notes.txt |
    miaotui run "Summarize this."`, as the llm CLI does); no argument or "-" reads stdin alone. A terminal or
    /dev/null on stdin is not read unless "-" asks for it."""
    arg = None if args.prompt == "-" else args.prompt
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
        fed = stat.S_ISFIFO(mode) or stat.S_ISREG(mode)
    except (AttributeError, OSError, ValueError):  # no stdin at all
        fed = False
    if args.prompt is None and not fed:
        raise MiaotuiError("give a prompt: `miaotui run \"...\"`, or pipe text in (`... | miaotui run`)")
    piped = sys.stdin.read().strip() if fed or args.prompt == "-" else ""
    prompt = "\n\n".join(part for part in (piped, arg) if part)
    if not prompt:
        raise MiaotuiError("the prompt is empty")
    return prompt


def cmd_run(args: argparse.Namespace) -> int:
    params = _params(args)  # a bad value fails before the model loads
    prompt = _prompt(args)
    engine = _engine(args)
    tok = engine.tokenizer
    if tok.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
        if not args.raw:
            _write(prompt)
    _stream(engine, ids, params, _write)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    engine = _engine(args)
    tok = engine.tokenizer
    if not tok.chat_template:
        raise MiaotuiError(f"{args.model} has no chat template; use `miaotui run --raw` for plain completion")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("Chatting with", engine.loaded.files.name, "— /reset clears the history, /exit quits, "
          "Ctrl-C stops an answer, \"\"\" begins and ends a message of several lines.")
    while True:
        try:
            line = _read_turn()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(system + history)
        if len(ids) >= engine.max_model_len - 1:
            history.pop()
            print(f"(the conversation is too long for the {engine.max_model_len}-token context; /reset it)")
            continue
        answer, _, _ = _stream(engine, ids, params, _write)
        history.append({"role": "assistant", "content": answer})


def _read_turn() -> str:
    """One message: a line, or (as ollama takes pasted text) the lines from one that begins with three quotes to
    one that ends with them, the quotes dropped. EOFError at the end of input before a message begins."""
    line = input("\n> ")
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    if text.rstrip().endswith('"""'):  # """all on one line"""
        return text.rstrip()[:-3]
    lines = [text]
    while True:
        try:
            more = input("... ")
        except EOFError:
            break
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            break
        lines.append(more)
    return "\n".join(lines).strip("\n")


def cmd_pull(args: argparse.Namespace) -> int:
    from miaotui.loader.sources import pull

    for name in args.names:
        path = pull(name)
        print(f"{name}: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from miaotui.loader.sources import cached_models, home
    from miaotui.quant import pack_cache

    models = cached_models()
    if not models:
        print(f"no models in {home() / 'models'}; `miaotui pull {DEFAULT_MODEL}` fetches the default")
    for name, path, size in models:
        print(f"{name:<24} {size / 1e6:>9.1f} MB  {path}")
    if kept := pack_cache.usage():
        print(f"\npacked weights kept for faster loads: {kept / 1e6:.1f} MB in {pack_cache.root()} (delete it to free "
              "the space; MIAOTUI_PACK_CACHE=0 keeps none)")
    print("\navailable aliases: " + ", ".join(f"{a.name} ({a.description})" for a in ALIASES.values()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from miaotui.loader.info import describe

    for key, value in describe(args.model).items():
        print(f"{key:<18} {value}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from miaotui.bench import main as bench_main
    from miaotui.bench.engine_bench import SCENARIOS, BenchConfig

    scenarios = args.scenarios.split(",")
    if "embeddings" in scenarios:
        if scenarios != ["embeddings"]:
            raise MiaotuiError("the embeddings scenario runs alone (it takes an embedding model)")
        from miaotui.bench.embed_bench import format_embeddings, run_embeddings

        res = run_embeddings(args.model, args.compare, repeats=args.repeats, dtype=args.dtype, threads=args.threads)
        print(format_embeddings(res))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0

    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise MiaotuiError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)} (or embeddings)")
    cfg = BenchConfig(engine=engine_config(args), decode_tokens=args.decode_tokens,
                      prefill_tokens=args.prefill_tokens, context_tokens=args.context_tokens,
                      num_prompts=args.num_prompts, input_len=args.input_len,
                      output_len=args.output_len, concurrency=args.concurrency, serve_requests=args.serve_requests,
                      repeats=args.repeats, scenarios=tuple(args.scenarios.split(",")))
    peers = tuple(args.peers.split(","))
    unknown = [p for p in peers if p not in ("llama.cpp", "transformers")]
    if unknown:
        raise MiaotuiError(f"unknown peer {unknown[0]!r}; use llama.cpp and/or transformers")
    bench_main(cfg, args.compare, args.json, args.plot, peers)
    return 0


def _comma_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated flag value as its non-empty items."""
    return tuple(x.strip() for x in (value or "").split(",") if x.strip())


def _check_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MiaotuiError(f"--host {host}: {e.strerror}") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            sock.bind(address)
        except OSError as e:
            raise MiaotuiError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _check_tool_parser(args: argparse.Namespace, tokenizer) -> None:
    """vLLM's --tool-call-parser names the syntax of the model's calls; miaotui reads it from the chat template,
    so the flag is a check: a name that is not the template's would misread the calls, and is refused."""
    from miaotui.engine.tools import syntax_for

    if args.tool_call_parser is None:
        return
    if "tools" not in (tokenizer.chat_template or ""):
        raise MiaotuiError(f"--tool-call-parser {args.tool_call_parser}: this model's chat template takes no tools")
    found = syntax_for(tokenizer).parser
    if found != args.tool_call_parser:
        raise MiaotuiError(f"--tool-call-parser {args.tool_call_parser}: this model's chat template writes {found} "
                           f"tool calls (miaotui reads the template's own syntax; the flag can be left out)")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from miaotui.engine.async_engine import AsyncEngine
    from miaotui.server.app import ServerLimits, create_app
    from miaotui.server.connections import guarded_protocol

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT stop accepting connections and let in-flight requests finish for the grace period; the
        process then exits 0 (uvicorn's own handlers re-raise the signal, which would end it with -15)."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    api_key = _api_key(args)
    _check_free(args.host, args.port)  # before minutes of loading, not after
    if args.replicas is not None or args.ray_address is not None:
        from miaotui.cluster.replicas import ClusterConfig, start_replicas

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # while starting: stop Ray's processes too
        engine = start_replicas(engine_config(args), ClusterConfig(args.replicas or 1, args.ray_address,
                                                                   args.routing))
    else:
        engine = AsyncEngine(_engine(args))
        engine.engine.grammars.warm_up()  # the tokenizer's trie for structured output, built while starting
        fault_seed = os.environ.get("MIAOTUI_FAULT_SEED")
        if fault_seed:  # the soak test's fault injection: requests with this seed fail at their third token
            engine.engine.scheduler.on_token = _fault_injector(int(fault_seed))
    _check_tool_parser(args, engine.tokenizer)
    names = args.served_model_name or [engine.model_name]
    origins = _comma_list(args.allowed_origins)
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise MiaotuiError(f"--default-max-tokens must be at least 1, got {args.default_max_tokens}")
    methods, headers = _comma_list(args.allowed_methods) or ("*",), _comma_list(args.allowed_headers) or ("*",)
    if args.allow_credentials and "*" in origins:
        log.warning("--allow-credentials with --allowed-origins '*': every origin gets its own name back with "
                    "Allow-Credentials: true")
    limits = ServerLimits(args.max_body_bytes, args.max_waiting, args.max_prompt_tokens, args.max_request_tokens,
                          origins, args.allow_credentials, methods, headers, args.protect_metrics,
                          args.default_max_tokens)
    embeddings = None
    if args.embedding_pooling and not args.embedding_model:
        raise MiaotuiError("--embedding-pooling applies to the --embedding-model; name one")
    if args.embedding_model:
        from miaotui.engine.embedder import Embedder
        from miaotui.server.embeddings import EmbeddingService

        embedder = Embedder(args.embedding_model, device=args.device, dtype=args.dtype, threads=args.threads,
                            pooling=args.embedding_pooling)
        embeddings = EmbeddingService(embedder, embedder.model_name)
    name = names[0]
    app = create_app(engine, name, api_key=api_key, limits=limits, embeddings=embeddings, aliases=tuple(names[1:]))
    logging.getLogger("miaotui.server").setLevel(logging.INFO)
    log.warning("serving %s on http://%s:%d (OpenAI API under /v1%s)", name, args.host, args.port,
                ", API key required" if api_key else "")
    # Idle keep-alive connections close after 5 s, a request must arrive whole within --read-timeout, headers are
    # capped at 64 KiB, and connections past the queue's size are refused with 503 instead of piling up.
    protocol = guarded_protocol(args.read_timeout, max_connections=engine.max_num_seqs + args.max_waiting + 64)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", http=protocol,
                                           timeout_graceful_shutdown=args.grace_period, timeout_keep_alive=5,
                                           h11_max_incomplete_event_size=64 * 1024))
    def drain(*_) -> None:
        """Stop accepting; requests still running shortly before the grace period ends get a 503 with an OpenAI
        body (uvicorn would cancel them with a bare 500)."""
        if not server.should_exit:
            server.should_exit = True
            timer = threading.Timer(max(0.0, args.grace_period - 2), engine.fail_all, ("grace period over",))
            timer.daemon = True
            timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, drain)
    try:
        asyncio.run(server.serve())
    finally:
        engine.shutdown()
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file, else $MIAOTUI_API_KEY, else --api-key (visible to every user in `ps`: prefer the others)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise MiaotuiError(f"{args.api_key_file}: cannot read the API key ({e.strerror})") from None
        if not key:
            raise MiaotuiError(f"{args.api_key_file}: the API key file is empty")
        return key
    return os.environ.get("MIAOTUI_API_KEY") or args.api_key


def _fault_injector(seed: int) -> Callable:
    def inject(seq, token: int) -> None:
        if seq.params.seed is not None and seq.params.seed == seed and len(seq.output_ids) >= 2:
            raise RuntimeError(f"injected fault (seed {seed})")

    return inject


def cmd_loadtest(args: argparse.Namespace) -> int:
    if args.scale_out:
        from miaotui.bench.cluster_bench import format_scale_out, run_scale_out

        n, c, mt = args.requests or 200, args.concurrency or 16, args.max_tokens or 8
        rows = run_scale_out(args.model, n, c, mt)
        print(format_scale_out(rows, args.model, n, c, 8))
        for r in rows:
            if r["first_error"]:
                print(f"  {r['setup']}: {r['errors']} errors, the first: {r['first_error']}")
        return 0 if not any(r["errors"] for r in rows) else 1
    args.requests, args.concurrency = args.requests or 200, args.concurrency or 64
    args.max_tokens = args.max_tokens or 32
    if args.soak:
        from miaotui.bench.soak import SoakConfig, run_soak

        report = run_soak(SoakConfig(args.soak, args.model, args.concurrency, args.max_tokens))
        print(report.summary())
        for problem in report.lost[:10]:
            print("  lost:", problem)
        return 0 if report.ok else 1
    import httpx

    from miaotui.bench.serve_bench import format_load, run_load

    try:
        httpx.get(f"{args.url.rstrip('/')}/v1/models", timeout=10)
    except httpx.HTTPError as e:
        raise MiaotuiError(f"no server answers at {args.url} ({type(e).__name__}: {e}); start one with "
                           "`miaotui serve`, or name it with --url") from None
    res = asyncio.run(run_load(args.url, args.model, args.requests, args.concurrency, args.max_tokens,
                               args.api_key, require_usage=not args.peer))
    print(format_load(args.url, res.summary()))
    for e in res.errors[:5]:
        print("  error:", e)
    return 0 if not res.errors else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from miaotui.eval.perplexity import default_text, perplexity

    if args.what == "compression":
        return _compression_table(args)
    if args.what == "tasks":
        return _tasks(args)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    engine = _engine(args)
    ids = engine.tokenizer.encode(text)
    start = time.perf_counter()
    ppl, n = perplexity(engine, ids, args.ctx, args.method, args.chunks)
    print(f"perplexity {ppl:.4f} over {n} tokens ({args.method}, ctx {args.ctx}, {engine.quantization} "
          f"weights, {str(engine.dtype).removeprefix('torch.')}, {engine.config.kv_cache_dtype} KV cache) in "
          f"{time.perf_counter() - start:.1f} s")
    if args.compare:
        from miaotui.eval.perplexity import llama_cpp_perplexity

        if engine.loaded.files.kind != "gguf":
            raise MiaotuiError("--compare runs llama.cpp, which needs a GGUF model")
        start = time.perf_counter()
        try:
            peer, _ = llama_cpp_perplexity(engine.loaded.files.path, ids, args.ctx, args.method, args.chunks)
        except ImportError:
            raise MiaotuiError("--compare needs llama-cpp-python (pip install llama-cpp-python)") from None
        print(f"llama.cpp  {peer:.4f} on the same tokens in {time.perf_counter() - start:.1f} s: miaotui/llama.cpp "
              f"= {ppl / peer:.4f} ({(ppl / peer - 1) * 100:+.2f}%)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from miaotui.eval import tasks
    from miaotui.llm import LLM

    names = args.tasks.split(",") if args.tasks else list(tasks.TASKS)
    tasks.check(names)
    cfg = engine_config(args)
    llm = LLM(cfg.model, **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"})
    limit = args.limit or 100
    results = tasks.run(llm, names, limit)
    peer = None
    if args.compare:
        files = llm.engine.loaded.files
        if files.kind != "gguf":
            raise MiaotuiError("--compare runs llama.cpp, which needs a GGUF model")
        print("the same prompts through llama.cpp", file=sys.stderr)
        try:
            peer = tasks.run_llama_cpp(str(files.path), llm.tokenizer, names, limit)
        except ImportError:
            raise MiaotuiError("--compare needs llama-cpp-python (pip install llama-cpp-python)") from None
    print(f"{cfg.model}: {llm.engine.quantization} weights, {str(llm.engine.dtype).removeprefix('torch.')}, "
          f"greedy, first {limit} items of each task\n")
    print(tasks.format_results(results, peer))
    return 0


def _compression_table(args: argparse.Namespace) -> int:
    import json

    from miaotui.bench import require_matplotlib
    from miaotui.eval import compression, tasks

    models = args.models.split(",") if args.models else list(compression.MODELS)
    settings = args.settings.split(",") if args.settings else list(compression.SETTINGS)
    unknown = [s for s in settings if s not in compression.SETTINGS]
    if unknown:
        raise MiaotuiError(f"unknown setting {unknown[0]!r}; use {', '.join(compression.SETTINGS)}")
    names = [] if args.tasks == "none" else args.tasks.split(",") if args.tasks else list(tasks.TASKS)
    tasks.check(names)
    if args.plot:
        require_matplotlib()  # before a long run, not after it
    rows = compression.run(models, settings, chunks=args.chunks or 8, tasks=names, limit=args.limit or 20)
    print(compression.format_table(rows))
    if args.plot:
        compression.plot(rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from miaotui.compress.pipeline import CompressOptions, compress

    text = Path(args.calibration).read_text(encoding="utf-8") if args.calibration else None
    res = compress(args.model, Path(args.output), CompressOptions(
        prune=args.prune, sparsity=args.sparsity, drop_layers=args.drop_layers, calibration_text=text,
        calibration_tokens=args.calibration_tokens, quantize=args.quantize, group_size=args.group_size,
        dtype=args.dtype))
    if res.layer_scores:
        print("layer scores (angular distance): " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(res.layer_scores)))
        print(f"dropping layers {res.dropped}")
    if res.sparsity is not None:
        print(f"block weights now {res.sparsity:.1%} zeros")
    print(f"wrote {res.path} ({res.bytes / 2**20:.0f} MiB, {res.num_layers} layers, {args.quantize} weights) in "
          f"{res.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miaotui", description="miaotui (秒推): fast LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer one prompt, streaming to the terminal")
    r.add_argument("prompt", nargs="?", help="the prompt; text piped into stdin comes before it (\"-\" or none: "
                   "stdin alone)")
    r.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    r.add_argument("--system", default=None, help="system prompt for chat models")
    _engine_flags(r)
    _sampling_flags(r)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _model_positional(c)
    c.add_argument("--system", default=None, help="system prompt")
    _engine_flags(c)
    _sampling_flags(c)
    c.set_defaults(fn=cmd_chat)
    pl = sub.add_parser("pull", help="download a model into the cache")
    pl.add_argument("names", nargs="+", metavar="NAME")
    pl.set_defaults(fn=cmd_pull)
    ls = sub.add_parser("list", help="models in the cache")
    ls.set_defaults(fn=cmd_list)
    b = sub.add_parser("bench", help="measure decode, prefill, throughput and latency; --compare runs the peers")
    _model_positional(b)
    _engine_flags(b)
    b.add_argument("--compare", action="store_true", help="also run llama.cpp and transformers when installed")
    b.add_argument("--peers", default="llama.cpp,transformers", help="with --compare: which peers to run")
    b.add_argument("--scenarios", default="decode,sampled,prefill,throughput,latency,prefix",
                   help="comma-separated subset of decode,sampled,prefill,long,throughput,latency,prefix,speculative "
                   "(sampled: single-stream decode at temperature 0.8, top-p 0.95; long: single-stream decode after "
                   "a prompt of --context-tokens; speculative: plain vs "
                   "--speculative-config, ngram by default, on summarization, QA, code editing and chat; "
                   "embeddings: alone, with an embedding model, against sentence-transformers)")
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--prefill-tokens", type=int, default=512)
    b.add_argument("--context-tokens", type=int, default=2048, help="the long scenario's prompt length")
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=64)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--serve-requests", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3,
                   help="timed runs a scenario (their median); speculative: each prompt's plain and speculative runs")
    b.add_argument("--json", default=None, help="write the results as JSON here")
    b.add_argument("--plot", default=None, help="write a PNG bar chart here")
    b.set_defaults(fn=cmd_bench, verbose=True)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _model_positional(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (visible in `ps`: "
                    "prefer --api-key-file or $MIAOTUI_API_KEY)")
    sv.add_argument("--api-key-file", default=None, help="read the API key from this file")
    sv.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                    help="browser origins allowed to call the API (CORS), comma-separated; 'localhost' for pages on "
                    "this machine (any port), '*' for any (default none)")
    sv.add_argument("--allow-credentials", action="store_true", help="CORS answers allow credentials (as vLLM's "
                    "flag; the allowed origin is then named, never '*')")
    sv.add_argument("--allowed-methods", default="*", metavar="METHODS", help="methods a CORS preflight may ask "
                    "for, comma-separated (default '*')")
    sv.add_argument("--allowed-headers", default="*", metavar="HEADERS", help="request headers a CORS preflight "
                    "may ask for, comma-separated (default '*')")
    sv.add_argument("--protect-metrics", action="store_true", help="/metrics asks for the API key too")
    sv.add_argument("--enable-auto-tool-choice", action="store_true", help="vLLM's flag, taken for its commands: "
                    "tool calls are always on here (tool_choice auto, required, none or a named function)")
    sv.add_argument("--enable-tokenizer-info-endpoint", action="store_true", help="vLLM's flag, taken for its "
                    "commands: GET /tokenizer_info is always served here")
    sv.add_argument("--tool-call-parser", choices=("hermes", "llama3_json"), default=None, help="vLLM's flag, as "
                    "a check: the syntax of the model's calls is read from its chat template, and a different name "
                    "is refused")
    sv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME", help="model id in the API "
                    "(default: the model's name); more names: the model answers to each of them too")
    sv.add_argument("--embedding-model", default=None, metavar="MODEL", help="also serve /v1/embeddings with this "
                    "encoder (alias, .gguf or folder; e.g. all-minilm-l6-v2, nomic-embed-text-v1.5)")
    sv.add_argument("--embedding-pooling", choices=POOLINGS, default=None, help="how the embedding model's vector "
                    "is made from its tokens' states (default: what its files say; llama-server's --pooling)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    sv.add_argument("--max-waiting", type=int, default=256, help="queue length past which requests get 503")
    sv.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds a client has to send a whole request (head and body); slower ones get 408")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts get 400 (default: the "
                    "context length)")
    sv.add_argument("--max-request-tokens", type=int, default=None, help="requests asking for more than this "
                    "many tokens in all (n × max_tokens) get 400 (default: no limit past the context)")
    sv.add_argument("--default-max-tokens", type=int, default=None, metavar="N", help="max_tokens for requests "
                    "that set none (default: 16 on /v1/completions as OpenAI's, the rest of the context on chat)")
    sv.add_argument("--grace-period", type=int, default=30, help="seconds in-flight requests get on SIGTERM")
    sv.add_argument("--replicas", type=int, default=None, metavar="N", help="run N engine replicas on Ray Serve "
                    "behind this server, each with its share of the cores (needs miaotui[cluster])")
    sv.add_argument("--ray-address", default=None, metavar="ADDR", help="with --replicas: join this Ray cluster "
                    "('auto': the one `ray start` made here) instead of starting a local Ray")
    sv.add_argument("--routing", choices=["prefix", "pow2"], default="prefix", help="with --replicas: send a "
                    "request to the replica holding its prompt's prefix (default), or Ray Serve's power of two")
    _engine_flags(sv)
    sv.set_defaults(fn=cmd_serve, verbose=True)
    lt = sub.add_parser("loadtest", help="bounded streaming load test of a running server (loopback only)")
    lt.add_argument("--url", default="http://127.0.0.1:8000")
    lt.add_argument("--model", default=DEFAULT_MODEL, help="model id the server serves")
    lt.add_argument("--requests", type=int, default=None, help="default 200")
    lt.add_argument("--concurrency", type=int, default=None, help="default 64 (16 with --scale-out)")
    lt.add_argument("--max-tokens", type=int, default=None, help="default 32 (8 with --scale-out)")
    lt.add_argument("--api-key", default=None)
    lt.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="start a server of --model on "
                    "loopback and soak it this long with a mixed workload and injected faults (ignores --url)")
    lt.add_argument("--scale-out", action="store_true", help="start servers of --model (one process; 1 replica on "
                    "Ray; 2 with prefix routing; 2 with power-of-two routing) and run the same shared-system-prompt "
                    "load on each: prefix-cache hit rate and throughput side by side (ignores --url)")
    lt.add_argument("--peer", action="store_true", help="a peer without streamed usage (llama-cpp-python's "
                    "server): count streamed chunks instead")
    lt.set_defaults(fn=cmd_loadtest)
    ev = sub.add_parser("eval", help="quality measurements: eval ppl MODEL [--text FILE]; eval tasks MODEL "
                        "[--tasks ...] [--limit N]; eval compression (the README's table of every compression "
                        "setting)")
    ev.add_argument("what", choices=["ppl", "tasks", "compression"])
    _model_positional(ev)
    ev.add_argument("--text", default=None, help="text file (default: a text that ships with Python)")
    ev.add_argument("--ctx", type=int, default=512)
    ev.add_argument("--method", default="llamacpp", choices=["llamacpp", "sliding"])
    ev.add_argument("--chunks", type=int, default=None, help="score at most this many windows (compression "
                    "table: default 8)")
    ev.add_argument("--compare", action="store_true", help="eval ppl / tasks: also score the same tokens or prompts "
                    "with llama.cpp")
    ev.add_argument("--models", default=None, help="compression table: comma-separated models (default: the three "
                    "real ones)")
    ev.add_argument("--settings", default=None, help="compression table: comma-separated settings (default all)")
    ev.add_argument("--json", default=None, help="compression table: also write the rows as JSON here")
    ev.add_argument("--plot", default=None, metavar="FILE.png", help="compression table: draw each accuracy "
                    "measure against decode tok/s and weight bytes (matplotlib)")
    ev.add_argument("--tasks", default=None, help="eval tasks and the compression table: comma-separated (default "
                    "all: translate-zh-en, translate-en-zh, wiki-describe, humaneval; compression: 'none' for no "
                    "task columns)")
    ev.add_argument("--limit", type=int, default=None, help="the first N items of each task (default: 100 for eval "
                    "tasks, 20 per setting for the compression table)")
    _engine_flags(ev)
    ev.set_defaults(fn=cmd_eval, verbose=False)
    cp = sub.add_parser("compress", help="prune and/or quantize a model into a new model folder")
    cp.add_argument("model", help="alias, .gguf file or model folder")
    cp.add_argument("--output", "-o", required=True, help="folder to write (safetensors + config + tokenizer)")
    cp.add_argument("--prune", choices=["magnitude", "2:4", "layers"], default=None,
                    help="magnitude (with --sparsity), 2:4, or layers (with --drop-layers)")
    cp.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, e.g. 0.3")
    cp.add_argument("--drop-layers", type=int, default=None, help="number of blocks to remove")
    cp.add_argument("--calibration", default=None, help="text file for layer scores (default: Python's "
                    "language reference topics)")
    cp.add_argument("--calibration-tokens", type=int, default=2048)
    cp.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                    help="store the block projections packed (miaotui loads them; transformers cannot)")
    cp.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128")
    cp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the float tensors written")
    cp.set_defaults(fn=cmd_compress)
    i = sub.add_parser("info", help="architecture, size, tensor types and context length of a model")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_arg", None):
        if args.model not in (DEFAULT_MODEL, args.model_arg):
            parser.error(f"the model is named twice: {args.model_arg} and --model {args.model}")
        args.model = args.model_arg
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        return args.fn(args)
    except (MiaotuiError, ValueError, OSError) as e:  # OSError: a file named on the command line, a busy port
        print(f"miaotui: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
