"""Tensor parallelism (`--tensor-parallel-size N`): N processes, each holding 1/N of every decoder block, joined by
torch.distributed (gloo on CPU, NCCL on CUDA). Rank 0 is the engine — scheduler, KV bookkeeping, sampling — and
sends each forward pass's plan (token ids, positions, block tables: a few lists) to the other ranks, which run the
same pass on their shard and nothing else. On a server with as many NUMA nodes (sockets) as ranks, each rank runs on
its own node's cores.

The split, in Megatron's layout (as vLLM uses it): q|k|v and gate|up split by
output rows (each rank its heads and its slice of the MLP), o and down split by input columns, their partial
outputs summed across ranks — one all-reduce after attention, one after the MLP. Norms, embeddings and the output
head stay whole on every rank (only rank 0 computes logits).

Heads go to ranks by KV group where there are at least as many KV heads as ranks (no KV head is stored twice);
otherwise each rank takes an even share of the query heads and keeps the KV heads they read (Gemma 3 270M has one).
Uneven splits are fine (SmolLM2's 3 KV heads over 2 ranks: 1 and 2). The weights are split as float values: a
rank holds its slice dense, in the engine's dtype."""

from __future__ import annotations

import atexit
import glob
import multiprocessing
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.loader.tensors import FileTensor
from miaotui.models.base import CausalLM

if TYPE_CHECKING:
    from miaotui.config import EngineConfig


@dataclass(slots=True)
class StepPlan:
    """One forward pass's inputs as plain lists (what rank 0 sends): ids and positions of every token, the query
    rows' starts, each row's context length, the cache slot of every token, the rows' block tables, and the KV blocks
    to zero first (handed out for the first time)."""

    ids: list[int]
    positions: list[int]
    query_start: list[int]
    context_lens: list[int]
    slots: list[int]
    tables: list[list[int]]
    fresh: list[int] = field(default_factory=list)


def all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t)


def parse_cpulist(text: str) -> list[int]:
    """Linux's CPU list format ("0-3,8-11")."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def bind_rank(rank: int, world: int, threads: int | None) -> int:
    """One rank per NUMA node where the machine has at least as many nodes as ranks: this process's threads on node
    `rank`'s cores (its memory follows: Linux puts a page on the node of the thread that first writes it, and each
    rank loads its own shard). Returns the threads to use: `threads`, or the node's cores, or cores / world."""
    nodes = sorted(glob.glob("/sys/devices/system/node/node[0-9]*"), key=lambda p: int(p.rpartition("node")[2]))
    if len(nodes) >= world > 1:
        with open(f"{nodes[rank]}/cpulist") as f:
            cpus = parse_cpulist(f.read())
        os.sched_setaffinity(0, cpus)
        return threads or len(cpus)
    return threads or max(1, (os.cpu_count() or 1) // world)


class Peers:
    """Rank 0's side: starts ranks 1..N-1 (they load and split the model while rank 0 does), then sends plans."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.world = config.tensor_parallel_size
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_follower, args=(rank, self.world, self.address, self.backend, config),
                                  name=f"miaotui-tp{rank}", daemon=True) for rank in range(1, self.world)]
        for p in self.procs:
            p.start()

    def connect(self, num_blocks: int) -> None:
        """Join the group (waits for every rank to have its shard) and tell the others the cache's size."""
        dist.init_process_group(self.backend, init_method=self.address, rank=0, world_size=self.world)
        dist.broadcast_object_list([num_blocks], src=0)
        atexit.register(self.close)  # an engine nobody closed: its ranks still stop cleanly

    def send(self, plan: StepPlan | None) -> None:
        dist.broadcast_object_list([plan], src=0)

    def close(self) -> None:
        atexit.unregister(self.close)
        if dist.is_initialized():
            self.send(None)
            dist.destroy_process_group()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _follower(rank: int, world: int, address: str, backend: str, config: EngineConfig) -> None:
    """Ranks 1..N-1: load the model, keep this rank's share, then run every pass rank 0 plans until it sends None."""
    from miaotui.config import resolve_device, resolve_dtype
    from miaotui.engine.runner import ModelRunner
    from miaotui.loader import load
    from miaotui.quant import recipe

    torch.set_num_threads(bind_rank(rank, world, config.threads))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    model = load(config.model, device, dtype).model
    shard_model(model, rank, world, all_reduce)
    recipe.apply(model, config.quantization, config.group_size, dtype, device,
                 activation_bits=config.activation_bits)
    recipe.round_activations(model, config.activation_bits)  # as the leader's Engine does
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world)
    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    runner = ModelRunner(model, box[0], config.block_size, dtype, device, config.kv_cache_dtype)
    while True:
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        runner.follow(box[0])
    dist.destroy_process_group()


