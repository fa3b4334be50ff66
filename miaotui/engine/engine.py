"""The engine: requests in, one step at a time (schedule → run → sample → detokenize), outputs back."""

from __future__ import annotations

import ctypes
import itertools
import logging
import time
from dataclasses import dataclass, replace

import psutil
import torch

from miaotui.config import EngineConfig, SpeculativeConfig, resolve_device, resolve_dtype
from miaotui.engine.kv_cache import KVCacheManager
from miaotui.engine.runner import ModelRunner, kv_bytes_per_token, prefill_once
from miaotui.engine.sampler import MinTokens
from miaotui.engine.scheduler import Scheduler
from miaotui.engine.sequence import RequestOutput, Sequence, Status
from miaotui.engine.speculative import Speculator, StepPrice, build_proposer, pass_seconds
from miaotui.engine.structured import GrammarMask, Grammars
from miaotui.engine.tensor_parallel import Peers, all_reduce, bind_rank, shard_model
from miaotui.errors import MiaotuiError
from miaotui.loader import LoadedModel, load
from miaotui.quant import recipe
from miaotui.quant.calibrate import calibration_ids, input_power
from miaotui.sampling import SamplingParams
from miaotui.tokenizer import IncrementalDetokenizer, chat_template_from

log = logging.getLogger("miaotui")
MAX_DEFAULT_CONTEXT = 8192
MAX_GRAPH_ROWS = 256  # the largest decode step captured in a CUDA graph (larger ones are compute-bound anyway)


