"""The FlexAttention backend (the CUDA one) checked on the CPU against torch's SDPA over gathered blocks: its mask
functions eagerly, its block masks through FlexAttention compiled for the CPU (which, unlike the eager path, visits
only the listed blocks)."""

from __future__ import annotations

import random

import pytest
import torch

from miaotui.attention import choose_backend
from miaotui.attention.flex import Q_TILE, FlexBackend
from miaotui.attention.torch_sdpa import TorchSDPABackend
from miaotui.errors import MiaotuiError
from miaotui.layers.attention import Attention

BS, BLOCKS, HQ, HKV, D = 16, 40, 4, 2, 32


def _layer(window: int | None) -> Attention:
    layer = Attention(HQ, HKV, D, D**-0.5, window)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, BLOCKS, BS, HKV, D, generator=g)  # stale contents everywhere: masks must hide them
    layer.k_cache, layer.v_cache = cache[0], cache[1]
    return layer


def _step(seqs: list[tuple[int, int]], shared: int = 0, seed: int = 0):
    """(cached, new) tokens per sequence → the step's metadata inputs; up to `shared` full cached blocks at the
    start of every table are the same physical blocks (a reused prefix), the rest a random, disjoint choice."""
    rng = random.Random(seed)
    free = list(range(BLOCKS))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(shared)]
    query_start, lens, tables, slots = [0], [], [], []
    for cached, new in seqs:
        n = -(-(cached + new) // BS)
        reused = min(shared, cached // BS)
        table = prefix[:reused] + [free.pop() for _ in range(n - reused)]
        tables.append(table)
        query_start.append(query_start[-1] + new)
        lens.append(cached + new)
        slots += [table[p // BS] * BS + p % BS for p in range(cached, cached + new)]
    width = max(len(t) for t in tables)
    return (query_start, lens, torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables]))


def _compare(flex: FlexBackend, seqs, window, shared=0, seed=0, tol=1e-5):
    query_start, lens, slots, tables = _step(seqs, shared, seed)
    g = torch.Generator().manual_seed(seed + 7)
    t = query_start[-1]
    q, k, v = torch.randn(t, HQ, D, generator=g), torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D,
                                                                                                    generator=g)
    out = {}
    for backend in (TorchSDPABackend(), flex):
        layer = _layer(window)
        meta = backend.prepare(query_start, lens, slots, tables, BS, {window}, torch.float32)
        out[backend.name] = backend.forward(layer, q, k, v, meta)
    torch.testing.assert_close(out["flex"], out["torch-sdpa"], atol=tol, rtol=tol)


STEPS = [
    [(40, 1), (0, 1), (95, 1)],  # a pure decode batch (one row starts a fresh block)
    [(40, 1), (32, 20), (0, 150)],  # decode, a chunk after a cached prefix, a prompt over two query tiles
    [(0, 37), (0, 37)],  # two fresh prompts of one length
    [(100, 60), (5, 1), (16, 16)],
]


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_eager_flex_masks_match_sdpa(step, window):
    _compare(FlexBackend(BLOCKS, torch.device("cpu"), compiled=False), STEPS[step], window, shared=2, seed=step)


@pytest.fixture(scope="module")
def compiled():
    return FlexBackend(BLOCKS, torch.device("cpu"), compiled=True)


@pytest.mark.parametrize("window", [None, 24])
def test_compiled_flex_visits_the_right_blocks(compiled, window):
    """Compiled, FlexAttention reads only the blocks the block mask lists: a missing block changes the answer."""
    for i, step in enumerate(STEPS):
        _compare(compiled, step, window, shared=2, seed=10 + i, tol=2e-5)


def test_block_masks_list_each_tile_s_blocks_once():
    flex = FlexBackend(BLOCKS, torch.device("cpu"), compiled=False)
    query_start, lens, slots, tables = _step([(40, 1), (32, 20), (0, 150)], shared=2)
    meta = flex.prepare(query_start, lens, slots, tables, BS, {None, 24}, torch.float32)
    full, windowed = meta.rows[None], meta.rows[24]
    assert full.kv_indices.shape[2] == -(-171 // Q_TILE)  # tiles of the flattened rows
    counts = full.kv_num_blocks[0, 0].tolist()
    # tile 0: all of sequences 0 and 1 (sharing two blocks) and sequence 2's first 107 tokens; tile 1: the rest
    assert counts == [3 + 4 - 2 + 7, 10]
    for t, n in enumerate(counts):
        listed = full.kv_indices[0, 0, t, :n].tolist()
        assert len(set(listed)) == n
    assert windowed.kv_num_blocks[0, 0].tolist()[1] < counts[1]  # a window skips blocks it cannot reach
    decode = flex.prepare([0, 1, 2], [40, 95], torch.tensor([0, 1]), tables[:2], BS, {None, 24}, torch.float32)
    assert decode.decode[None].kv_num_blocks[:, 0, 0].tolist() == [3, 6]
    assert decode.decode[24].kv_num_blocks[:, 0, 0].tolist() == [2, 2]
    assert decode.decode[24].kv_indices[1, 0, 0, :2].tolist() == tables[1, 4:6].tolist()


def test_padded_decode_rows_see_nothing_and_change_nothing():
    """CUDA graphs pad a decode batch with rows of length 0: they visit no block and leave the others' answers."""
    flex = FlexBackend(BLOCKS, torch.device("cpu"), compiled=False)
    query_start, lens, slots, tables = _step([(40, 1), (20, 1)])
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, HQ, D, generator=g), torch.randn(4, HKV, D, generator=g), torch.randn(4, HKV, D,
                                                                                                    generator=g)
    layer = _layer(None)
    meta = flex.prepare(query_start, lens, slots, tables, BS, {None}, torch.float32)
    alone = flex.forward(layer, q[:2], k[:2], v[:2], meta)
    padded_tables = torch.cat([tables, torch.zeros(2, tables.shape[1], dtype=torch.long)])
    meta = flex.prepare([0, 1, 2, 3, 4], lens + [0, 0], torch.cat([slots, torch.tensor([BLOCKS * BS - 1] * 2)]),
                        padded_tables, BS, {None}, torch.float32)
    # the padding rows write into the spare last slot, attend to nothing
    layer.k_cache.view(-1, HKV, D)[BLOCKS * BS - 1] = 0
    out = flex.forward(layer, q, k, v, meta)
    torch.testing.assert_close(out[:2], alone)
    assert torch.isfinite(out).all()


def test_backend_choice_per_device_and_cache():
    f32 = torch.float32
    assert choose_backend("cuda", torch.bfloat16, "auto", 16, False) == "flex"
    assert choose_backend("cuda", torch.bfloat16, "int8", 16, False) == "torch-sdpa"  # no int8 reads in flex
    assert choose_backend("cuda", torch.bfloat16, "auto", 8, False) == "torch-sdpa"  # Triton's tile: 16 or more
    assert choose_backend("cpu", f32, "auto", 16, True) == "cpu-paged"
    assert choose_backend("cpu", torch.float16, "auto", 16, True) == "torch-sdpa"
    assert choose_backend("cpu", f32, "auto", 16, False) == "torch-sdpa"
    assert choose_backend("cpu", f32, "auto", 16, True, forced="flex") == "flex"
    with pytest.raises(MiaotuiError, match="cannot serve"):
        choose_backend("cuda", f32, "auto", 16, False, forced="cpu-paged")
    with pytest.raises(MiaotuiError, match="not a backend"):
        choose_backend("cpu", f32, "auto", 16, True, forced="flash")