def _even(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def head_ranges(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's query heads [q0, q1) and the KV heads [k0, k1) they read."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        k0, k1 = _even(num_kv_heads, rank, world)
        return (k0 * group, k1 * group), (k0, k1)
    if num_heads < world or world % num_kv_heads:
        raise MiaotuiError(f"{num_heads} attention heads ({num_kv_heads} KV) do not split over {world} ranks")
    q0, q1 = _even(num_heads, rank, world)
    return (q0, q1), (q0 // group, (q1 - 1) // group + 1)


def shard_model(model: CausalLM, rank: int, world: int, all_reduce: Callable[[torch.Tensor], object]) -> None:
    """Keep this rank's share of every decoder block of a loaded model (before the recipe gives weights formats)."""
    for block in model.layers:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if not hasattr(attn, "qkv_proj") or not hasattr(mlp, "gate_up_proj"):
            raise MiaotuiError(f"tensor parallelism does not know the {model.config.architecture} block's layout")
        h, kv, d = attn.shape
        (q0, q1), (k0, k1) = head_ranges(h, kv, rank, world)
        _keep_rows(attn.qkv_proj, [(q0 * d, q1 * d), (k0 * d, k1 * d), (k0 * d, k1 * d)])
        _keep_columns(attn.o_proj, q0 * d, q1 * d, rank, all_reduce)
        attn.shape = (q1 - q0, k1 - k0, d)
        attn.sizes = [(q1 - q0) * d, (k1 - k0) * d, (k1 - k0) * d]
        attn.attn.num_heads, attn.attn.num_kv_heads = q1 - q0, k1 - k0
        i0, i1 = _even(mlp.gate_up_proj.output_sizes[0], rank, world)
        _keep_rows(mlp.gate_up_proj, [(i0, i1), (i0, i1)])
        _keep_columns(mlp.down_proj, i0, i1, rank, all_reduce)


def _keep_rows(linear: Linear, ranges: list[tuple[int, int]]) -> None:
    """A column-parallel projection: part i keeps output rows ranges[i] (and their bias)."""
    starts = [sum(linear.output_sizes[:i]) for i in range(len(ranges))]
    for i, (r0, r1) in enumerate(ranges):
        linear.parts[i] = FileTensor.of(linear.parts[i].values()[r0:r1].contiguous())
        linear.output_sizes[i] = r1 - r0
    if linear.bias is not None:
        kept = torch.cat([linear.bias.data[s + r0 : s + r1] for s, (r0, r1) in zip(starts, ranges)])
        linear.bias = torch.nn.Parameter(kept, requires_grad=False)


def _keep_columns(linear: Linear, c0: int, c1: int, rank: int, all_reduce: Callable[[torch.Tensor], object]) -> None:
    """A row-parallel projection: input columns [c0, c1); the ranks' outputs are summed, the bias added once."""
    linear.parts[0] = FileTensor.of(linear.parts[0].values()[:, c0:c1].contiguous())
    linear.in_features = c1 - c0
    linear.all_reduce = all_reduce
    if linear.bias is not None and rank != 0:
        linear.bias.data.zero_()