def trim_heap() -> None:
    """Hand the float weights that quantization or prepacking just freed back to the OS: glibc keeps freed heap
    pages resident otherwise, and an int4 model would look as large as a bf16 one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def keep_freed_memory() -> None:
    """Let glibc keep what a step frees for the next step, as llama.cpp keeps its compute buffers. By default it maps
    blocks over a moving threshold (at most 32 MB) afresh and unmaps them on free, and trims the heap's top, so a
    step's large intermediates came back as fresh zeroed pages every time: a 512-token prompt on Qwen2.5-1.5B took
    250k page faults (1 GB), and prefilled 1.06-1.10x faster without them (Ice Lake Xeon). The price: the heap stays
    at its peak (less 256 MB free at its top) until trim_heap hands it back. Nothing to do off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: every block from the heap, none mapped afresh
        libc.mallopt(-1, 2**28)  # M_TRIM_THRESHOLD: the top goes back past 256 MB free
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What the engine is doing now, for metrics and admission (read from any thread: plain counts)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    prefix_cache_hit_rate: float  # prompt tokens served from the prefix cache, of those looked up
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up (the hit rate's parts: rates of replicas do not add)
    prefix_cache_hits: int = 0


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        start = time.perf_counter()
        self.config = config
        tp = config.tensor_parallel_size
        if tp > 1 and (config.quantization == "int4" or config.speculative is not None or loaded is not None):
            raise MiaotuiError("tensor parallelism works with float, auto or int8 weights, without speculative "
                               "decoding, on a model it loads itself")
        threads = bind_rank(0, tp, config.threads) if tp > 1 else config.threads
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.peers = Peers(config, self.device) if tp > 1 else None  # they load while this process does
        self.loaded = loaded or load(config.model, self.device, self.dtype)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        if config.chat_template:
            self.tokenizer = replace(self.tokenizer, chat_template=chat_template_from(config.chat_template))
        model = self.loaded.model
        if self.peers is not None:
            shard_model(model, 0, tp, all_reduce)
        self.quantization = recipe.apply(model, config.quantization, config.group_size, self.dtype, self.device,
                                         calibrate=self._calibrate, activation_bits=config.activation_bits)
        if config.activation_bits != 16 and not recipe.round_activations(model, config.activation_bits):
            raise MiaotuiError(f"activation_bits {config.activation_bits} applies to miaotui's CPU integer kernels, "
                               f"and no weight of this model runs on them here ({self.quantization} weights on "
                               f"{self.device}); use quantization native or int4 on a CPU, or leave it at 16")
        trim_heap()
        if self.device.type == "cpu":
            keep_freed_memory()
        self.max_model_len = config.max_model_len or min(self.model_config.max_position, MAX_DEFAULT_CONTEXT)
        if self.max_model_len > self.model_config.max_position:
            raise MiaotuiError(f"max_model_len {self.max_model_len} exceeds the model's context length "
                               f"{self.model_config.max_position}")
        per_token = kv_bytes_per_token(self.model_config, self.dtype, config.kv_cache_dtype)
        budget = self._kv_budget(per_token)
        num_blocks = int(budget // (per_token * config.block_size))
        min_blocks = -(-self.max_model_len // config.block_size)
        if num_blocks < min_blocks:
            if config.kv_cache_memory is not None and num_blocks >= 1:
                log.warning("KV cache of %d blocks holds less than one %d-token sequence", num_blocks,
                            self.max_model_len)
            elif num_blocks < 1:
                raise MiaotuiError(f"kv_cache_memory {budget:.0f} bytes is too small for one KV block "
                                   f"({per_token * config.block_size} bytes)")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.dtype, self.device, config.kv_cache_dtype)
        if self.peers is not None:
            self.peers.connect(num_blocks)
            self.runner.peers = self.peers
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   self.tokenizer.stop_ids)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size)
        self.runner.sampler.processors += [MinTokens(self.tokenizer.stop_ids), GrammarMask(self.grammars)]
        self.speculator = None if config.speculative is None else self.build_speculator(config.speculative)
        if self.device.type == "cuda" and not config.enforce_eager:  # decode steps in CUDA graphs
            spec = config.speculative
            rows = config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
            self.runner.capture_graphs(min(rows, MAX_GRAPH_ROWS), self.max_model_len)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sequences: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self.load_seconds = time.perf_counter() - start  # loading, converting the weights, the KV cache
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB, %d tokens, %s)", num_blocks, config.block_size,
                 num_blocks * config.block_size * per_token / 2**20, num_blocks * config.block_size,
                 "int8" if config.kv_cache_dtype == "int8" else str(self.dtype).removeprefix("torch."))

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do for one process)."""
        if self.peers is not None:
            self.peers.close()
            self.peers = self.runner.peers = None

    def build_speculator(self, spec: SpeculativeConfig) -> Speculator:
        """The proposer, and what a proposed token costs on this machine to start with (a plain step, a step with
        k more rows, a proposal): the adaptive k weighs it, and the engine's steps refine it."""
        proposer = build_proposer(spec, self)
        rows = spec.num_speculative_tokens
        seconds = pass_seconds(self.runner, self.kv, list(range(rows + 1)))
        # where the cache has no room to time a pass, a middling guess
        price = StepPrice.measured(seconds, proposer.seconds()) if seconds[0] else StepPrice.fixed(0.5)
        speculator = Speculator(spec, proposer, self.max_model_len, price)
        log.info("speculative decoding: %s, k <= %d; a proposed token costs %.2f of a step to start with",
                 spec.method, rows, price())
        if not speculator.pays():
            log.warning("speculative decoding stays off: on this machine a scored row costs %.2f of a step, "
                        "more than even proposals that always hold can save", price(proposing=False))
        return speculator

    def _calibrate(self) -> dict:
        """Input statistics of every Linear over calibration text, for activation-aware int4."""
        model = self.loaded.model
        return input_power(model, calibration_ids(self.tokenizer),
                           lambda ids: prefill_once(model, ids, self.dtype, self.device))

    def _kv_budget(self, per_token: int) -> float:
        mem = self.config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = psutil.virtual_memory().available
        if mem is None:  # enough for the batch at full length, within a quarter of free memory (1 GiB on CPU)
            want = per_token * self.max_model_len * max(4, self.config.max_num_seqs)
            cap = 0.9 * free if self.device.type == "cuda" else min(0.25 * free, 2**30)
            return min(want, cap) if self.device.type != "cuda" else cap
        return mem * free if isinstance(mem, float) and mem <= 1 else float(mem)

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), kv.usage,
                           kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
                           self.scheduler.num_preemptions, kv.prefix_queries, kv.prefix_hits)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, the context length is {self.max_model_len}")
        if len(prompt_ids) + 1 > self.kv.num_blocks * self.kv.block_size:  # it would be preempted forever
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, the KV cache holds "
                             f"{self.kv.num_blocks * self.kv.block_size}; raise kv_cache_memory")
        bad = [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                             f"(size {self.model_config.vocab_size})")
        if (named := params.out_of_vocabulary(self.model_config.vocab_size)) is not None:
            raise ValueError(f"{named[0]} token id {named[1]} is outside the vocabulary "
                             f"(size {self.model_config.vocab_size})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        constraint = params.structured_output
        seqs = []
        for i in range(params.n):
            gen = self.generator
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(request_id, list(prompt_ids), len(prompt_ids), params,
                           IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                           priority=priority, generator=gen, index=i,
                           matcher=None if constraint is None else self.grammars.compile(constraint))
            self.scheduler.add(seq)
            seqs.append(seq)
        self.sequences[request_id] = seqs
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (a disconnected client, a stop button)."""
        for seq in self.sequences.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                if self.speculator is not None:
                    self.speculator.release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model and sample, book the results; the outputs of the requests that got a token."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, len(self.scheduler.waiting))
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        start = time.perf_counter()
        try:
            tokens, logprobs = self.runner.run(batch)
        except Exception as e:  # the pass failed: fail this step's requests, keep the engine (and the rest) going
            log.exception("forward pass failed")
            for seq in batch.seqs:
                self.scheduler.fail(seq, e)
            return self._outputs(batch.seqs)
        if self.speculator is not None:
            self.speculator.observe(batch, time.perf_counter() - start)
        return self._outputs(self.scheduler.update(batch, tokens, logprobs))

    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """Outputs of the sequences that moved; a failed sample fails its whole request (its siblings too)."""
        seqs = list(seqs)
        for seq in [s for s in seqs if s.error is not None]:
            for sib in self.sequences.get(seq.request_id, []):
                if not sib.finished:
                    self.scheduler.finish(sib, "error")
                    sib.error = seq.error
                    if all(s is not sib for s in seqs):
                        seqs.append(sib)
        return [self._output(seq) for seq in seqs]

    def _output(self, seq: Sequence) -> RequestOutput:
        # Hold back text that could be the start of a stop string until we know it is not.
        hold = 0 if seq.finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        visible = len(seq.text) - hold
        delta = seq.text[seq.emitted : visible] if visible > seq.emitted else ""
        seq.emitted += len(delta)
        if seq.finished:
            if self.speculator is not None:
                self.speculator.release(seq)
            group = self.sequences.get(seq.request_id, [])
            if all(s.finished for s in group):
                self.sequences.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, seq.index, seq.token_ids[: seq.num_prompt], seq.output_ids,
                             seq.text, delta, seq.finished, seq.finish_reason, seq.logprobs, replace(seq.metrics),
                             seq.stop_reason, seq.error, cached_tokens=seq.num_cached_prompt,
                             prompt_logprobs=None if seq.params.prompt_logprobs is None else seq.prompt_logprobs)

    # -- utilities --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits of every position of one sequence [T, V], computed in chunks through the paged cache."""
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"text has {len(token_ids)} tokens, the context length is {self.max_model_len}")
        params = SamplingParams(max_tokens=1)
        seq = Sequence("logits", list(token_ids), len(token_ids), params,
                       IncrementalDetokenizer(self.tokenizer), status=Status.RUNNING)
        chunks = []
        try:
            while seq.num_computed < seq.num_tokens:
                n = min(self.config.max_num_batched_tokens, seq.num_tokens - seq.num_computed)
                if not self.kv.can_allocate(seq, seq.num_computed + n):
                    raise MiaotuiError("the KV cache is too small for this text; raise kv_cache_memory")
                self.kv.allocate(seq, seq.num_computed + n)
                self.runner.zero_blocks(self.kv.fresh)
                self.kv.fresh = []
                chunks.append(self.runner.forward([seq], [n], all_logits=True))
                seq.num_computed += n
        finally:
            self.kv.release(seq)
        return torch.cat(chunks)
