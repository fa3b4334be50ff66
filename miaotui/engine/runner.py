"""The model runner: owns the model's KV cache, turns a scheduled batch into one forward pass and samples from it.

Per step it builds the inputs once — token ids, positions, and the attention metadata from the backend — hands
them to the model explicitly, and picks the fast path where one applies (the fused decode stack, engine/fused.py).
"""

from __future__ import annotations

import itertools

import torch

from miaotui import kernels
from miaotui.attention import select_backend
from miaotui.attention.base import AttentionMetadata
from miaotui.config import ModelConfig
from miaotui.engine import fused
from miaotui.engine.cuda_graphs import DecodeGraphs
from miaotui.engine.sampler import Sampler
from miaotui.engine.scheduler import ScheduledBatch
from miaotui.engine.sequence import Position, Sequence, TokenLogprob
from miaotui.engine.tensor_parallel import Peers, StepPlan
from miaotui.models.base import CausalLM
from miaotui.sampling import SamplingParams


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Cache bytes per token: keys and values of every layer, plus one scale per head for an int8 cache."""
    size = torch.empty((), dtype=dtype).element_size()
    if kv_cache_dtype == "int8":
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + size)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_cache_dtype: str = "auto"):
        self.model = model
        self.dtype, self.device = dtype, device
        self.block_size = block_size
        # One spare block after the KV manager's takes the writes of a captured step's padding rows.
        self.scratch_block = num_blocks
        cache_blocks = num_blocks + 1
        self.backend = select_backend(device, dtype, cache_blocks, block_size, kv_cache_dtype)
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA), from capture_graphs
        self.sampler = Sampler()
        self.positions_ready = 0  # rotary tables cover positions below this (models grow them on request)
        self.peers: Peers | None = None  # tensor parallel, on rank 0: the other ranks (engine/tensor_parallel.py)
        self._fresh: list[int] = []  # blocks zeroed since the last pass, for the other ranks
        cfg = model.config
        int8 = kv_cache_dtype == "int8"
        layers = model.attention_layers()
        # One tensor for all layers: [2, layers, blocks, block_size, kv_heads, head_dim] (this rank's KV heads)
        shape = (2, cfg.num_layers, cache_blocks, block_size, layers[0].num_kv_heads)
        self.kv_cache = torch.empty(*shape, cfg.head_dim, dtype=torch.int8 if int8 else dtype, device=device)
        self.kv_scale = torch.empty(*shape, 1, dtype=dtype, device=device) if int8 else None
        self.zero_blocks([0])  # block 0 also pads block tables: keep it finite from the start
        assert len(layers) == cfg.num_layers, "every layer must have exactly one Attention module"
        self.windows = {attn.sliding_window for attn in layers}
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            if int8:
                attn.k_scale, attn.v_scale = self.kv_scale[0, i], self.kv_scale[1, i]
        self._stack: fused.DecodeStack | None = None
        self._stack_tried = device.type != "cpu"  # built on first use: for this runner's cache

    def zero_blocks(self, blocks: list[int]) -> None:
        """Blocks handed out for the first time: their memory was never written and may hold NaNs, which a masked
        attention weight of 0 would still turn into NaN."""
        if blocks:
            if self.peers is not None:
                self._fresh.extend(blocks)  # the other ranks zero them before the next pass
            index = torch.tensor(blocks, device=self.device)
            self.kv_cache[:, :, index] = 0
            if self.kv_scale is not None:
                self.kv_scale[:, :, index] = 0

    def capture_graphs(self, max_rows: int, max_len: int) -> float | None:
        """Capture decode steps of up to `max_rows` rows over contexts of up to `max_len` tokens in CUDA graphs
        (engine/cuda_graphs.py; off CUDA the padded steps run eagerly, for checks); returns the seconds it took, or
        None where this runner cannot (a backend whose metadata needs the host, tensor parallel)."""
        if not self.backend.capturable or self.peers is not None:
            return None
        self.positions_ready = self.model.reserve_positions(max_len)  # the rotary tables never move after this
        self.graphs = DecodeGraphs(self, max_rows, -(-max_len // self.block_size),
                                   self.scratch_block * self.block_size)
        return self.graphs.capture()

    @torch.inference_mode()  # the logits are inference tensors: penalties and masks edit them in place
    def run(self, batch: ScheduledBatch) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
        """One step: the forward pass over the batch, then new tokens for each sequence that has caught up — one,
        or with proposals (speculative decoding) the proposals the model agrees with and one more."""
        self.zero_blocks(batch.fresh_blocks)
        rows = batch.sampled
        # before the pass: grammar masks compute alongside it
        sampling = self.sampler.prepare([v for i in rows for v in Position.of(batch.seqs[i])], self.device,
                                        [batch.seqs[i].draft for i in rows])
        seqs = batch.seqs
        every = frozenset(i for i, s in enumerate(seqs) if s.params.prompt_logprobs is not None
                          and s.num_computed < s.num_prompt and len(s.prompt_logprobs) < s.num_prompt)
        # one row per query row (proposals are rows of their own), or per token where the prompt is scored
        logits = self.forward(seqs, batch.num_tokens, every=every)
        first = list(itertools.accumulate((batch.num_tokens[i] if i in every else len(s.draft) + 1
                                           for i, s in enumerate(seqs)), initial=0))
        for i in every:
            self._score_prompt(seqs[i], logits[first[i]:first[i + 1]])
        pick = [r for i in rows for r in ([first[i + 1] - 1] if i in every else
                                          range(first[i], first[i] + len(seqs[i].draft) + 1))]
        if len(pick) != len(logits):  # in a pure decode step every row samples: no copy of the [B, vocab] logits
            logits = logits[pick]
        return self.sampler.sample(logits, sampling)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens that this chunk's rows (positions num_computed on) predict
        and that are not scored yet (a prompt computed again after preemption is not scored twice)."""
        start, done = seq.num_computed, len(seq.prompt_logprobs)
        rows = [r for r in range(len(logits)) if done <= start + r + 1 < seq.num_prompt]
        if rows:
            seq.prompt_logprobs.extend(self.sampler.score(logits[rows], [seq.token_ids[start + r + 1] for r in rows],
                                                          seq.params.prompt_logprobs))

    def _plan(self, seqs: list[Sequence], num_tokens: list[int]) -> StepPlan:
        """The pass's inputs as plain lists. A sequence's chunk is one query row; a sequence with proposals gives
        each of its tokens a decode row of its own over the cache up to it (the same causal attention), which keeps
        the step on the decode path and its fused stack."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        bs = self.block_size
        for seq, n in zip(seqs, num_tokens):
            start, table = seq.num_computed, seq.block_table
            if seq.draft:
                ids.append(seq.token_ids[start])
                ids.extend(seq.draft)
                for p in range(start, start + n):
                    query_start.append(query_start[-1] + 1)
                    context_lens.append(p + 1)
                    tables.append(table)
            else:
                ids.extend(seq.token_ids[start : start + n])
                query_start.append(query_start[-1] + n)
                context_lens.append(start + n)
                tables.append(table)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        width = max(len(t) for t in tables)
        return StepPlan(ids, positions, query_start, context_lens, slots, [t + [0] * (width - len(t)) for t in tables])

    def _tensors(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids, positions and the backend's attention metadata for a plan."""
        dev = self.device
        meta = self.backend.prepare(plan.query_start, plan.context_lens,
                                    torch.tensor(plan.slots, dtype=torch.long, device=dev),
                                    torch.tensor(plan.tables, dtype=torch.long, device=dev), self.block_size,
                                    self.windows, self.dtype)
        longest = max(meta.context_lens)
        if longest > self.positions_ready:
            self.positions_ready = self.model.reserve_positions(longest)
        return (torch.tensor(plan.ids, dtype=torch.long, device=dev), torch.tensor(plan.positions, device=dev),
                meta)

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A tensor-parallel rank other than 0: the pass rank 0 planned, on this rank's shard (no logits)."""
        self.zero_blocks(plan.fresh)
        self.model(*self._tensors(plan))

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], num_tokens: list[int], all_logits: bool = False,
                every: frozenset[int] = frozenset()) -> torch.Tensor:
        """One forward pass. Returns float32 logits of each query row's last token [rows, V], or of every token
        (all_logits), or of every token of the sequences at `every` (their prompts scored) and the last of the
        others'."""
        plan = self._plan(seqs, num_tokens)
        if self.peers is not None:  # tensor parallel: the other ranks run this pass with us
            plan.fresh, self._fresh = self._fresh, []
            self.peers.send(plan)
        replay = self.graphs is not None and not all_logits and not every
        if replay and (logits := self.graphs.replay(plan)) is not None:
            return logits
        ids, positions, meta = self._tensors(plan)
        stack = self._decode_stack(meta, meta.num_seqs)
        # a decode step's proposals are scored with a lone row's arithmetic, as plain decoding's steps of the few
        # requests that speculate compute each row (a step that carries a prompt's rows stays as it would be)
        exact = meta.all_decode and self.device.type == "cpu" and any(s.draft for s in seqs)
        with kernels.row_exact(exact):
            if stack is not None:
                hidden = self.model.norm(stack.decode(self.model.embed(ids, positions), positions, meta))
            else:
                hidden = self.model(ids, positions, meta)
            if every and not all_logits:
                hidden = hidden[torch.tensor(_logit_rows(seqs, plan.query_start, every), device=self.device)]
            elif not all_logits and meta.query_start[-1] != len(meta.query_start) - 1:  # (one token a row: all last)
                hidden = hidden[torch.tensor(meta.query_start[1:], device=self.device) - 1]
            return self.model.compute_logits(hidden)

    def _decode_stack(self, meta: AttentionMetadata, rows: int) -> fused.DecodeStack | None:
        """The fused stack for a pure decode step it serves (built on first use, for this runner's cache); module
        hooks do not fire on these steps (calibration and pruning hook prompt passes)."""
        if not meta.all_decode or rows > fused.MAX_ROWS or self.peers is not None:  # no all-reduce in the stack
            return None
        if not self._stack_tried:
            self._stack_tried = True
            self._stack = fused.build(self.model, self.dtype)
        return self._stack if self._stack is not None and rows <= self._stack.rows else None


