"""CUDA graphs for decode steps: a small model's decode step on a big GPU is hundreds of kernel launches of a few
microseconds each, so the launches, not the memory, set its speed. Each batch size of a ladder is captured once, at
start; a decode step is padded to the next captured size and replayed as one launch.

A captured step reads its inputs from fixed buffers: token ids, positions, cache slots, block tables and context
lengths. Padding rows have length 0 (they attend to nothing) and write their keys into a spare cache block that no
sequence owns. Only steps whose every row is one token (decode rows, speculative proposals scored as decode rows)
are eligible, with at most the largest captured size of rows and block tables no wider than the buffers; the rest,
and everything off CUDA or under `enforce_eager`, runs eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from miaotui.engine.tensor_parallel import StepPlan

if TYPE_CHECKING:
    from miaotui.engine.runner import ModelRunner

log = logging.getLogger("miaotui")


def capture_sizes(max_rows: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, then every multiple of 8, up to and including max_rows (vLLM's ladder:
    padding wastes at most 7 rows once batches pass 8)."""
    sizes = {s for s in (1, 2, 4) if s <= max_rows} | set(range(8, max_rows + 1, 8)) | {max_rows}
    return sorted(sizes)


def padded_size(sizes: list[int], rows: int) -> int | None:
    """The captured size a step of `rows` rows replays (the smallest that holds it), None when none does."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def eligible(plan: StepPlan, sizes: list[int], max_blocks: int) -> bool:
    """Whether a step can replay a graph: one token per row (a pure decode step), few enough rows, tables no wider
    than the captured ones."""
    rows = len(plan.context_lens)
    return (rows > 0 and plan.query_start[-1] == rows and padded_size(sizes, rows) is not None
            and len(plan.tables[0]) <= max_blocks)


class DecodeGraphs:
    """The captured decode steps of one runner, sharing one memory pool and one set of input buffers."""

    def __init__(self, runner: ModelRunner, max_rows: int, max_blocks: int, scratch_slot: int):
        self.runner = runner
        self.sizes = capture_sizes(max_rows)
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot  # where padding rows write their keys and values
        n, dev = self.sizes[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.long, device=dev)
        self.lens = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # steps served by a graph (reported in the GPU check)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every size, largest first (the smaller ones reuse its memory); returns the seconds it took. Off
        CUDA nothing is captured and a replay runs the same padded step eagerly (how the CPU tests check it)."""
        start = time.perf_counter()
        if self.runner.device.type != "cuda":
            self.graphs = dict.fromkeys(self.sizes)
            return 0.0
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._step(size)  # warm-up: compiles what is compiled, allocates what is allocated
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[size] = self._step(size)
                self.graphs[size] = graph
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        torch.cuda.synchronize(self.runner.device)
        seconds = time.perf_counter() - start
        log.info("CUDA graphs: %d decode batch sizes (1 to %d rows) captured in %.1f s", len(self.sizes),
                 self.sizes[-1], seconds)
        return seconds

    def _step(self, size: int) -> torch.Tensor:
        runner = self.runner
        meta = runner.backend.prepare_graph(self.slots[:size], self.tables[:size], self.lens[:size],
                                            runner.block_size, runner.windows)
        hidden = runner.model(self.ids[:size], self.positions[:size], meta)
        return runner.model.compute_logits(hidden)

    def replay(self, plan: StepPlan) -> torch.Tensor | None:
        """The step's logits [rows, V] from its graph, or None when the step is not eligible."""
        if not eligible(plan, self.sizes, self.max_blocks):
            return None
        rows = len(plan.context_lens)
        size = padded_size(self.sizes, rows)
        width = len(plan.tables[0])
        self.ids[:rows].copy_(torch.tensor(plan.ids), non_blocking=True)
        self.positions[:rows].copy_(torch.tensor(plan.positions), non_blocking=True)
        self.slots[:rows].copy_(torch.tensor(plan.slots), non_blocking=True)
        self.lens[:rows].copy_(torch.tensor(plan.context_lens), non_blocking=True)
        self.tables[:rows, :width].copy_(torch.tensor(plan.tables), non_blocking=True)
        if size > rows:  # rows a larger step left behind become padding again
            self.slots[rows:size].fill_(self.scratch_slot)
            self.lens[rows:size].zero_()
        graph = self.graphs[size]
        self.replays += 1
        if graph is None:
            return self._step(size)[:rows]
        graph.replay()
        return self.logits[size][:rows]
