"""CUDA-graph bookkeeping, checked without a GPU: the captured batch sizes, the padding a step gets and which
steps may replay a graph (the replays themselves: test_engine.py eagerly, tests/gpu on a GPU)."""

from __future__ import annotations

import pytest

from miaotui.engine.cuda_graphs import capture_sizes, eligible, padded_size
from miaotui.engine.tensor_parallel import StepPlan


def test_capture_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(64) == [1, 2, 4, *range(8, 65, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]  # the largest batch itself, never a size beyond it


@pytest.mark.parametrize(("rows", "size"), [(1, 1), (3, 4), (4, 4), (5, 8), (17, 24), (64, 64), (65, None)])
def test_a_step_pads_to_the_next_captured_size(rows, size):
    assert padded_size(capture_sizes(64), rows) == size


def _plan(tokens_per_row: list[int], width: int = 4) -> StepPlan:
    qs = [0]
    for n in tokens_per_row:
        qs.append(qs[-1] + n)
    n = qs[-1]
    return StepPlan([0] * n, list(range(n)), qs, [10] * len(tokens_per_row), list(range(n)),
                    [[0] * width for _ in tokens_per_row])


def test_only_pure_decode_steps_that_fit_replay():
    sizes = capture_sizes(8)
    assert eligible(_plan([1, 1, 1]), sizes, max_blocks=4)
    assert not eligible(_plan([1, 5]), sizes, max_blocks=4)  # a prompt chunk in the step
    assert not eligible(_plan([1] * 9), sizes, max_blocks=4)  # more rows than the largest graph
    assert not eligible(_plan([1, 1], width=5), sizes, max_blocks=4)  # tables wider than the buffers