def _logit_rows(seqs: list[Sequence], query_start: list[int], every: frozenset[int]) -> list[int]:
    """The token rows whose logits a pass keeps: every row of the sequences at `every`, the last of each other
    query row (a sequence with proposals has one query row a token)."""
    rows, q = [], 0
    for i, seq in enumerate(seqs):
        n = len(seq.draft) + 1 if seq.draft else 1
        if i in every:
            rows.extend(range(query_start[q], query_start[q + n]))
        else:
            rows.extend(query_start[q + j + 1] - 1 for j in range(n))
        q += n
    return rows


def prefill_once(model: CausalLM, ids: list[int], dtype: torch.dtype, device: torch.device,
                 block_size: int = 16) -> None:
    """One prefill of `ids` through a scratch KV cache (calibration hooks its layers); the cache is dropped after."""
    blocks = -(-len(ids) // block_size)
    runner = ModelRunner(model, blocks + 1, block_size, dtype, device)  # block 0 pads block tables
    seq = Sequence("scratch", list(ids), len(ids), SamplingParams(max_tokens=1), None,  # type: ignore[arg-type]
                   block_table=list(range(1, blocks + 1)))
    try:
        runner.forward([seq], [len(ids)])
    finally:
        for attn in model.attention_layers():
            attn.k_cache = attn.v_cache = attn.k_scale = attn.v_scale = None
